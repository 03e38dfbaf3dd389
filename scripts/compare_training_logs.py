#!/usr/bin/env python
"""Two adapter trainings on the same batches, compared step by step: the mean distillation KL and the fast
stream's top-1 agreement with the model (its last layer) over windows of steps, from each run's train_log.jsonl.
Runs with the same data, seed and batch size see the same batches at every step, so the difference is the change
between them (here: a fast stream that sees the slow stream's previous final state, or not).

    python scripts/compare_training_logs.py runs/r2-ft120-plain runs/r2-ft120-sees \\
        --out benchmarks/results/m2r2-eagle-training.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from m2r2.provenance import command_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs=2)
    ap.add_argument("--windows", default="0,20,60,100,120")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    edges = [int(x) for x in args.windows.split(",")]
    logs = {r: [json.loads(line) for line in (Path(r) / "train_log.jsonl").read_text().splitlines()] for r in args.runs}
    meta = {r: json.loads((Path(r) / "adapter.json").read_text())["training"] for r in args.runs}
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        row = {"steps": f"{lo + 1}-{hi}"}
        for r, log in logs.items():
            win = [e for e in log if lo < e["step"] <= hi]
            last = str(max(int(k) for k in win[0]["agree"]))
            row[r] = {"kl": statistics.fmean(e["kl"] for e in win),
                      "agree": statistics.fmean(e["agree"][last] for e in win)}
        rows.append(row)
    res = {"command": command_line(), "runs": {r: {k: meta[r][k] for k in ("command", "steps", "tokens_seen",
                                                                          "wall_seconds")} for r in args.runs},
           "windows": rows}
    Path(args.out).write_text(json.dumps(res, indent=1))
    a, b = args.runs
    print(f"{'steps':>8} {'KL ' + Path(a).name:>22} {'KL ' + Path(b).name:>22} {'agree':>7} {'agree':>7}")
    for row in rows:
        print(f"{row['steps']:>8} {row[a]['kl']:>22.3f} {row[b]['kl']:>22.3f} {row[a]['agree']:>7.3f} "
              f"{row[b]['agree']:>7.3f}")


if __name__ == "__main__":
    main()
