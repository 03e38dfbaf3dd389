"""Token-id prompts of exactly 36, 128 and 512 tokens (5 each) for the prefill benchmark, cut from the MT-Bench
first turns (several joined where one is too short), written to benchmarks/results/prefill-prompt-ids.jsonl:

    python scripts/make_prefill_prompts.py
    m2r2 bench decode --prompt-ids benchmarks/results/prefill-prompt-ids.jsonl --max-new-tokens 1 ...

(category = the prompt length, so the benchmark's per-category table is per length)."""

import json

import m2r2
from m2r2.prompts import load_prompts

lm = m2r2.load()
texts = [r.text for r in load_prompts("mt-bench")]
stream = []
for t in texts:
    stream += lm.encode(t, chat=False)
out, at = [], 0
for n in (36, 128, 512):
    for i in range(5):
        ids = stream[at:at + n]
        at += n
        out.append({"id": f"len{n}-{i}", "category": f"{n} tokens", "token_ids": ids})
with open("benchmarks/results/prefill-prompt-ids.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
print(len(out), "prompts,", at, "tokens used of", len(stream))
