#!/usr/bin/env python
"""Decoding speed alone and with other m2r2 processes at once, per OpenMP wait policy: ``m2r2 generate
PROMPT --json`` started ``--concurrency`` times together (each its own process, ``--threads`` threads),
tokens/s (end to end and decode-only) of each, median over ``--repeats`` rounds; policies alternate
within a round so machine noise hits all alike.

    python scripts/probe_concurrency.py --policies m2r2 m2r2+fixed gomp-default+fixed --repeats 5

A policy is ``m2r2`` (what m2r2 does by itself: nothing passed) or parts joined by ``+``: ``gomp-default``
(libgomp's own default, GOMP_SPINCOUNT=300000), ``passive`` (OMP_WAIT_POLICY=passive), ``spin=N``
(GOMP_SPINCOUNT=N), ``fixed`` (M2R2_ADAPT_THREADS=0: no thread governor). ``gomp-default+fixed`` is
m2r2 before the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from m2r2.provenance import command_line, machine_info, pin_threads, run_end, run_start


def policy_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "M2R2_ADAPT_THREADS")}
    for part in policy.split("+"):
        if part == "gomp-default":
            env["GOMP_SPINCOUNT"] = "300000"
        elif part == "passive":
            env["OMP_WAIT_POLICY"] = "passive"
        elif part.startswith("spin="):
            env["GOMP_SPINCOUNT"] = part.split("=", 1)[1]
        elif part == "fixed":
            env["M2R2_ADAPT_THREADS"] = "0"
        elif part != "m2r2":
            raise SystemExit(f"unknown policy part {part!r}")
    return env


def run_round(policy: str, n: int, args) -> list[dict]:
    """Start ``n`` generations together; their stats (tokens/s end to end and decode-only)."""
    cmd = ["m2r2", "generate", args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--json",
           "--threads", str(args.threads)]
    procs = [subprocess.Popen(cmd, env=policy_env(policy), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise SystemExit(f"m2r2 generate failed ({policy}, {n} at once)")
        s = json.loads(stdout.strip().splitlines()[-1])["stats"]
        out.append({"tokens_per_s": s["tokens_per_s"], "decode_tokens_per_s": s["decode_tokens_per_s"],
                    "new_tokens": s["new_tokens"], "thread_changes": s.get("thread_changes")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", nargs="+", default=["m2r2", "gomp-default+fixed", "spin=1000+fixed", "passive+fixed"])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--prompt", default="Name three rivers.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default="benchmarks/results/concurrency.json")
    args = ap.parse_args()
    pin_threads(args.threads)
    run_start()  # commit, dirty state, load and bandwidth before anything runs
    runs: dict[str, dict[str, list[dict]]] = {p: {"alone": [], "together": []} for p in args.policies}
    run_round(args.policies[0], 1, args)  # warm-up: kernel build, page cache
    for r in range(args.repeats):
        for policy in args.policies:
            runs[policy]["alone"] += run_round(policy, 1, args)
            runs[policy]["together"] += run_round(policy, args.concurrency, args)
            print(f"round {r + 1}: {policy}: alone {runs[policy]['alone'][-1]['decode_tokens_per_s']:.1f}, "
                  f"together {[round(x['decode_tokens_per_s'], 1) for x in runs[policy]['together'][-2:]]} "
                  "decode tokens/s", file=sys.stderr, flush=True)
    summary = {}
    for policy, d in runs.items():
        row = {}
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            alone = statistics.median(x[key] for x in d["alone"])
            together = statistics.median(x[key] for x in d["together"])
            row[key] = {"alone": alone, "together": together, "kept": together / alone}
        summary[policy] = row
        print(f"{policy:>14}: decode alone {row['decode_tokens_per_s']['alone']:6.1f}  together "
              f"{row['decode_tokens_per_s']['together']:6.1f} tokens/s each ({row['decode_tokens_per_s']['kept']:.0%} "
              f"kept); end to end alone {row['tokens_per_s']['alone']:.1f}, together {row['tokens_per_s']['together']:.1f}")
    run_end()
    doc = {"command": command_line(), "machine": machine_info(),
           "concurrency": args.concurrency, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
           "threads": args.threads, "repeats": args.repeats, "runs": runs, "summary": summary}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
