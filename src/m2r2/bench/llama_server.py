"""llama.cpp's own HTTP server (llama-server, through xllamacpp) in a process of its own, for ``m2r2 bench serve``.

Run as a script (``python .../llama_server.py --gguf F --port P ...``), not as ``-m m2r2.bench.llama_server``:
it imports nothing but xllamacpp, so the server process holds no copy of torch or of m2r2's model. It serves
until it is terminated (SIGTERM / SIGINT); the benchmark waits for its ``/health`` to answer 200.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llama_server.py")
    p.add_argument("--gguf", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parallel", type=int, required=True, help="slots (n_parallel)")
    p.add_argument("--ctx-per-slot", type=int, required=True, help="n_ctx = parallel x this")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    try:
        import xllamacpp
    except ImportError as e:
        print(f"llama_server: xllamacpp is not importable ({e})", file=sys.stderr, flush=True)
        return 3
    c = xllamacpp.CommonParams()
    c.model.path = args.gguf
    c.hostnames = [args.host]
    c.port = args.port
    c.n_parallel = args.parallel
    c.n_ctx = args.parallel * args.ctx_per_slot  # llama-server splits n_ctx among its slots
    c.cpuparams.n_threads = args.threads
    c.cpuparams_batch.n_threads = args.threads
    c.n_threads_http = max(args.parallel + 2, 4)  # every streaming client holds an HTTP thread
    c.cont_batching = True
    c.verbosity = 0
    server = xllamacpp.Server(c)
    print(f"llama_server: listening on {server.listening_address} ({args.parallel} slots, n_ctx {c.n_ctx}, "
          f"{args.threads} threads)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    del server  # its destructor stops the HTTP server and the model loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
