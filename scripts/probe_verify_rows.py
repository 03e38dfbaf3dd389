#!/usr/bin/env python
"""What one more verification row costs, against what it must cost on this machine.

On the embedded model at a fixed cache position (median of repeated calls, threads pinned), for T = 1..9 rows of
one sequence (the pending token and T - 1 drafts: a verification, chain or tree): the block stack (one native call),
the LM head, and the whole forward; and the floors of an extra row: its multiply-adds (every linear weight and the
head, once per row) at the machine's measured float32 multiply-add rate (``native.fma_rate``). The weights stream
once per call whatever T is, so an extra row's floor is compute, not memory.

    python scripts/probe_verify_rows.py --threads 2

Writes benchmarks/results/verify-rows.json and prints a table. ``--engine llamacpp`` measures the same shapes in
llama.cpp (xllamacpp's in-process server, on the same GGUF, in this process alone): a prompt of ``--position``
tokens is cached, then k new tokens are evaluated in one batch after it (a request of the cached prompt plus k fresh
random tokens; llama.cpp's own ``prompt_ms`` for those k), for k = ``--rows``; written to verify-rows-llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import m2r2
from m2r2.engine import native
from m2r2.engine.model import Linear
from m2r2.provenance import command_line, machine_info, measure_bandwidth, pin_threads, run_end, run_start
from probe_decode_cost import median_ms  # (this script's folder is on the path when it runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position", type=int, default=160, help="cache position of the first measured row")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rows", default="1,2,3,4,5,7,9")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/verify-rows[-llamacpp].json")
    ap.add_argument("--engine", choices=("m2r2", "llamacpp"), default="m2r2")
    args = ap.parse_args()
    pin_threads(args.threads)
    if args.engine == "llamacpp":
        return llamacpp(args)
    args.out = args.out or "benchmarks/results/verify-rows.json"
    start = run_start()
    lm = m2r2.load(threads=args.threads)
    model = lm.model
    n = args.position
    rows = [int(r) for r in args.rows.split(",")]
    cache = model.new_cache(1, n + max(rows) + 1)
    res: dict = {"command": command_line(), "position": n, "threads": args.threads, "weights": model.weights,
                 "native_kernels": native.available(), "start": start}
    with torch.inference_mode():
        model(torch.randint(100, 10000, (1, n)), cache, torch.arange(n).view(1, -1))
        cache.advance(n)
        per = {}
        for T in rows:
            ids, pos = torch.full((1, T), 5), (n + torch.arange(T)).view(1, -1)
            h = model.hidden(ids, cache, pos)
            per[T] = {"forward_ms": median_ms(lambda: model(ids, cache, pos), args.calls),
                      "blocks_ms": median_ms(lambda: model.hidden(ids, cache, pos), args.calls),
                      "head_ms": median_ms(lambda: model.head(h), args.calls)}
    res["rows"] = per
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))
    rate = native.fma_rate(args.threads) if native.available() else None
    res["macs_per_row"] = macs
    res["fma_rate_per_s"] = rate
    res["extra_row_floor_ms"] = None if rate is None else 1e3 * macs / rate
    one = per[rows[0]]["forward_ms"]
    res["extra_row_ms"] = {T: (v["forward_ms"] - one) / (T - rows[0]) for T, v in per.items() if T != rows[0]}
    res["bandwidth_gbps"] = measure_bandwidth()
    res["end"] = run_end()
    res["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{model.weights} weights, {args.threads} threads, position {n}; an extra row: {macs / 1e6:.0f} M "
          f"multiply-adds, floor {res['extra_row_floor_ms']:.3f} ms at {rate / 1e9:.0f} G/s")
    print(f"{'rows':>4} {'forward':>9} {'x 1 row':>8} {'blocks':>8} {'head':>7} {'ms/extra row':>13}")
    for T, v in per.items():
        extra = res["extra_row_ms"].get(T)
        print(f"{T:>4} {v['forward_ms']:>8.3f}m {v['forward_ms'] / one:>8.2f} {v['blocks_ms']:>8.3f} "
              f"{v['head_ms']:>7.3f} {'' if extra is None else f'{extra:13.3f}'}")
    print(f"-> {args.out}")


def llamacpp(args) -> None:
    import random

    import xllamacpp
    start = run_start()
    lm = m2r2.load(threads=args.threads)
    gguf = lm.source.gguf
    n = args.position
    rows = [int(r) for r in args.rows.split(",")]
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = args.threads
    p.n_ctx = 512
    p.n_parallel = 1
    p.verbosity = 0
    server = xllamacpp.Server(p)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 10000) for _ in range(n)]

    def batch_ms(k: int) -> list[float]:
        """``args.calls`` timings of a k-token batch after the cached prompt (a request whose new tokens llama.cpp
        partly found in its cache, evaluating fewer than k, is not counted)."""
        out = []
        for _ in range(4 * args.calls):
            req = {"prompt": prompt + [rng.randrange(100, 10000) for _ in range(k)], "max_tokens": 1,
                   "temperature": 0.0, "cache_prompt": True, "stream": False}
            t = server.handle_completions(req)["timings"]
            if t["prompt_n"] == k:
                out.append(t["prompt_ms"])
                if len(out) == args.calls:
                    return out
        raise RuntimeError(f"llama.cpp evaluated fewer than {k} new tokens in most requests")

    server.handle_completions({"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "cache_prompt": True,
                               "stream": False})
    per = {}
    for k in rows:
        per[k] = statistics.median(batch_ms(k))
    res = {"command": command_line(), "engine": "llama.cpp (xllamacpp)", "gguf": gguf.name, "position": n,
           "threads": args.threads, "start": start, "batch_ms": per,
           "extra_row_ms": {k: (v - per[rows[0]]) / (k - rows[0]) for k, v in per.items() if k != rows[0]},
           "bandwidth_gbps": measure_bandwidth(), "end": run_end(), "machine": machine_info()}
    out = args.out or "benchmarks/results/verify-rows-llamacpp.json"
    Path(out).write_text(json.dumps(res, indent=1))
    one = per[rows[0]]
    print(f"llama.cpp, {args.threads} threads, position {n}")
    for k, v in per.items():
        print(f"{k:>4} rows: {v:7.3f} ms  ({v / one:.2f}x one row)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
