"""Reporting a benchmark: ``write_results`` writes one JSON file with a fixed schema (benchmark, meta,
records, summary) plus a markdown table and a chart rendered from it, and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..provenance import machine_info

SCHEMA_VERSION = 1


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by markdown and the terminal)."""
    bases = list(dict.fromkeys([summary["baseline_arm"], *summary["also_against"]]))
    ref = summary.get("reference_arm")
    header = ["arm", "kind", "prompts", "tok/s median", "tok/s mean", "tok/s total"]
    dec = any("median_decode_tokens_per_s" in e["all"] for e in summary["arms"].values())
    header += ["decode-only tok/s", "prefill ms"] if dec else []
    header += [f"x {b} (geo/med)" for b in bases] + ["% roofline", "tok/pass"]
    header += [f"same as {ref}"] if ref else []
    near = any("near_ties" in e.get("equality", {}) for e in summary["arms"].values())
    header += ["near-tie divergences"] if ref and near else []
    rouge = any("rouge_l" in e for e in summary["arms"].values())
    header += [f"Rouge-L vs {ref}"] if rouge else []
    rows = []
    for arm, e in summary["arms"].items():
        a = e["all"]
        row = [arm, e["kind"], str(a["n"]), _fmt(a["median_tokens_per_s"]), _fmt(a["mean_tokens_per_s"]),
               _fmt(a["aggregate_tokens_per_s"])]
        if dec:
            row += [_fmt(a.get("median_decode_tokens_per_s")),
                    _fmt(None if a.get("median_prefill_seconds") is None else 1e3 * a["median_prefill_seconds"])]
        for b in bases:
            r = a["ratios"].get(b)
            cell = f"{r['geomean']:.2f} / {r['median']:.2f}" if r else "-"
            if r and "decode_geomean" in r:
                cell += f" (decode {r['decode_geomean']:.2f})"
            row.append("1 (base)" if arm == b else cell)
        frac = e["roofline_fraction"]
        own = e["roofline_tokens_per_s"] != summary["roofline_tokens_per_s"]
        row.append(_fmt(None if frac is None else 100 * frac, ".0f", "%" + ("*" if own else "")))
        row.append(_fmt(a["tokens_per_forward_pass"], ".2f"))
        if ref:
            eq = e.get("equality")
            row.append("ref" if arm == ref else (f"{eq['identical']}/{eq['compared']}" if eq and eq["compared"] else "-"))
            if near:
                row.append("ref" if arm == ref else (f"{eq['near_ties']}/{len(eq['mismatches'])}" if eq and "near_ties"
                                                     in eq else "-"))
        if rouge:
            row.append("ref" if arm == ref else _fmt(e.get("rouge_l"), ".3f"))
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def provenance_lines(meta: dict) -> list[str]:
    """Markdown lines for the commit (dirty or clean) and the conditions at the start and end of the run."""
    def cond(d: dict) -> str:
        load = d.get("loadavg")
        bw = d.get("bandwidth_gbps")
        return (f"load {'/'.join(f'{x:.2f}' for x in load) if load else '?'}, "
                f"bandwidth {'?' if bw is None else f'{bw:.1f}'} GB/s ({d.get('date')})")
    lines = []
    if meta.get("git_commit"):
        dirty = meta.get("git_dirty_files") or []
        more = meta.get("git_dirty_count", len(dirty)) - 5
        lines.append(f"- commit {meta['git_commit'][:10]}, " + (
            f"**dirty tree** ({', '.join(dirty[:5])}{f' and {more} more' if more > 0 else ''})" if meta.get("git_dirty")
            else "clean tree"))
    if meta.get("start"):
        end = f"; at end: {cond(meta['end'])}" if meta.get("end") else ""
        lines.append(f"- at start: {cond(meta['start'])}{end}")
    return lines


