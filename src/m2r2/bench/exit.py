"""``m2r2 bench exit``: early-exit methods as quality-speed curves, on the same prompts, in one run.

Each method is swept over its threshold; every (method, threshold, K/V policy) point is an arm of the
shared harness, next to m2r2's plain greedy decoding (the reference output and the speed baseline). Per
point: Rouge-L of the output against the full model's own greedy output (``rouge-score``), mean slow
layers per token, the theoretical speedup from layers saved (L / mean layers), and the measured
wall-clock speedup over plain decoding (per prompt, geometric mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ..decoding import registry
from ..errors import M2R2Error
from ..engine.threads import available_cpus
from ..provenance import pin_threads, roofline, run_end, run_start
from .args import add_common_args, build_prompts
from .arms import ArmResult, ArmSpec, ArmUnavailable, BenchPrompt, worker_lm
from .report import write_results
from .runner import run_benchmark
from .stats import output_text, rouge_l, summarize

METHODS = ("calm", "calm-adapter", "m2r2-exit", "m2r2-exit-conf", "skipdecode", "mod")
EXTRA_METHODS = ("m2r2-exit-alone",)  # m2r2-exit without the slow row riding along (an ablation)
DEFAULT_THRESHOLDS = (0.95, 0.8, 0.6, 0.4)


def point_name(method: str, threshold: float | None, kv: str) -> str:
    return "plain" if method == "plain" else f"{method}@{threshold:g}/{kv}"


class ExitArm:
    kind = "m2r2"

    def __init__(self, lm, method: str, threshold: float | None, kv: str, adapter: str | None = None,
                 span: int = 64, routers: str | None = None):
        self.lm, self.method, self.threshold, self.kv, self.adapter = lm, method, threshold, kv, adapter
        self.routers = routers
        self.span = span
        self.name = point_name(method, threshold, kv)
        self.strategy = None

    def setup(self) -> None:
        try:
            if self.method == "plain":
                opts = {}
            elif self.method == "skipdecode":  # its sweep parameter: the depth at the end of the span
                opts = {"min_layers": int(self.threshold), "span": self.span}
            elif self.method == "mod":  # its sweep parameter: the fraction of tokens each routed block skips
                opts = {"skip": self.threshold, "routers": self.routers}
            else:  # the adapter goes to the methods that take one (calm runs on the model's own layers)
                opts = {"threshold": self.threshold, "kv": self.kv}
                takes = {f.name for f in registry.get(self.method.replace("-alone", "")).option_fields()}
                if "adapter" in takes:
                    opts["adapter"] = self.adapter
            if self.method == "m2r2-exit-alone":
                self.strategy = self.lm.strategy("m2r2-exit", ride=False, **opts)
            else:
                self.strategy = self.lm.strategy(self.method, **opts)
        except M2R2Error as e:
            raise ArmUnavailable(str(e)) from None

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        t0 = time.perf_counter()
        out = self.lm.generate(list(prompt.token_ids), max_new_tokens=max_new_tokens, strategy=self.strategy)
        s = out.stats
        return ArmResult(len(out.token_ids), time.perf_counter() - t0, out.token_ids, s.forward_passes,
                         {"strategy": s.extra} if s.extra else {})

    def close(self) -> None:
        pass


def make_arm(model: str | None, method: str, threshold: float | None, kv: str, adapter: str | None = None,
             span: int = 64, routers: str | None = None) -> ExitArm:
    """Build one sweep point on its own copy of the model (``worker_lm``): runs inside the arm's worker."""
    return ExitArm(worker_lm(model), method, threshold, kv, adapter, span, routers)


def arm_spec(model: str | None, method: str, threshold: float | None, kv: str, **kw) -> ArmSpec:
    """A sweep point's description. All points share one worker process and one model (``group``): they
    are one engine (m2r2's), as many as 40, and a model copy each would not fit in memory."""
    return ArmSpec(point_name(method, threshold, kv), "m2r2", make_arm,
                   {"model": model, "method": method, "threshold": threshold, "kv": kv, **kw}, group="exit-points")


