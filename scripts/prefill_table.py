"""Prefill time by prompt length from a `m2r2 bench decode --max-new-tokens 1` run on
benchmarks/results/prefill-prompt-ids.jsonl (benchmarks/results/prefill.json): per arm and length, the median
prompt time (m2r2: its prefill; llama.cpp: its prompt processing; transformers: the whole 1-token call) and the
prompt tokens per second. Writes benchmarks/results/prefill-by-length.md.

    python scripts/prefill_table.py
"""

import collections
import json
import statistics

d = json.load(open("benchmarks/results/prefill.json"))
by = collections.defaultdict(list)
for r in d["records"]:
    ex = r.get("extra") or {}
    p = ex.get("prefill_seconds", ex.get("prompt_seconds"))
    by[(r["arm"], r["category"])].append((r["seconds"] if p is None else p, r["prompt_tokens"]))
arms = list(dict.fromkeys(r["arm"] for r in d["records"]))
cats = list(dict.fromkeys(r["category"] for r in d["records"]))
m = d["meta"]
lines = ["# Prefill by prompt length", "",
         f"From `benchmarks/results/prefill.json` (command `{m['command']}`, commit {m['git_commit'][:7]}, "
         f"{'dirty' if m['git_dirty'] else 'clean'} tree, load {m['start']['loadavg'][0]:.2f} and bandwidth "
         f"{m['start']['bandwidth_gbps']:.1f} GB/s at the start): median prompt time in ms (prompt tokens/s), 5 "
         "prompts per length, 2 threads. m2r2: its prefill; llama.cpp: its prompt processing; transformers: the "
         "whole call generating 1 token.", "",
         "| prompt | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
for c in cats:
    cells = []
    for a in arms:
        v = by[(a, c)]
        p = statistics.median(x[0] for x in v)
        cells.append(f"{p * 1e3:.0f} ({v[0][1] / p:.0f}/s)")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
open("benchmarks/results/prefill-by-length.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
