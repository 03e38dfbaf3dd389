#!/usr/bin/env python
"""Would int8 *weights* (float32 activations) keep the embedded model's output? A simulation, before
building a kernel for it: every linear weight (LM head included) is rounded to symmetric int8 and back to
float32, and greedy decoding from those weights is compared with the float32 model's on the same prompts.

Schemes: one scale per output channel, and one scale per group of 32 input weights of an output channel
(llama.cpp's Q8_0 grouping). Writes benchmarks/results/int8-fidelity.json.

    python scripts/probe_int8_fidelity.py --limit 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rouge_score import rouge_scorer

import m2r2
from m2r2.provenance import command_line, machine_info, pin_threads
from m2r2.decoding.loop import decode
from m2r2.engine.model import Linear
from m2r2.prompts import load_prompts


def round_to_int8(model, group: int | None) -> None:
    """Replace every linear weight by its int8 rounding (per output channel, or per ``group`` inputs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear):
                w = m.weight.view(m.in_features, m.out_features)  # (in, out): a channel is a column
                g = w.view(-1, group or m.in_features, m.out_features)
                scale = (g.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
                w.copy_((torch.round(g / scale).clamp(-127, 127) * scale).view_as(w))
                m.build_row_layout()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=10, help="first N MT-Bench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/int8-fidelity.json")
    args = ap.parse_args()
    pin_threads(args.threads)
    lm = m2r2.load()
    prompts = [lm.encode(r.text) for r in load_prompts("mt-bench", limit=args.limit)]

    def greedy(model):
        return [decode(model, [p], max_new_tokens=args.max_new_tokens)[0][0] for p in prompts]

    ref = greedy(lm.model)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    res = {"command": command_line(), "machine": machine_info(), "prompts": len(prompts),
           "max_new_tokens": args.max_new_tokens, "schemes": {}}
    for name, group in (("per-channel", None), ("group-32", 32)):
        quant = m2r2.load()
        round_to_int8(quant.model, group)
        out = greedy(quant.model)
        first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), None) for o, r in zip(out, ref)]
        rouge = [scorer.score(lm.decode_text(r), lm.decode_text(o))["rougeL"].fmeasure for o, r in zip(out, ref)]
        res["schemes"][name] = {"identical": sum(o == r for o, r in zip(out, ref)), "rouge_l": sum(rouge) / len(rouge),
                                "first_divergence": first}
        print(f"{name}: {res['schemes'][name]['identical']}/{len(prompts)} identical, Rouge-L "
              f"{res['schemes'][name]['rouge_l']:.3f}, first divergence {first}")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