def curves(records: list[dict], lm, summary: dict, references: dict[str, str] | None = None) -> dict:
    """Per arm: Rouge-L against the plain output (mean over prompts) and, over the prompts that have a
    reference answer, against it (``rouge_l_reference``; plain decoding's own score is the ceiling to
    read it against), mean slow layers per token, theoretical and measured speedup."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    ref_ids = {r["prompt_id"]: r["token_ids"] for r in records if r["arm"] == "plain"}
    ref = {pid: output_text(lm, ids) for pid, ids in ref_ids.items()}
    L = lm.config.num_layers
    references = references or {}
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        rows = [r for r in records if r["arm"] == arm]
        with_ref = [r for r in rows if r["prompt_id"] in references]
        vs_ref = statistics.fmean(rouge_l(scorer, references[r["prompt_id"]], output_text(lm, r["token_ids"]))
                                  for r in with_ref) if with_ref else None
        if arm == "plain":
            out["plain"] = {"method": "plain", "threshold": 0.0, "kv": "", "rouge_l": 1.0,
                            "rouge_l_reference": vs_ref, "n_reference": len(with_ref), "mean_slow_layers": float(L),
                            "theoretical_speedup": 1.0, "measured_speedup": 1.0, "exit_rate": 0.0}
            continue
        rouge = [rouge_l(scorer, ref[r["prompt_id"]], output_text(lm, r["token_ids"]), ref_ids[r["prompt_id"]],
                         r["token_ids"]) for r in rows]
        st = [r["extra"].get("strategy", {}) for r in rows]
        toks = sum(s.get("tokens", 0) for s in st)
        layers = sum(s.get("mean_slow_layers", 0) * s.get("tokens", 0) for s in st) / toks if toks else float(L)
        measured = summary["arms"][arm]["all"]["ratios"].get("plain", {}).get("geomean")
        method, rest = arm.split("@")
        thr, kv = rest.split("/")
        out[arm] = {"method": method, "threshold": float(thr), "kv": kv, "rouge_l": statistics.fmean(rouge),
                    "rouge_l_reference": vs_ref, "n_reference": len(with_ref),
                    "mean_slow_layers": layers, "theoretical_speedup": L / layers if layers else None,
                    "measured_speedup": measured,
                    "exit_rate": sum(s.get("exited", 0) for s in st) / toks if toks else 0.0}
    return out


def references(args, prompts) -> dict[str, str]:
    """Reference answers of the benchmarked prompts, where their set has them (by prompt id)."""
    if args.prompt_ids:
        return {}
    from ..prompts import load_prompts
    ids = {p.id for p in prompts}
    out = {}
    for r in load_prompts(args.prompts, limit=args.limit):
        if r.id in ids and r.reference:
            out[r.id] = r.reference
    return out


def render(curve: dict, path: Path, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict = {}
    for arm, c in curve.items():
        if arm == "plain":
            continue
        groups.setdefault(f"{c['method']} ({c['kv']})", []).append(c)
    for label, pts in groups.items():
        pts = sorted(pts, key=lambda c: c["measured_speedup"] or 0)
        ax.plot([c["measured_speedup"] for c in pts], [c["rouge_l"] for c in pts], marker="o", label=label)
        for c in pts:
            ax.annotate(f"{c['threshold']:g}", (c["measured_speedup"], c["rouge_l"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("measured speedup over plain decoding (geomean per prompt)")
    ax.set_ylabel("Rouge-L vs the full model's greedy output")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    rows = ["| point | Rouge-L vs full model | Rouge-L vs reference | mean slow layers | theoretical speedup | "
            "measured speedup | exit rate |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, c in curve.items():
        vr = "-" if c.get("rouge_l_reference") is None else f"{c['rouge_l_reference']:.3f} ({c['n_reference']})"
        rows.append(f"| {arm} | {c['rouge_l']:.3f} | {vr} | {c['mean_slow_layers']:.1f} | {c['theoretical_speedup']:.2f} | "
                    f"{c['measured_speedup']:.2f} | {c['exit_rate']:.2f} |")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    import m2r2

    args.threads = pin_threads(args.threads or available_cpus())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad:
        raise M2R2Error(f"unknown method(s) {', '.join(bad)} (available: {', '.join(METHODS + EXTRA_METHODS)})")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise M2R2Error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    if not thresholds or any(not t > 0 for t in thresholds):
        raise M2R2Error("--thresholds must be numbers > 0")
    kvs = [k.strip() for k in args.kv.split(",") if k.strip()]
    if any(k not in ("recompute", "propagate") for k in kvs) or not kvs:
        raise M2R2Error("--kv takes recompute and/or propagate")
    start = run_start(args.bandwidth_mb)
    # this process only tokenizes and scores: every sweep point loads the model in its own worker
    lm = m2r2.load(args.model, dtype="float32")
    prompts, warm = build_prompts(lm, args)
    m_ = args.model
    arms = [arm_spec(m_, "plain", None, "")] + [arm_spec(m_, m, t, k, adapter=args.adapter) for m in methods
                                                if m not in ("skipdecode", "mod") for k in kvs for t in thresholds]
    if "skipdecode" in methods:
        arms += [arm_spec(m_, "skipdecode", d, "none", span=args.max_new_tokens) for d in args.skip_min_layers]
    if "mod" in methods:  # skipped blocks still write K/V from their input state: "kvproj"
        arms += [arm_spec(m_, "mod", s, "kvproj", routers=args.mod_routers) for s in args.mod_skip]
    bandwidth = start["bandwidth_gbps"]
    roof = roofline(lm.config, bandwidth, 4.0)
    print(f"m2r2 bench exit: {lm!r}; {len(prompts)} prompts, {len(arms)} arms, {args.threads} threads",
          file=sys.stderr)
    skipped: dict[str, str] = {}
    records = run_benchmark(arms, prompts, args.max_new_tokens, warmup=args.warmup, repeats=1,
                            progress=not args.no_progress, warmup_prompt=warm, skipped=skipped)
    run_end(args.bandwidth_mb)
    summary = summarize(records, "plain", reference_arm="plain", roofline_tokens_per_s=roof["tokens_per_s"])
    curve = curves(records, lm, summary, references(args, prompts))
    summary["curves"] = curve
    meta = {"model": lm.source.name, "model_identity": lm.source.identity, "prompts": args.prompt_ids or args.prompts,
            "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "methods": methods,
            "thresholds": thresholds, "kv": kvs, "skip_min_layers": args.skip_min_layers,
            "mod_skip": args.mod_skip, "skipped_arms": skipped,
            "isolation": "one worker process for all points (one engine), none in the main process",
            "bandwidth_gbps": bandwidth, "roofline": roof}
    paths = write_results(args.out, meta, records, summary, args.out_dir, keep_token_ids=True)
    table = render(curve, Path(args.out_dir) / f"{args.out}-curve.png",
                   f"early exit on {lm.source.name}: quality vs speed ({len(prompts)} prompts)")
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write(f"\n## Quality-speed points\n\n{table}\n\n![curve]({args.out}-curve.png)\n")
    print(json.dumps({"curves": curve}), flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "exit", help="early exit: quality (Rouge-L vs the full model) against measured speedup, per method",
        description="Sweep each early-exit method's threshold on the same prompts in one run; writes "
                    "benchmarks/results/<out>.json, .md, .png and <out>-curve.png.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)}; also: {','.join(EXTRA_METHODS)})")
    p.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)))
    p.add_argument("--kv", default="recompute,propagate", help="K/V policies to measure (default: both)")
    p.add_argument("--skip-min-layers", default=[24, 18, 12], type=lambda s: [int(x) for x in s.split(",")],
                   help="skipdecode: depths at the end of the output to sweep (default: 24,18,12)")
    p.add_argument("--mod-skip", default=[0.1, 0.2, 0.35], type=lambda s: [float(x) for x in s.split(",")],
                   help="mod: fractions of tokens each routed block skips, to sweep (default: 0.1,0.2,0.35)")
    p.add_argument("--mod-routers", default=None, help="mod: routers directory (default: the shipped ones)")
    p.add_argument("--adapter", default=None, help="M2R2 adapter directory (default: the shipped rate-2 one)")
    add_common_args(p, out="exit", prompts="koala", max_new_tokens=64)
    p.set_defaults(func=main)
    return p
