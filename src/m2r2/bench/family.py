"""``m2r2 bench family``: the adaptive-depth family side by side, each trained to the same FLOP budget.

    scripts/family_sweep.sh                      # trains every arch, then runs this
    m2r2 bench family --models runs/family --threads 1

Per architecture (a directory ``<models>/<arch>`` written by ``m2r2 family-train``):

* validation perplexity on fixed held-out windows (Hamlet, The Tempest, ShareGPT validation
  conversations), through the *inference* path (``mode="threshold"``: causal routing, what generation
  uses), over all tokens and over the answer half of each window (the half that is never designated);
  the training-time top-k routing perplexity is reported beside it for the expert-choice archs;
* unique parameters, training FLOPs and tokens (from the training record), FLOPs per token and K/V bytes
  per token as the model's own counter measures them on the validation forward (256-token windows);
* greedy generation tokens/s at batch 1 through the harness (interleaved arms, warm-up, medians) on
  Spec-Bench summarization and RAG prompts whose document part is the designated token type;
* for p-MoD and VideoLLM-MoD: the fraction of designated tokens each layer processed, and the prefill
  FLOPs and K/V bytes against the vanilla model on the same prompts.

Evaluation of an architecture is cached in ``<models>/<arch>/eval.json`` (keyed by the settings), so a
re-run after a crash only redoes what is missing. Writes ``benchmarks/results/<out>.json/.md/.png``
(the harness's files, the family table added) and ``<out>-pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..artifacts import write_json
from ..provenance import pin_threads, run_end, run_start
from .arms import ArmResult, ArmUnavailable, BenchPrompt
from .report import md_table, write_results
from .runner import run_benchmark
from .stats import summarize

PROMPT_CATEGORIES = ("summarization", "rag")


def document_span(category: str, text: str) -> tuple[int, int]:
    """Character span of the document inside a Spec-Bench prompt: after ``Summarize: `` for
    summarization, everything before the final question line for RAG."""
    if category == "summarization":
        start = text.find(":") + 1 if text.startswith("Summarize") else 0
        return start, len(text)
    cut = text.rfind("\n")
    return 0, cut if cut > 0 else len(text)


def spec_bench_prompts(tokenizer, n_per_category: int, max_doc_tokens: int,
                       path: str = "/work/shared/data/spec_bench_questions.jsonl") -> list[tuple[BenchPrompt, list[bool]]]:
    """The first ``n_per_category`` summarization and RAG prompts, tokenized with the family tokenizer,
    the document cut to ``max_doc_tokens`` tokens; with each, the token-type mask (True = document)."""
    from ..prompts import builtin_path
    p = Path(path)
    if not p.is_file():
        p = builtin_path("spec-bench")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for cat in PROMPT_CATEGORIES:
        for r in [r for r in rows if r.get("category") == cat][:n_per_category]:
            text = r["turns"][0]
            a, b = document_span(cat, text)
            pre, doc, post = text[:a], text[a:b], text[b:]
            doc_ids = tokenizer.encode(doc).ids[:max_doc_tokens]
            pre_ids = tokenizer.encode(pre).ids if pre else []
            post_ids = tokenizer.encode(post).ids if post else []
            ids = pre_ids + doc_ids + post_ids
            mask = [False] * len(pre_ids) + [True] * len(doc_ids) + [False] * len(post_ids)
            out.append((BenchPrompt(id=f"{cat}-{r['question_id']}", category=cat, token_ids=tuple(ids)), mask))
    return out


class FamilyArm:
    """Greedy batch-1 generation of one trained family model (prefill with the prompt's token types)."""
    kind = "m2r2"

    def __init__(self, name: str, path: Path, masks: dict[str, list[bool]]):
        self.name, self.path, self.masks = name, path, masks
        self.model = None

    def setup(self) -> None:
        from ..family.train import load_model
        if not (self.path / "model.safetensors").is_file():
            raise ArmUnavailable(f"no trained model in {self.path}")
        self.model = load_model(self.path)

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        from ..family.decode import generate
        from ..family.model import Counter
        ids = torch.tensor([prompt.token_ids])
        tt = torch.tensor([self.masks[prompt.id]])
        c = Counter()
        t0 = time.perf_counter()
        new, cache = generate(self.model, ids, max_new_tokens, tt, counter=c)
        dt = time.perf_counter() - t0
        return ArmResult(new_tokens=new.shape[1], seconds=dt, token_ids=new[0].tolist(),
                         forward_passes=new.shape[1], extra={"flops": c.flops, "kv_bytes": cache.nbytes()})

    def close(self) -> None:
        self.model = None


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, prompts: list[tuple[BenchPrompt, list[bool]]]) -> dict:
    """Validation perplexities, FLOPs and K/V per token, and (token-type archs) designated-token stats."""
    from ..family.model import Counter
    from ..family.train import designated_mask, lm_loss
    res: dict = {}
    modes = ["threshold"] + (["topk"] if model.cfg.arch in ("mor-ec", "mor-kv", "mod") else [])
    for mode in modes:
        c = Counter()
        nll_all, nll_ans, n_all, n_ans = 0.0, 0.0, 0, 0
        for i in range(0, windows.shape[0], batch):
            ce, _ = lm_loss(model, windows[i:i + batch], mode, c)
            half = ce.shape[1] // 2
            nll_all += float(ce.sum())
            nll_ans += float(ce[:, half:].sum())
            n_all += ce.numel()
            n_ans += ce[:, half:].numel()
        res[mode] = {"ppl": math.exp(nll_all / n_all), "ppl_answer": math.exp(nll_ans / n_ans),
                     "flops_per_token": c.flops / c.tokens,
                     "processed_fraction": {int(k): v / c.tokens for k, v in sorted(c.processed.items())}}
        if mode == "threshold":  # K/V per token: one full window's cache (what a 256-token context holds)
            cache = model.new_cache(1)
            model(windows[:1, :-1], designated_mask(1, windows.shape[1] - 1), cache)
            res[mode]["kv_bytes_per_token"] = cache.nbytes() / (windows.shape[1] - 1)
    # prefill of the Spec-Bench prompts: FLOPs, K/V, designated tokens processed per layer
    c = Counter()
    kv = 0
    for p, mask in prompts:
        cache = model.new_cache(1)
        model(torch.tensor([p.token_ids]), torch.tensor([mask]), cache, counter=c, last_only=True)
        kv += cache.nbytes()
    slots = model.n_slots
    res["prefill"] = {"flops": c.flops, "kv_bytes": kv, "tokens": c.tokens, "designated": c.designated,
                      "designated_fraction_per_layer": [c.designated_processed.get(s, 0) / max(1, c.designated)
                                                        for s in range(slots)]}
    return res


