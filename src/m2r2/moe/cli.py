"""``m2r2 moefy``: build a Mixture-of-Experts from a dense model (MoEfication) and measure its quality."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import float_in, int_at_least, int_list


def cmd_moefy(args: argparse.Namespace) -> int:
    import torch

    import m2r2
    from ..provenance import machine_info, run_start
    from .moefy import MoEfyArtifacts, MoEfyConfig, apply, dense_reference, evaluate, moefy, seen_in_recovery

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lm = m2r2.load(args.model, threads=args.threads)
    top_ks = [int(k) for k in args.eval_top_k.split(",") if k.strip()] if args.eval_top_k else []
    if top_ks:
        run_start()  # the command, commit and machine the quality numbers come from
    # perplexity never on a record a recovery fine-tune trained on (the artifact's own, or --heldout-unseen-by's)
    exclude = set()
    for d in filter(None, [args.artifacts, args.heldout_unseen_by]):
        exclude |= seen_in_recovery(MoEfyArtifacts.load(d, lm.source.identity))
    dense = None
    if top_ks:  # the dense model's outputs and perplexity, before the conversion
        dense = dense_reference(lm, args.data, args.eval_prompts, args.eval_n, args.eval_tokens, exclude=exclude)
        print(f"m2r2 moefy: dense ppl {dense['ppl']}", file=sys.stderr)
    if args.artifacts:
        art = MoEfyArtifacts.load(args.artifacts, lm.source.identity)
    else:
        cfg = MoEfyConfig(num_experts=args.experts, top_k=args.top_k, sequences=args.sequences,
                          max_len=args.max_len, seed=args.seed, ridge=args.ridge)
        art = moefy(lm, args.data, cfg)
        art.info["command"] = " ".join(["m2r2", *sys.argv[1:]])
        art.save(args.out)
        print(f"m2r2 moefy: wrote {args.out}; router top-{args.top_k} recall (held out) "
              f"{sum(art.info['router_topk_recall_heldout']) / len(art.info['router_topk_recall_heldout']):.3f}, "
              f"output fraction {sum(art.info['output_fraction_heldout']) / len(art.info['output_fraction_heldout']):.3f}",
              file=sys.stderr)
    if top_ks:
        moe = apply(lm.model, art, args.expert_format)
        q = evaluate(lm, moe, args.data, top_ks, args.eval_prompts, args.eval_n, args.eval_tokens, dense_ref=dense,
                     exclude=exclude)
        q["ppl_records_excluded_as_trained_on"] = len(exclude)
        q["experts"] = art.spec.num_experts
        q["expert_format"] = moe.spec.expert_format
        q["recovered"] = bool(art.lora)
        if art.lora:
            rec = art.info.get("recovery", {})
            q["recovery"] = {k: rec.get(k) for k in ("steps", "tokens_seen", "wall_seconds", "threads", "command")}
        q["meta"] = machine_info()
        print(json.dumps(q), flush=True)
        if args.quality_out:
            p = Path(args.quality_out)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(q, indent=1) + "\n")
        if not args.artifacts:
            art.info["quality"] = q
            art.save(args.out)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("moefy", help="build a Mixture-of-Experts from the dense model (MoEfication)",
                              description="Cluster each layer's FFN neurons into experts on co-activation over the "
                                          "self-distillation data, fit per-layer routers, and measure quality "
                                          "(perplexity, Rouge-L vs the dense model on MT-Bench).")
    p.add_argument("--data", default="data/distill-smollm2-135m", help="self-distillation data directory")
    p.add_argument("--out", default=None, help="output directory (moe.json, moe.safetensors)")
    p.add_argument("--artifacts", default=None, help="evaluate existing artifacts instead of building new ones")
    p.add_argument("--experts", type=int_at_least("--experts", 2), default=8)
    p.add_argument("--top-k", type=int_at_least("--top-k", 1), default=2, help="default top-k stored in the spec")
    p.add_argument("--sequences", type=int_at_least("--sequences", 1), default=96)
    p.add_argument("--max-len", type=int_at_least("--max-len", 8), default=192)
    p.add_argument("--ridge", type=float_in("--ridge", 0), default=1.0)
    p.add_argument("--eval-top-k", type=int_list("--eval-top-k", 1, text=True), default="",
                   help="comma-separated top-k values to evaluate (e.g. 2,3,4)")
    p.add_argument("--eval-prompts", default="mt-bench")
    p.add_argument("--eval-n", type=int_at_least("--eval-n", 1), default=16)
    p.add_argument("--eval-tokens", type=int_at_least("--eval-tokens", 1), default=64)
    p.add_argument("--quality-out", default=None, help="write the quality JSON here")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=1)
    p.add_argument("--heldout-unseen-by", default=None,
                   help="also keep the records this recovered MoEfication trained on out of the perplexity set (to "
                        "compare a plain MoEfication with its recovered one on the same records)")
    p.add_argument("--expert-format", choices=("f32", "q8_0", "q4_1"), default=None,
                   help="store the experts evaluated as float32, Q8_0 or Q4_1 blocks (default: float32)")
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    p.set_defaults(func=cmd_moefy)
    return p
