"""Summarizing a benchmark's records: ``summarize`` turns the per-(arm, prompt) records into medians,
per-prompt speed ratios and output-equality counts; ``add_rouge_l`` and ``add_near_ties`` qualify the
outputs that differ from the reference arm's (how far they drift, and whether they diverge at a near tie).
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

import torch

from .arms import BenchPrompt


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _group_stats(rows: list[dict], baselines: dict[str, dict[str, dict]]) -> dict:
    tps = [r["tokens_per_s"] for r in rows]
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    passes = [r["forward_passes"] for r in rows]
    out = {
        "n": len(rows), "total_tokens": tokens, "total_seconds": seconds,
        "median_tokens_per_s": statistics.median(tps), "mean_tokens_per_s": statistics.fmean(tps),
        "aggregate_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "tokens_per_forward_pass": (tokens / sum(passes)) if all(p for p in passes) else None,
        "ratios": {},
    }
    # per-token speed after the prompt (engines that report it: m2r2's arms, llama.cpp), and the prompt's time
    dec = [r["extra"]["decode_tokens_per_s"] for r in rows if (r.get("extra") or {}).get("decode_tokens_per_s")]
    pre = [(r.get("extra") or {}).get("prefill_seconds", (r.get("extra") or {}).get("prompt_seconds")) for r in rows]
    if len(dec) == len(rows):
        out["median_decode_tokens_per_s"] = statistics.median(dec)
    if all(p is not None for p in pre):
        out["median_prefill_seconds"] = statistics.median(pre)
    for base, by_prompt in baselines.items():
        if rows[0]["arm"] == base:
            continue
        # per prompt first (same prompt, same machine moment), then aggregated
        ratios = [r["tokens_per_s"] / by_prompt[r["prompt_id"]]["tokens_per_s"] for r in rows
                  if r["prompt_id"] in by_prompt and by_prompt[r["prompt_id"]]["tokens_per_s"] > 0
                  and r["tokens_per_s"] > 0]
        if ratios:
            out["ratios"][base] = {"geomean": geomean(ratios), "median": statistics.median(ratios), "n": len(ratios)}
        dec_ratios = [r["extra"]["decode_tokens_per_s"] / by_prompt[r["prompt_id"]]["extra"]["decode_tokens_per_s"]
                      for r in rows if r["prompt_id"] in by_prompt
                      and (r.get("extra") or {}).get("decode_tokens_per_s")
                      and (by_prompt[r["prompt_id"]].get("extra") or {}).get("decode_tokens_per_s")]
        if dec_ratios and len(dec_ratios) == len(rows):
            out["ratios"][base]["decode_geomean"] = geomean(dec_ratios)
    return out


def _equality(rows: list[dict], ref: dict[str, dict]) -> dict:
    compared, identical, mismatches = 0, 0, []
    for r in rows:
        other = ref.get(r["prompt_id"])
        if r["token_ids"] is None or other is None or other["token_ids"] is None:
            continue
        compared += 1
        diff = first_difference(r["token_ids"], other["token_ids"])
        if diff is None:
            identical += 1
        else:
            mismatches.append({"prompt_id": r["prompt_id"], "first_diff": diff,
                               "tokens": len(r["token_ids"]), "reference_tokens": len(other["token_ids"])})
    return {"compared": compared, "identical": identical, "mismatches": mismatches}


def summarize(records: Sequence[dict], baseline_arm: str, *, reference_arm: str | None = None,
              also_against: Sequence[str] = (), roofline_tokens_per_s: float | None = None,
              arm_rooflines: Mapping[str, float] | None = None) -> dict:
    """Per arm, overall and per category: median/mean tokens/s, total tokens / total seconds, speed ratio
    to ``baseline_arm`` (and to each of ``also_against``) computed per prompt then geometric-mean and
    median; tokens per forward pass; fraction of the roofline (``arm_rooflines`` overrides it for arms
    that read a different number of bytes per token, e.g. a quantised GGUF); and, where both arms
    returned token ids, how many outputs equal ``reference_arm``'s."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    categories = list(dict.fromkeys(r["category"] for r in records))
    baselines = {b: {r["prompt_id"]: r for r in records if r["arm"] == b}
                 for b in dict.fromkeys([baseline_arm, *also_against]) if b in arms}
    ref = {r["prompt_id"]: r for r in records if r["arm"] == reference_arm} if reference_arm in arms else None
    summary: dict = {"baseline_arm": baseline_arm, "also_against": list(also_against),
                     "reference_arm": reference_arm, "roofline_tokens_per_s": roofline_tokens_per_s,
                     "categories": categories, "arms": {}}
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        entry = {"kind": rows[0]["kind"], "all": _group_stats(rows, baselines), "by_category": {}}
        for c in categories:
            crow = [r for r in rows if r["category"] == c]
            if crow:
                entry["by_category"][c] = _group_stats(crow, baselines)
        roof = (arm_rooflines or {}).get(arm, roofline_tokens_per_s)
        entry["roofline_tokens_per_s"] = roof
        entry["roofline_fraction"] = entry["all"]["median_tokens_per_s"] / roof if roof else None
        if ref is not None and arm != reference_arm:
            entry["equality"] = _equality(rows, ref)
        summary["arms"][arm] = entry
    return summary


def output_text(lm, ids: list[int]) -> str:
    """An output's text for Rouge-L; without a tokenizer, its token ids as words."""
    t = lm.decode_text(ids)
    return t if t is not None else " ".join(map(str, ids))