def _eval_cached(arch: str, path: Path, key: dict, fn) -> dict:
    f = path / "eval.json"
    if f.is_file():
        d = json.loads(f.read_text())
        if d.get("key") == key:
            return d["result"]
    r = fn()
    write_json(f, {"key": key, "result": r})
    return r


def pareto(points: list[tuple[str, float, float]], lower_x_better: bool) -> list[str]:
    """Names on the frontier of (x, ppl): no other point is at least as good on both and better on one."""
    out = []
    for n, x, y in points:
        dominated = any((x2 <= x if lower_x_better else x2 >= x) and y2 <= y and (x2, y2) != (x, y)
                        for _, x2, y2 in points)
        if not dominated:
            out.append(n)
    return out


def render_pareto(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, lower in ((axes[0], "flops_per_token", "inference FLOPs per token (MFLOP, 256-token windows)", True),
                                  (axes[1], "tokens_per_s", "generation tokens/s (batch 1, median)", False)):
        pts = [(r["arch"], r[key] / (1e6 if key == "flops_per_token" else 1), r["ppl_answer"]) for r in rows
               if r.get(key) is not None]
        front = pareto(pts, lower)
        for n, x, y in pts:
            ax.scatter(x, y, color="tab:red" if n in front else "tab:blue", zorder=3)
            ax.annotate(n, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8)
        fp = sorted([(x, y) for n, x, y in pts if n in front])
        if len(fp) > 1:
            ax.plot(*zip(*fp), color="tab:red", linewidth=1, linestyle="--", label="Pareto frontier")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity (answer half)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def family_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["arch", "unique params", "train TFLOP", "train tokens", "val ppl", "val ppl (answer half)",
              "ppl top-k (train routing)", "MFLOP/token", "KV KiB/token", "gen tok/s"]
    body = []
    for r in rows:
        body.append([r["arch"], f"{r['params'] / 1e6:.2f}M", f"{r['train_flops'] / 1e12:.1f}",
                     f"{r['train_tokens'] / 1e6:.2f}M", f"{r['ppl']:.2f}", f"{r['ppl_answer']:.2f}",
                     "-" if r.get("ppl_topk") is None else f"{r['ppl_topk']:.2f}",
                     f"{r['flops_per_token'] / 1e6:.2f}", f"{r['kv_bytes_per_token'] / 1024:.2f}",
                     "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}"])
    return header, body


def main(args: argparse.Namespace) -> int:
    from ..family.data import TokenData
    from ..family.train import load_model
    pin_threads(args.threads)
    run_start()
    root = Path(args.models)
    archs = [a for a in args.archs.split(",") if a]
    data = TokenData(args.data)
    windows = data.validation_windows(args.windows, args.seq_len)
    prompts = spec_bench_prompts(data.tokenizer, args.prompts_per_category, args.max_doc_tokens)
    masks = {p.id: m for p, m in prompts}
    key = {"windows": args.windows, "seq_len": args.seq_len, "prompts_per_category": args.prompts_per_category,
           "max_doc_tokens": args.max_doc_tokens}
    evals, records_meta = {}, {}
    for arch in archs:
        path = root / arch
        if not (path / "model.safetensors").is_file():
            print(f"m2r2 bench: {arch}: no trained model in {path}, skipped", file=sys.stderr)
            continue
        model = load_model(path)
        print(f"m2r2 bench: evaluating {arch}", file=sys.stderr, flush=True)
        evals[arch] = _eval_cached(arch, path, key, lambda: evaluate(model, windows, args.batch, prompts))
        records_meta[arch] = {"params": model.unique_parameters(), **model.training_record}
    if not evals:
        raise SystemExit("m2r2 bench family: no trained models found")
    arms = [FamilyArm(a, root / a, masks) for a in evals]
    records = run_benchmark(arms, [p for p, _ in prompts], args.max_new_tokens, warmup=args.warmup,
                            progress=not args.no_progress)  # each arm (a FamilyArm, pickled) in its own worker
    run_end()
    base = "vanilla" if "vanilla" in evals else next(iter(evals))
    summary = summarize(records, base)
    rows = []
    for arch, e in evals.items():
        th = e["threshold"]
        rec = records_meta[arch]
        rows.append({"arch": arch, "params": rec["params"], "train_flops": rec.get("train_flops"),
                     "train_tokens": rec.get("tokens"), "train_steps": rec.get("steps"),
                     "train_wall_seconds": rec.get("wall_seconds"), "train_command": rec.get("command"),
                     "ppl": th["ppl"], "ppl_answer": th["ppl_answer"], "ppl_topk": e.get("topk", {}).get("ppl"),
                     "ppl_answer_topk": e.get("topk", {}).get("ppl_answer"),
                     "flops_per_token": th["flops_per_token"], "kv_bytes_per_token": th["kv_bytes_per_token"],
                     "processed_fraction": th["processed_fraction"],
                     "tokens_per_s": summary["arms"].get(arch, {}).get("all", {}).get("median_tokens_per_s"),
                     "prefill": e["prefill"]})
    dense = evals.get("vanilla", {}).get("prefill")
    token_type = []
    for r in rows:
        if r["arch"] in ("pmod", "vmod"):
            pf = r["prefill"]
            frac = pf["designated_fraction_per_layer"]
            token_type.append({"arch": r["arch"], "designated_fraction_per_layer": frac,
                               "designated_fraction_mean": sum(frac) / len(frac),
                               "prefill_flops_vs_vanilla": pf["flops"] / dense["flops"] if dense else None,
                               "prefill_kv_vs_vanilla": pf["kv_bytes"] / dense["kv_bytes"] if dense else None,
                               "designated_share_of_prompt": pf["designated"] / pf["tokens"]})
    meta = {"family": rows, "token_type": token_type, "max_new_tokens": args.max_new_tokens,
            "prompts": f"spec-bench summarization+rag, {args.prompts_per_category} each, document <= "
                       f"{args.max_doc_tokens} tokens (designated)",
            "validation": f"{args.windows} windows x {args.seq_len} tokens, first half designated", "data": args.data,
            "isolation": "process-per-arm"}
    paths = write_results(args.out, meta, records, summary, args.out_dir)
    header, body = family_table(rows)
    lines = ["", "## The family at equal training FLOPs", "",
             "Perplexity through the inference path (causal threshold routing); answer half = the second half of "
             "each validation window, never designated. FLOPs and K/V per token: the model's own counter on the "
             "validation forward (256-token windows). gen tok/s: greedy batch-1 generation on the prompts above.",
             "", md_table(header, body)]
    if token_type:
        lines += ["", "## Designated tokens (p-MoD, VideoLLM-MoD): Spec-Bench documents at prefill", "",
                  md_table(["arch", "designated share of prompt", "designated processed per layer",
                             "mean", "prefill FLOPs vs vanilla", "prefill KV vs vanilla"],
                            [[t["arch"], f"{t['designated_share_of_prompt']:.2f}",
                              " ".join(f"{f:.2f}" for f in t["designated_fraction_per_layer"]),
                              f"{t['designated_fraction_mean']:.3f}",
                              "-" if t["prefill_flops_vs_vanilla"] is None else f"{t['prefill_flops_vs_vanilla']:.3f}",
                              "-" if t["prefill_kv_vs_vanilla"] is None else f"{t['prefill_kv_vs_vanilla']:.3f}"]
                             for t in token_type])]
    pareto_png = paths["md"].with_name(f"{args.out}-pareto.png")
    render_pareto(rows, pareto_png, "adaptive-depth family at equal training FLOPs (red: Pareto frontier)")
    lines += ["", f"![Pareto]({pareto_png.name})", ""]
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("family", help="adaptive-depth family (MoR, MoD, p-MoD, VideoLLM-MoD) at equal FLOPs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="runs/family", help="directory holding <arch>/ trained models")
    p.add_argument("--archs", default="vanilla,recursive,mor-ec,mor-tc,mor-kv,mod,pmod,vmod")
    p.add_argument("--data", default="runs/family/data")
    p.add_argument("--windows", type=int, default=64, help="validation windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts-per-category", type=int, default=4)
    p.add_argument("--max-doc-tokens", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="family")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
