#!/usr/bin/env python
"""Where a decode step's time goes on this machine, for the plain-decoding and verification cost claims.

Measures, on the embedded model at a fixed cache position (median of repeated calls, threads pinned):

* a full forward of 1 token (a plain decode step, through the native kernels when they are built) and of
  2, 3, 5, 9 tokens (a speculative verification of 1, 2, 4, 8 drafts): the verify-cost ratios that decide
  speculative decoding;
* the 1-token forward on the PyTorch path (native kernels off), and the same with every matrix product
  replaced by an empty output of the right shape: the time of everything else there (norms, RoPE, cache
  writes, attention, residuals, dispatch), which the native block kernel folds into one call;
* the LM head alone; the memory bandwidth (the harness's copy test) and so the matmul share's GB/s;
* the 1-token forward and the head from the fp16 and int8 weight copies (``--lowp``; the draft cost of
  ``quant-draft`` and the speed of ``load(weights=...)``).

Writes benchmarks/results/decode-cost.json and prints a table.

    python scripts/probe_decode_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import m2r2
from m2r2.engine import native
from m2r2.provenance import command_line, machine_info, measure_bandwidth, pin_threads, run_end, run_start
from m2r2.engine.model import Linear


def median_ms(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    per_round = []
    for _ in range(rounds):
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        per_round.append(statistics.median(ts))
    return 1e3 * statistics.median(per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position", type=int, default=160, help="cache position of the measured token(s)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--lowp", action="store_true", help="also time the fp16 and int8 weight copies")
    ap.add_argument("--out", default="benchmarks/results/decode-cost.json")
    args = ap.parse_args()
    pin_threads(args.threads)
    run_start()  # commit, dirty state, load and bandwidth before anything runs
    lm = m2r2.load(threads=args.threads)
    model = lm.model
    n = args.position
    cache = model.new_cache(1, n + 16)
    res: dict = {"command": command_line(), "machine": machine_info(), "position": n, "threads": args.threads}
    with torch.inference_mode():
        ids = torch.randint(100, 10000, (1, n))
        model(ids, cache, torch.arange(n).view(1, -1))
        cache.advance(n)

        def fwd(T):
            x, pos = torch.full((1, T), 5), (n + torch.arange(T)).view(1, -1)
            return lambda: model(x, cache, pos)

        res["forward_ms"] = {T: median_ms(fwd(T), args.calls) for T in (1, 2, 3, 5, 9)}
        h = torch.randn(1, 1, model.cfg.hidden_size)
        res["head_ms"] = median_ms(lambda: model.head(h), args.calls)
        res["native_kernels"] = native.available()
        with native.disabled():
            res["forward_ms_torch"] = median_ms(fwd(1), args.calls)
            real = Linear.forward
            Linear.forward = lambda self, x: x.new_empty(*x.shape[:-1], self.out_features)
            try:
                res["forward_no_matmul_ms"] = median_ms(fwd(1), args.calls)
            finally:
                Linear.forward = real
        for kind in ("fp16", "int8") if args.lowp else ():
            with model.use_weights(kind):
                res[f"forward_ms_{kind}"] = median_ms(fwd(1), args.calls)
                res[f"head_ms_{kind}"] = median_ms(lambda: model.head(h), args.calls)
    res["bandwidth_gbps"] = measure_bandwidth()
    weights_mb = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear)) * 4 / 1e6
    f1 = res["forward_ms"][1]
    matmul_ms = res["forward_ms_torch"] - res["forward_no_matmul_ms"]  # on the PyTorch path
    res["linear_weights_mb"] = weights_mb
    res["matmul_ms"] = matmul_ms
    res["matmul_gbps"] = weights_mb / matmul_ms
    res["forward_gbps"] = weights_mb / f1  # the whole one-token step, as weight bytes over its time
    res["verify_cost"] = {T: v / f1 for T, v in res["forward_ms"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run_end()
    res["machine"] = machine_info()  # with start and end conditions
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"threads {args.threads}, position {n}, bandwidth {res['bandwidth_gbps']:.1f} GB/s")
    for T, v in res["forward_ms"].items():
        print(f"forward {T} token(s): {v:6.2f} ms  ({v / f1:.2f}x one token)")
    print(f"1 token {'native' if res['native_kernels'] else 'PyTorch'}: {f1:.2f} ms = {res['forward_gbps']:.1f} GB/s "
          f"of weights; LM head alone {res['head_ms']:.2f} ms")
    print(f"1 token on the PyTorch path: {res['forward_ms_torch']:.2f} ms, of which matmuls {matmul_ms:.2f} ms "
          f"= {res['matmul_gbps']:.1f} GB/s over {weights_mb:.0f} MB and the rest {res['forward_no_matmul_ms']:.2f} ms")
    for kind in ("fp16", "int8") if args.lowp else ():
        v = res[f"forward_ms_{kind}"]
        print(f"{kind} weights: forward 1 token {v:.2f} ms ({v / f1:.2f}x float32), "
              f"LM head {res[f'head_ms_{kind}']:.2f} ms")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