def render_markdown(doc: dict) -> str:
    meta, summary = doc["meta"], doc["summary"]
    roof = meta.get("roofline") or {}
    lines = [f"# Benchmark: {doc['benchmark']}", "",
             f"- machine: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('threads')} threads; "
             f"torch {meta.get('torch')}, transformers {meta.get('transformers')}",
             f"- date: {meta.get('date')}; command: `{meta.get('command')}`", *provenance_lines(meta)]
    for key in ("model", "prompts", "max_new_tokens", "repeats", "isolation"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    if roof:
        lines.append(f"- memory bandwidth {roof['bandwidth_gbps']:.1f} GB/s; roofline "
                     f"{roof['tokens_per_s']:.1f} tokens/s ({roof['weight_bytes_per_token'] / 1e6:.0f} MB of "
                     f"weights per token at {roof['bytes_per_param']:g} bytes/param)")
    for arm, e in summary["arms"].items():
        if e["roofline_tokens_per_s"] != summary["roofline_tokens_per_s"] and e["roofline_tokens_per_s"]:
            lines.append(f"- \\* {arm}: fraction of its own roofline, {e['roofline_tokens_per_s']:.1f} tokens/s")
    if meta.get("skipped_arms"):
        lines.append("- skipped: " + "; ".join(f"{a} ({why})" for a, why in meta["skipped_arms"].items()))
    lines += ["", "Tokens/s = new tokens (EOS included) / wall time of the call (prefill + decode). Ratios are "
              "computed per prompt, then geometric mean / median.", "", md_table(*summary_table(summary))]
    cats = summary["categories"]
    if len(cats) > 1:
        arms = list(summary["arms"])
        lines += ["", "## Median tokens/s by category", "",
                  md_table(["category", *arms], [[c, *(_fmt(summary["arms"][a]["by_category"].get(c, {}).get(
                      "median_tokens_per_s")) for a in arms)] for c in cats])]
    spec = summary.get("speculative")
    if spec:
        def cell(d: dict, key: str, spec_: str) -> str:
            return _fmt(d.get(key), spec_)
        lines += ["", "## Speculative decoding: drafting and verification", "",
                  "Tokens per verification = (accepted drafts + 1) per full forward; draft cost = seconds per draft "
                  "token over seconds per plain decode token (measured), and weight bytes a draft token reads over "
                  "a full forward's; drafts and tree nodes per verification; step cost = (drafting + verifying) "
                  "seconds per verification in plain decode steps; cost model = tokens/verify over step cost (the "
                  "speedup if nothing else counted), beside the measured decode-only speedup.", "",
                  md_table(["arm", "tokens/verify", "acceptance", "draft cost (time)", "draft cost (bytes)",
                             "drafts/verify", "nodes/verify", "verify cost (time)", "step cost", "cost model",
                             "measured (decode)"],
                            [[a, cell(e["all"], "tokens_per_verify", ".2f"), cell(e["all"], "acceptance", ".2f"),
                              cell(e["all"], "draft_cost_measured", ".2f"), _fmt(e.get("draft_cost_bytes"), ".2f"),
                              cell(e["all"], "drafts_per_verify", ".2f"), cell(e["all"], "nodes_per_verify", ".2f"),
                              cell(e["all"], "verify_cost_measured", ".2f"), cell(e["all"], "step_cost", ".2f"),
                              cell(e["all"], "cost_model_speedup", ".2f"),
                              _fmt(summary["arms"].get(a, {}).get("all", {}).get("ratios", {}).get(
                                  "m2r2-plain", {}).get("decode_geomean"), ".2f")]
                             for a, e in spec.items()])]
        deep = {a: e["all"].get("acceptance_by_depth") or [] for a, e in spec.items()}
        n_depth = max((len(v) for v in deep.values()), default=0)
        if n_depth:
            lines += ["", "## Acceptance by draft depth", "",
                      "The chance that draft d is kept given that every draft before it was (a chain's acceptance "
                      "per depth); - where no verification reached that depth.", "",
                      md_table(["arm", *[f"d={d + 1}" for d in range(n_depth)]],
                               [[a, *(_fmt(v[d], ".2f") if d < len(v) else "-" for d in range(n_depth))]
                                for a, v in deep.items() if v])]
        by_rows = {a: e["all"].get("verify_cost_by_rows") or {} for a, e in spec.items()}
        sizes = sorted({int(k) for v in by_rows.values() for k in v})
        if sizes:
            lines += ["", "## Verification cost by rows per sequence", "",
                      "Seconds per verification of k rows (the pending token and k - 1 drafts, or the drafter's own "
                      "rows) over seconds per plain decode token, as each arm measured them.", "",
                      md_table(["arm", *[f"{k} rows" for k in sizes]],
                               [[a, *(_fmt(v.get(str(k)), ".2f") for k in sizes)] for a, v in by_rows.items() if v])]
        cats = summary["categories"]
        if len(cats) > 1:
            arms_ = list(spec)
            lines += ["", "## Tokens per verification by category", "",
                      md_table(["category", *arms_], [[c, *(_fmt(spec[a]["by_category"].get(c, {}).get(
                          "tokens_per_verify"), ".2f") for a in arms_)] for c in cats])]
    mism = [(a, m) for a, e in summary["arms"].items() for m in e.get("equality", {}).get("mismatches", [])]
    if mism:
        lines += ["", f"## Outputs differing from {summary['reference_arm']}", "",
                  *([f"Near-tie: {summary['near_tie_rule']}.", ""] if summary.get("near_tie_rule") else []),
                  md_table(["arm", "prompt", "first differing token", "tokens", "reference tokens",
                             "top-2 gap (fp64)", "fp32 noise", "near-tie"],
                            [[a, m["prompt_id"], str(m["first_diff"]), str(m["tokens"]), str(m["reference_tokens"]),
                              _fmt(m.get("top2_gap"), ".2e"), _fmt(m.get("float32_noise"), ".1e"),
                              {True: "yes", False: "no"}.get(m.get("near_tie"), "-")] for a, m in mism])]
    return "\n".join(lines) + "\n"


def render_chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    arms = list(summary["arms"])
    cats = summary["categories"]
    colors = {"m2r2": "tab:blue", "external": "tab:gray"}
    ncols = 2 if len(cats) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 + 6 * (ncols - 1), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2][:ncols]})
    ax = axes[0][0]
    med = [summary["arms"][a]["all"]["median_tokens_per_s"] for a in arms]
    bars = ax.bar(arms, med, color=[colors.get(summary["arms"][a]["kind"], "tab:orange") for a in arms])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    roof = summary["roofline_tokens_per_s"]
    if roof:
        ax.axhline(roof, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"roofline {roof:.1f} tok/s", (0, roof), xytext=(2, 3), textcoords="offset points",
                    xycoords=("axes fraction", "data"), color="tab:red", fontsize=8)
    for bar, a in zip(bars, arms):  # arms with their own ceiling (fewer bytes per weight) get a short tick
        own = summary["arms"][a]["roofline_tokens_per_s"]
        if own and own != roof:
            x0, w = bar.get_x(), bar.get_width()
            ax.hlines(own, x0, x0 + w, color="tab:red", linestyle=":", linewidth=1.5)
            ax.annotate(f"own {own:.0f}", (x0 + w / 2, own), xytext=(0, 3), textcoords="offset points",
                        ha="center", color="tab:red", fontsize=7)
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title(f"{doc['benchmark']}: tokens/s per arm", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if ncols == 2:
        ax2 = axes[0][1]
        width = 0.8 / len(arms)
        for j, a in enumerate(arms):
            vals = [summary["arms"][a]["by_category"].get(c, {}).get("median_tokens_per_s", 0.0) for c in cats]
            ax2.bar([i + j * width for i in range(len(cats))], vals, width, label=a)
        if roof:
            ax2.axhline(roof, color="tab:red", linestyle="--", linewidth=1)
        ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right", fontsize=8)
        ax2.set_title("by category", fontsize=10)
        ax2.legend(fontsize=7)
    save_chart(fig, path, doc["meta"])


def save_chart(fig, path: Path, meta: dict) -> None:
    """Title a benchmark chart with the machine, threads and date of its run, write it and free it."""
    import matplotlib.pyplot as plt
    fig.suptitle(f"{meta.get('cpu')} · {meta.get('threads')} threads · {meta.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(name: str, meta: dict, records: Sequence[dict], summary: dict,
                  out_dir: str | os.PathLike = "benchmarks/results", *, keep_token_ids: bool = False) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (schema: benchmark, meta, records, summary), render ``<name>.md`` and
    ``<name>.png`` from it, print the table to stderr and one JSON summary line to stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = [r if keep_token_ids else {k: v for k, v in r.items() if k != "token_ids"} for r in records]
    doc = {"benchmark": name, "meta": {"schema_version": SCHEMA_VERSION, **machine_info(), **meta},
           "records": recs, "summary": summary}
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(doc), encoding="utf-8")
    render_chart(doc, paths["png"])

    print("\n" + text_table(*summary_table(summary)), file=sys.stderr)
    roof = summary.get("roofline_tokens_per_s")
    if roof:
        print(f"roofline {roof:.1f} tokens/s; results in {paths['json']} (.md, .png)", file=sys.stderr)
    line = {"benchmark": name, "roofline_tokens_per_s": roof, "json": str(paths["json"]),
            "arms": {a: {"median_tokens_per_s": e["all"]["median_tokens_per_s"],
                         "ratios_geomean": {b: r["geomean"] for b, r in e["all"]["ratios"].items()},
                         **({"identical": f"{e['equality']['identical']}/{e['equality']['compared']}"}
                            if "equality" in e else {})}
                     for a, e in summary["arms"].items()}}
    print(json.dumps(line), flush=True)
    return paths
