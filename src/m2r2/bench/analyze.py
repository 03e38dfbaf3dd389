"""``m2r2 analyze``: the picture that explains M2R2, measured per layer on the slow and the fast stream.

On the model's own greedy continuations of held-out prompts (default: MT-Bench first turns), for every
layer l of the slow stream (the model itself) and of the fast stream (accelerator adapters, rate R):

- residual velocity ``||h_l - h_{l-1}|| / ||h_{l-1}||``: how far one layer moves the state;
- cosine of ``h_l`` to the model's final state ``s_L``;
- top-1 agreement of the layer's read-out (final norm + LM head) with the full model's next token.

Statistics are over the response positions (each predicting the next response token). Writes JSON and a
PNG plot under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..stream.accelerator import Accelerator, slow_trace
from ..errors import M2R2Error


def _layer_metrics(model, states: list[torch.Tensor], final: torch.Tensor, target: torch.Tensor,
                   sel: torch.Tensor) -> dict[str, list[float]]:
    """states[l] (T, D) for l = 0..n; ``sel`` the positions to score; ``target`` the full model's token there."""
    vel, cos, agree = [], [], []
    for l, h in enumerate(states):
        h_sel = h[sel]
        if l == 0:
            vel.append(float("nan"))
        else:
            prev = states[l - 1][sel]
            vel.append(float(((h_sel - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-9)).mean()))
        cos.append(float(F.cosine_similarity(h_sel, final[sel], dim=-1).mean()))
        agree.append(float((model.head(h_sel).argmax(-1) == target).float().mean()))
    return {"velocity": vel, "cos_to_final": cos, "agreement": agree}


@torch.inference_mode()
def analyze(lm, prompts: list[str], acc: Accelerator | list[Accelerator] | None, max_new_tokens: int = 64,
            batch_size: int = 8, progress: bool = True) -> dict:
    """Per-layer metrics of the slow stream and of each fast stream (stream "fast" for one accelerator,
    "fast-r<R>" for a list), on the same greedy continuations."""
    from tqdm.auto import tqdm

    model = lm.model
    L = model.cfg.num_layers
    if acc is None:
        fast_streams = {}
    elif isinstance(acc, Accelerator):
        fast_streams = {"fast": acc}
    else:
        fast_streams = {f"fast-r{a.cfg.rate}": a for a in acc}
    sums: dict[str, dict[str, list[float]]] = {}
    weights = 0
    bar = tqdm(total=len(prompts), desc="analyze", unit="prompt", file=sys.stderr, disable=not progress)
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        outs = lm.generate(prompts=chunk, max_new_tokens=max_new_tokens)
        for out in outs:
            seq = out.prompt_token_ids + out.token_ids
            if len(out.token_ids) < 2:
                continue
            ids = torch.tensor([seq])
            slow, cache = slow_trace(model, ids)
            slow = [s[0] for s in slow]
            P = len(out.prompt_token_ids)
            sel = torch.arange(P - 1, len(seq) - 1)  # positions whose next token is a response token
            target = model.head(slow[L][sel]).argmax(-1)
            n = len(sel)
            res = {"slow": _layer_metrics(model, slow, slow[L], target, sel)}
            for name, a in fast_streams.items():
                fast = [f[0] for f in a.parallel_fast_states(model, ids, cache.k, cache.v)]
                res[name] = _layer_metrics(model, fast, slow[L], target, sel)
            for stream, metrics in res.items():
                acc_s = sums.setdefault(stream, {k: [0.0] * len(v) for k, v in metrics.items()})
                for k, v in metrics.items():
                    acc_s[k] = [a + x * n for a, x in zip(acc_s[k], v)]
            weights += n
        bar.update(len(chunk))
    bar.close()
    if not weights:
        raise M2R2Error("no prompt produced a continuation to analyze")
    streams = {s: {k: [x / weights for x in v] for k, v in m.items()} for s, m in sums.items()}
    return {"positions": weights, "streams": streams}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = {"agreement": "top-1 agreement with the full model", "cos_to_final": "cosine to the final state",
              "velocity": "residual velocity ||h_l - h_(l-1)|| / ||h_(l-1)||"}
    rate = doc["meta"].get("rate")
    for ax, key in zip(axes, ("agreement", "cos_to_final", "velocity")):
        for stream, m in doc["streams"].items():
            r = stream.split("-r")[1] if "-r" in stream else rate
            label = "slow stream (the model)" if stream == "slow" else f"fast stream (M2R2, R={r})"
            ax.plot(range(len(m[key])), m[key], "-o" if stream == "slow" else "-s", markersize=3, label=label)
        ax.set_xlabel("layers computed")
        ax.set_title(titles[key], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    meta = doc["meta"]
    fig.suptitle(f"{meta['model']} · {meta['prompts']} ({meta['n_prompts']} prompts, {doc['positions']} "
                 f"response positions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import m2r2
    from ..provenance import machine_info
    from ..prompts import load_prompts

    lm = m2r2.load(args.model, threads=args.threads)
    acc = None
    if not args.slow_only:
        rates = [int(r) for r in str(args.rate).split(",") if r.strip()]
        if args.adapter or len(rates) == 1:
            acc = lm.load_accelerator(args.adapter, rate=rates[0])
        else:
            acc = [lm.load_accelerator(None, rate=r) for r in rates]
    recs = load_prompts(args.prompts, limit=args.limit)
    t0 = time.perf_counter()
    res = analyze(lm, [r.text for r in recs], acc, args.max_new_tokens, progress=not args.no_progress)
    accs = [] if acc is None else ([acc] if isinstance(acc, Accelerator) else acc)
    meta = {**machine_info(), "model": lm.source.name, "model_identity": lm.source.identity,
            "prompts": args.prompts, "n_prompts": len(recs), "max_new_tokens": args.max_new_tokens,
            "rate": accs[0].cfg.rate if len(accs) == 1 else [a.cfg.rate for a in accs],
            "fast_layers": [a.fast_layers for a in accs],
            "adapter": str(args.adapter) if args.adapter else ("shipped" if accs else None),
            "adapter_training": [a.cfg.training for a in accs], "seconds": time.perf_counter() - t0}
    doc = {"meta": meta, **res}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out / f"{args.out}.png")
    s = res["streams"]
    L = lm.config.num_layers
    line = {"slow_agreement_at_L": s["slow"]["agreement"][L]}
    for name, m in s.items():
        if name != "slow":
            Fl = len(m["agreement"]) - 1
            line[name] = {"fast_layers": Fl, "fast_agreement_at_F": m["agreement"][Fl],
                          "slow_agreement_at_F": s["slow"]["agreement"][Fl]}
    print(json.dumps(line))
    print(f"m2r2: wrote {out / args.out}.json and .png", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..options import int_at_least, int_list
    p = subparsers.add_parser("analyze", help="per-layer velocity / alignment / agreement, slow vs fast stream",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="mt-bench", help="built-in set or JSONL (default: mt-bench)")
    p.add_argument("--limit", type=int_at_least("--limit", 1), default=None, help="first N prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=64)
    p.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one for --rate)")
    p.add_argument("--rate", type=int_list("--rate", choices=(2, 3, 4), text=True), default="2",
                   help="rate(s) of the shipped adapters, e.g. 2 or 2,3,4 (default 2)")
    p.add_argument("--slow-only", action="store_true", help="only the slow stream (no adapter)")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None)
    p.add_argument("--out", default="analyze", help="result name (default: analyze)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
