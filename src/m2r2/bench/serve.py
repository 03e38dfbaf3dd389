"""``m2r2 bench serve``: m2r2's OpenAI-compatible server (``m2r2 serve``) against llama.cpp's own server
(llama-server, through xllamacpp) on the same GGUF, the same prompts and the same token budget, at several
concurrency levels.

How it measures:

- **One server at a time.** For each concurrency level ``c`` and each engine, a server is started in a
  subprocess of its own (free port, stderr to a log file, ready when its ``/health`` answers 200), measured,
  and stopped before the next one starts: the two engines never share the CPU. Levels run in order and, within
  a level, the engines one after the other, so the two numbers of one level are taken minutes apart, not a
  whole benchmark apart.
- **Slots = concurrency.** At level ``c`` both servers get ``c`` slots (m2r2 ``--parallel c``; llama.cpp
  ``n_parallel = c`` with ``n_ctx = c x --ctx-per-slot``, since llama-server splits its context among slots)
  and the same per-slot context. A server is sized for the load it serves, as an operator would size it; a
  fixed slot count would leave slots idle at low concurrency (free for m2r2, whose batch is the active slots,
  but llama.cpp's n_ctx and HTTP pool would be sized for a load that never comes).
- **Same input.** Every request goes to ``/v1/completions`` as the chat-templated prompt's token ids (m2r2's
  tokenizer, ``lm.encode``), so no engine applies a chat template of its own; each record keeps the prompt
  token count the server reports (``usage.prompt_tokens``) next to the count sent, and the summary counts
  mismatches. Greedy (temperature 0), ``max_tokens = --max-new-tokens``; llama.cpp's prompt cache is off
  (``cache_prompt: false``) so that a repeated prompt pays its prefill as in m2r2.
- **Threads.** ``--threads`` (default: the CPUs this process may use) for both engines' compute.
- **Client.** The driver is this process: asyncio + httpx, ``c`` concurrent clients, each taking the next
  prompt from one shared list (cycling when the requests outnumber the prompts) until ``--requests`` requests
  are done. Default: max(2 x the largest level, 16) requests at *every* level, the same prompts in the same
  order, so every level does the same work and every output has its reference at c=1. Before a level's clock
  starts, ``--warmup`` requests (default 1, a prompt outside the set) go to the fresh server.
- **Per request** (streamed with ``stream_options.include_usage``): time to first token (send to the first
  chunk with text), per-token latency (first chunk to the final chunk / (tokens - 1): the time per token after
  the first), tokens generated (``usage.completion_tokens``; EOS included when produced; chunk count if a
  server gives no usage), end-to-end time, the longest gap between chunks, and the output text.
- **Per level**: aggregate tokens/s (total tokens / wall time from the first request sent to the last one
  done), scaling vs the engine's lowest level, TTFT and per-token latency p50/p99 (linear interpolation), and
  output equality: each output text against m2r2's at the lowest level (c=1 by default) for the same prompt.
  For m2r2 that is exactness across concurrency; llama.cpp reads the same GGUF through its own (quantized)
  kernels while m2r2 dequantizes it to float32, so its agreement with m2r2 is information only.

Results: ``<out-dir>/<out>.json`` (benchmark, meta with provenance, records = one per request, summary),
``.md`` (engine x concurrency table) and ``.png`` (aggregate tokens/s vs concurrency, and latency). Server
logs go to a temporary directory named in the meta and in any start-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

from ..errors import M2R2Error
from ..options import int_at_least, int_list

ENGINES = ("m2r2", "llamacpp")
DEFAULT_CONCURRENCY = "1,4,8,16"
REFERENCE_ENGINE = "m2r2"
from .serve_servers import (RequestFailed, ServerProcess, ServerStartError, _log_tail, drive_level, free_port,  # noqa: F401
                            llamacpp_server, m2r2_server, request_body, stream_request, warm_up)
from .serve_stats import (percentile, reference_texts, render_serve_chart, render_serve_markdown,  # noqa: F401
                          serve_table, summarize_level, summarize_serve, write_serve_results)


# ---------------------------------------------------------------- command

def parse_engines(s: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in s.split(",") if x.strip()))
    bad = [n for n in names if n not in ENGINES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, "
                                         f"got {s!r}")
    return names


def parse_concurrency(s: str) -> tuple[int, ...]:
    vals = int_list("--concurrency", lo=1)(s)
    if not vals:
        raise argparse.ArgumentTypeError(f"--concurrency needs at least one level, got {s!r}")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"--concurrency has a level twice: {s!r}")
    return tuple(sorted(vals))


def engine_unavailable(engine: str, lm) -> str | None:
    """Why ``engine`` cannot run here, or None."""
    import importlib.util
    if engine == "llamacpp":
        if lm.source.gguf is None:
            return "the model was not loaded from a GGUF"
        if importlib.util.find_spec("xllamacpp") is None:
            return "xllamacpp is not installed (pip install xllamacpp)"
    if engine == "m2r2":
        missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the server extras are missing ({', '.join(missing)}): pip install -e \".[serve]\""
    return None


def main(args: argparse.Namespace) -> int:
    import m2r2
    from tqdm.auto import tqdm

    from ..engine.threads import available_cpus
    from ..provenance import pin_threads, run_end, run_start
    from .args import build_prompts

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise M2R2Error("m2r2 bench serve needs httpx: pip install httpx") from None
    args.threads = pin_threads(args.threads or available_cpus())
    levels = args.concurrency
    n_requests = args.requests or max(2 * max(levels), 16)
    start = run_start(args.bandwidth_mb)
    lm = m2r2.load(args.model, dtype="float32")  # tokenizes only: the servers load their own copies
    prompts, warm = build_prompts(lm, args)
    ctx_max = lm.config.max_position_embeddings
    if args.ctx_per_slot > ctx_max:
        args.ctx_per_slot = ctx_max
    longest = max(len(p.token_ids) for p in [*prompts, warm])
    if longest + args.max_new_tokens > args.ctx_per_slot:
        raise M2R2Error(f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} does not fit "
                        f"--ctx-per-slot {args.ctx_per_slot}")
    skipped: dict[str, str] = {}
    engines = []
    for e in args.engines:
        why = engine_unavailable(e, lm)
        if why:
            skipped[e] = why
            print(f"m2r2 bench: skipping {e}: {why}", file=sys.stderr)
        else:
            engines.append(e)
    if not engines:
        raise M2R2Error("no engine can run here: " + "; ".join(f"{e}: {w}" for e, w in skipped.items()))
    gguf = lm.source.gguf
    logs = Path(tempfile.mkdtemp(prefix=f"m2r2-bench-{args.out}-"))
    print(f"m2r2 bench: {len(prompts)} prompts, engines {', '.join(engines)}, concurrency {levels}, "
          f"{n_requests} requests per level, {args.max_new_tokens} max tokens, {args.threads} threads; "
          f"server logs in {logs}", file=sys.stderr)

    records: list[dict] = []
    level_info: list[dict] = []
    bar = tqdm(total=len(levels) * len(engines) * n_requests, desc="serve", unit="req", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM stops the servers too
    try:
        for c in levels:
            for eng in engines:
                bar.set_description(f"{eng} c={c}")
                log = logs / f"{eng}-c{c}.log"
                srv = m2r2_server(args, c, log) if eng == "m2r2" else llamacpp_server(args, gguf, c, log)
                with srv:
                    try:
                        asyncio.run(warm_up(srv.base_url, eng, warm, args.warmup, args.max_new_tokens))
                        recs, wall = asyncio.run(drive_level(srv.base_url, eng, prompts, c, n_requests,
                                                             args.max_new_tokens, on_done=lambda: bar.update(1)))
                    except Exception as e:  # noqa: BLE001 - any failure: one line naming the server's log
                        state = "still running" if srv.alive() else "exited"
                        raise M2R2Error(f"{eng} at concurrency {c}: a request failed ({type(e).__name__}: "
                                        f"{str(e)[:300]}); the server {state}, log {log}: {_log_tail(log, 4)}") \
                            from None
                    startup = srv.startup_s
                records += recs
                level_info.append({"engine": eng, "concurrency": c, "slots": c, "wall_s": wall,
                                   "requests": n_requests, "startup_s": startup,
                                   "n_ctx": c * args.ctx_per_slot if eng == "llamacpp" else args.ctx_per_slot})
    finally:
        signal.signal(signal.SIGTERM, old_term)
        bar.close()
    run_end(args.bandwidth_mb)
    summary = summarize_serve(records, level_info)
    meta = {"model": lm.source.name, "model_identity": lm.source.identity, "gguf": gguf.name if gguf else None,
            "prompts": args.prompt_ids or args.prompts, "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "concurrency": list(levels),
            "requests_per_level": n_requests, "warmup": args.warmup, "ctx_per_slot": args.ctx_per_slot, "m2r2_weights": args.m2r2_weights,
            "slots": "= concurrency", "endpoint": "/v1/completions (prompt as token ids, streamed)",
            "engines": engines, "skipped_engines": skipped, "levels": level_info,
            "isolation": "one server subprocess per (engine, level), never two at once", "server_logs": str(logs),
            "bandwidth_gbps": start["bandwidth_gbps"], "loadavg_start": start["loadavg"]}
    write_serve_results(args.out, meta, records, summary, args.out_dir)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .args import add_common_args

    p = subparsers.add_parser(
        "serve", help="server throughput and latency: m2r2 serve vs llama.cpp's llama-server at several concurrencies",
        description="Streams the same prompts (token ids) to m2r2's server and to llama.cpp's server, each in its "
                    "own subprocess and never both at once, with c concurrent clients and c slots per level; "
                    "writes benchmarks/results/<out>.json, .md and .png.")
    p.add_argument("--engines", type=parse_engines, default=ENGINES,
                   help=f"comma-separated (default: {','.join(ENGINES)})")
    p.add_argument("--concurrency", type=parse_concurrency, default=parse_concurrency(DEFAULT_CONCURRENCY),
                   help=f"comma-separated levels: concurrent clients = server slots (default: {DEFAULT_CONCURRENCY})")
    p.add_argument("--requests", type=int_at_least("--requests", 1), default=None,
                   help="requests per level (default: max(2 x the largest level, 16), the same at every level)")
    p.add_argument("--m2r2-weights", default="fp32", choices=("fp32", "gguf", "fp16"),
                   help="the weight format m2r2's server runs (serve --weights; default fp32; gguf: the GGUF's own "
                        "blocks, exact)")
    p.add_argument("--ctx-per-slot", type=int_at_least("--ctx-per-slot", 64), default=2048,
                   help="context per slot for both servers (llama.cpp n_ctx = slots x this; default 2048, at most "
                        "the model's window)")
    p.add_argument("--startup-timeout", type=int_at_least("--startup-timeout", 1), default=300,
                   help="seconds a server may take to answer /health (default 300)")
    add_common_args(p, out="serve", prompts="mt-bench", max_new_tokens=128)
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":
    from ..options import run_standalone

    if sys.argv[1:2] != ["serve"]:
        sys.argv.insert(1, "serve")
    run_standalone("python -m m2r2.bench.serve", "m2r2 bench serve",
                   lambda p: add_parser(p.add_subparsers(dest="bench_cmd", required=True)), lambda ns: ns.func(ns))
