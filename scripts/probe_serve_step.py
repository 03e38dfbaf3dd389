"""Where a batched server step's time goes (in-process, no HTTP): the model's cost for N decode rows (blocks + the
LM head as the batcher computes it), and the batcher over 32 MT-Bench prompts x 128 tokens at 1 and 8 slots, with
the share spent prefilling new requests. Writes benchmarks/results/serve-step.json.

    python scripts/probe_serve_step.py
"""

import json
import time

import torch

import m2r2
from m2r2.provenance import machine_info, run_end, run_start
from m2r2.serving.batcher import Batcher, Request, head_rows


def model_rows(lm, rows=(1, 2, 4, 8, 16), repeats=20) -> dict:
    m, out = lm.model, {}
    for n in rows:
        cache = m.new_cache(n, 1024)
        ids, pos = torch.full((n, 1), 100), (torch.arange(n) * 7 + 40).view(-1, 1)
        with torch.inference_mode():
            for _ in range(3):
                head_rows(m, m.hidden(ids, cache, pos))
            t = time.perf_counter()
            for _ in range(repeats):
                head_rows(m, m.hidden(ids, cache, pos))
        out[n] = (time.perf_counter() - t) / repeats * 1000
    return {str(n): {"ms": v, "x_one_row": v / out[1]} for n, v in out.items()}


def batcher(lm, slots: int, prompts) -> dict:
    b = Batcher(lm, parallel=slots)
    toks = [0]
    for p in prompts:
        b.submit(Request(p, max_tokens=128), lambda ev: toks.__setitem__(0, toks[0] + len(ev.token_ids)))
    prefill = [0.0]
    orig = b._prefill_chunk

    def timed(s):
        t = time.perf_counter()
        orig(s)
        prefill[0] += time.perf_counter() - t
    b._prefill_chunk = timed
    t0 = time.perf_counter()
    with torch.inference_mode():
        while b.active() or b.queued():
            b._step()
    dt = time.perf_counter() - t0
    return {"slots": slots, "tokens": toks[0], "steps": b.steps, "seconds": dt, "tokens_per_s": toks[0] / dt,
            "ms_per_step": dt / b.steps * 1000, "prefill_seconds": prefill[0], "prefill_share": prefill[0] / dt,
            "prefill_ms_per_request": prefill[0] / len(prompts) * 1000}


def main():
    start = run_start()
    lm = m2r2.load(threads=2)
    qs = [json.loads(line) for line in open(m2r2.__path__[0] + "/data/mt_bench_questions.jsonl")][:32]
    prompts = [lm.encode(q["turns"][0]) for q in qs]
    doc = {"benchmark": "serve-step", "meta": {**machine_info(), "start": start},
           "model_rows": model_rows(lm), "batcher": [batcher(lm, 1, prompts), batcher(lm, 8, prompts)]}
    doc["meta"]["end"] = run_end()
    with open("benchmarks/results/serve-step.json", "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: doc[k] for k in ("model_rows", "batcher")}, indent=1))


if __name__ == "__main__":
    main()
