#!/usr/bin/env python
"""Batched greedy decoding of the embedded model with and without the native kernels: the first
``--batch`` MT-Bench prompts in one ``lm.generate(prompts=...)`` call (a ragged batch), total new tokens
over wall time, median of ``--repeats`` alternating runs per path, outputs compared.

    python scripts/probe_batch_decode.py --batch 1 4 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import m2r2
from m2r2.engine import native
from m2r2.provenance import command_line, machine_info, pin_threads, run_end, run_start
from m2r2.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/batch-decode.json")
    args = ap.parse_args()
    pin_threads(args.threads)
    run_start()  # commit, dirty state, load and bandwidth before anything runs
    lm = m2r2.load(threads=args.threads)
    texts = [r.text for r in load_prompts("mt-bench", limit=max(args.batch))]
    lm.generate(prompts=texts[:2], max_new_tokens=8)  # warm-up (and the kernels' build)
    res = {"command": command_line(), "machine": machine_info(), "native_kernels": native.available(),
           "max_new_tokens": args.max_new_tokens, "batches": {}}
    for B in args.batch:
        speeds: dict[str, list[float]] = {"native": [], "torch": []}
        outputs = {}
        for _ in range(args.repeats):
            for path in ("native", "torch"):
                prev = native.set_enabled(path == "native")
                try:
                    t0 = time.perf_counter()
                    outs = lm.generate(prompts=texts[:B], max_new_tokens=args.max_new_tokens, temperature=0.0)
                    seconds = time.perf_counter() - t0
                finally:
                    native.set_enabled(prev)
                speeds[path].append(sum(len(o.token_ids) for o in outs) / seconds)
                outputs[path] = [o.token_ids for o in outs]
        row = {p: statistics.median(v) for p, v in speeds.items()}
        row["ratio"] = row["native"] / row["torch"]
        row["identical"] = sum(a == b for a, b in zip(outputs["native"], outputs["torch"]))
        res["batches"][B] = row
        print(f"batch {B}: native {row['native']:.1f} tokens/s, PyTorch path {row['torch']:.1f} "
              f"({row['ratio']:.2f}x), {row['identical']}/{B} outputs identical")
    run_end()
    res["machine"] = machine_info()  # with start and end conditions
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