def rouge_l(scorer, ref_text: str, text: str, ref_ids: Sequence[int] | None = None,
            ids: Sequence[int] | None = None) -> float:
    """Rouge-L F-measure of ``text`` against ``ref_text``, such that identical outputs score exactly 1.0:
    identical token ids (or identical texts) short-circuit to 1.0, and where ``rouge-score``'s tokenizer
    leaves no word in either text (all emoji, say, which it drops) the score is taken on the token ids
    as words (token-id level) instead of scoring 0."""
    if (ids is not None and ref_ids is not None and list(ids) == list(ref_ids)) or text == ref_text:
        return 1.0
    from rouge_score import tokenize
    words = tokenize.tokenize(ref_text, None) and tokenize.tokenize(text, None)
    if ids is not None and ref_ids is not None and not words:
        ref_text, text = " ".join(map(str, ref_ids)), " ".join(map(str, ids))
    return scorer.score(ref_text, text)["rougeL"].fmeasure


def add_rouge_l(summary: dict, records: list[dict], lm) -> None:
    """Mean Rouge-L (``rouge-score``, via ``rouge_l``) of each arm's output text against the reference arm's,
    per prompt, into ``summary["arms"][arm]["rouge_l"]``: how far a lossy arm's output drifts, where token
    equality only says that it does."""
    from rouge_score import rouge_scorer

    ref_arm = summary.get("reference_arm")
    ref = {r["prompt_id"]: r["token_ids"] for r in records if r["arm"] == ref_arm and r.get("token_ids") is not None}
    if not ref:
        return
    ref_text = {pid: output_text(lm, ids) for pid, ids in ref.items()}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for arm, e in summary["arms"].items():
        rows = [r for r in records if r["arm"] == arm and r.get("token_ids") is not None and r["prompt_id"] in ref]
        if arm != ref_arm and rows:
            e["rouge_l"] = statistics.fmean(
                rouge_l(scorer, ref_text[r["prompt_id"]], output_text(lm, r["token_ids"]), ref[r["prompt_id"]],
                        r["token_ids"]) for r in rows)


NEAR_TIE_FACTOR = 4.0


def top2_gaps(hf_dir, contexts: Sequence[Sequence[int]]) -> list[dict]:
    """For each context (prompt + the reference output up to the first differing token), the reference
    model's top-2 logit gap at the next position in float64 (transformers, the same weights), and the
    float32 rounding noise there: the largest |float32 - float64| logit of that model, measured."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = []
    models = {dt: AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt).eval()
              for dt in (torch.float64, torch.float32)}
    with torch.inference_mode():
        for ctx in contexts:
            ids = torch.tensor([list(ctx)], dtype=torch.long)
            l64 = models[torch.float64](ids).logits[0, -1]
            l32 = models[torch.float32](ids).logits[0, -1].double()
            top = torch.topk(l64, 2).values
            out.append({"gap": float(top[0] - top[1]), "float32_noise": float((l32 - l64).abs().max())})
    return out


def add_near_ties(summary: dict, records: list[dict], prompts: Sequence[BenchPrompt], lm) -> None:
    """Give every output that differs from the reference arm's the reference model's top-2 logit gap at the
    first differing position (``top2_gaps``; float64), and count it as a *near-tie divergence* when that gap
    is below ``NEAR_TIE_FACTOR`` times the measured float32 noise there. Why that bound: two float32
    implementations (different kernels, summation orders) each land within about the noise of the exact
    logits, so their difference reaches up to twice it, and the other implementation's noise is not the one
    measured (another factor 2); a divergence at a gap that small is an argmax flip between nearly equal
    tokens, not a defect. Exact identity stays ``equality.identical``; this is the separate allowance,
    ``equality.near_ties``. Runs after the benchmark, in this process (the workers are gone by then)."""
    ref_arm = summary.get("reference_arm")
    ref = {r["prompt_id"]: r for r in records if r["arm"] == ref_arm}
    by_id = {p.id: p for p in prompts}
    todo: dict[tuple[str, int], list[dict]] = {}
    for e in summary["arms"].values():
        eq = e.get("equality")
        if not eq:
            continue
        eq["near_ties"] = 0
        for m in eq["mismatches"]:
            r = ref.get(m["prompt_id"])
            # a prefix of the other's output (one stopped early) has no differing position to explain
            if r is None or m["first_diff"] >= len(r["token_ids"]) or m["first_diff"] >= m["tokens"]:
                continue
            todo.setdefault((m["prompt_id"], m["first_diff"]), []).append(m)
    if not todo:
        return
    keys = list(todo)
    gaps = top2_gaps(lm.source.hf_dir, [list(by_id[pid].token_ids) + ref[pid]["token_ids"][:d] for pid, d in keys])
    for key, g in zip(keys, gaps):
        for m in todo[key]:
            m["top2_gap"], m["float32_noise"] = g["gap"], g["float32_noise"]
            m["near_tie"] = g["gap"] < NEAR_TIE_FACTOR * g["float32_noise"]
    for e in summary["arms"].values():
        eq = e.get("equality")
        if eq:
            eq["near_ties"] = sum(bool(m.get("near_tie")) for m in eq["mismatches"])
    summary["near_tie_rule"] = (f"top-2 logit gap of the reference model (float64) at the first differing token "
                                f"< {NEAR_TIE_FACTOR:g} x its measured float32 logit noise there")
