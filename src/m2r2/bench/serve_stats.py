"""``m2r2 bench serve``: statistics over the per-request records (percentiles, per-level and per-engine summaries,
the table) and the result files (JSON, markdown, PNG)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from .report import _fmt, md_table, provenance_lines, save_chart, text_table

ENGINES = ("m2r2", "llamacpp")
DEFAULT_CONCURRENCY = "1,4,8,16"
REFERENCE_ENGINE = "m2r2"



# ---------------------------------------------------------------- statistics (pure)

def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def reference_texts(records: Sequence[dict], engine: str, concurrency: int) -> dict[str, str]:
    """Output text per prompt id of ``engine`` at ``concurrency`` (the first request of each prompt)."""
    out: dict[str, str] = {}
    for r in records:
        if r["engine"] == engine and r["concurrency"] == concurrency:
            out.setdefault(r["prompt_id"], r["text"])
    return out


def summarize_level(records: Sequence[dict], wall_s: float, reference: dict[str, str] | None) -> dict:
    """One (engine, concurrency) level: totals, aggregate tokens/s, latency percentiles, output equality."""
    tokens = sum(r["new_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    tpot = [r["tpot_s"] for r in records if r["tpot_s"] is not None]
    e2e = [r["e2e_s"] for r in records]
    out = {"requests": len(records), "total_tokens": tokens, "wall_s": wall_s,
           "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
           "mean_tokens_per_request": tokens / len(records) if records else 0.0,
           "prompt_token_mismatches": sum(1 for r in records if r.get("prompt_tokens") is not None
                                          and r["prompt_tokens"] != r["expected_prompt_tokens"]),
           "finish_reasons": {}}
    for r in records:
        fr = str(r.get("finish_reason"))
        out["finish_reasons"][fr] = out["finish_reasons"].get(fr, 0) + 1
    if reference is not None:
        compared = [r for r in records if r["prompt_id"] in reference]
        diff = [r for r in compared if r["text"] != reference[r["prompt_id"]]]
        out["equality"] = {"compared": len(compared), "identical": len(compared) - len(diff),
                           "differing_prompts": sorted({r["prompt_id"] for r in diff})}
    return out


def summarize_serve(records: Sequence[dict], levels: Sequence[dict]) -> dict:
    """Per engine and concurrency level (``levels``: {engine, concurrency, wall_s, ...} per measured level):
    ``summarize_level`` plus scaling vs the engine's lowest level. The reference for output equality is
    ``REFERENCE_ENGINE`` at its lowest measured level (None when it did not run)."""
    ref_levels = sorted(lv["concurrency"] for lv in levels if lv["engine"] == REFERENCE_ENGINE)
    ref_c = ref_levels[0] if ref_levels else None
    ref = reference_texts(records, REFERENCE_ENGINE, ref_c) if ref_c is not None else None
    engines: dict[str, dict] = {}
    for lv in levels:
        eng, c = lv["engine"], lv["concurrency"]
        rows = [r for r in records if r["engine"] == eng and r["concurrency"] == c]
        s = summarize_level(rows, lv["wall_s"], ref)
        s["slots"] = lv.get("slots", c)
        engines.setdefault(eng, {})[str(c)] = s
    for eng, by_c in engines.items():
        base_c = min(by_c, key=int)
        base = by_c[base_c]["aggregate_tokens_per_s"]
        for s in by_c.values():
            s["scaling"] = s["aggregate_tokens_per_s"] / base if base > 0 else None
            s["scaling_base"] = int(base_c)
        engines[eng] = dict(sorted(by_c.items(), key=lambda kv: int(kv[0])))
    return {"engines": engines, "concurrency": sorted({lv["concurrency"] for lv in levels}),
            "reference": {"engine": REFERENCE_ENGINE, "concurrency": ref_c} if ref_c is not None else None}


def serve_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    ref = summary.get("reference")
    header = ["engine", "c", "requests", "tok/s (aggregate)", "scaling", "TTFT p50 ms", "TTFT p99 ms",
              "per-token p50 ms", "per-token p99 ms",
              f"same as {ref['engine']} c={ref['concurrency']}" if ref else "identical"]
    rows = []
    for eng, by_c in summary["engines"].items():
        for c, s in by_c.items():
            eq = s.get("equality")
            is_ref = ref is not None and eng == ref["engine"] and int(c) == ref["concurrency"]
            same = ("ref" if is_ref else f"{eq['identical']}/{eq['compared']}" if eq and eq["compared"] else "-")
            if eq and eng != REFERENCE_ENGINE and not is_ref and eq["compared"]:
                same += " (info)"
            ms = lambda x: None if x is None else 1000 * x  # noqa: E731
            rows.append([eng, c, str(s["requests"]), _fmt(s["aggregate_tokens_per_s"]),
                         _fmt(s.get("scaling"), ".2f", "x"), _fmt(ms(s["ttft_p50_s"]), ".0f"),
                         _fmt(ms(s["ttft_p99_s"]), ".0f"), _fmt(ms(s["tpot_p50_s"]), ".1f"),
                         _fmt(ms(s["tpot_p99_s"]), ".1f"), same])
    return header, rows


# ---------------------------------------------------------------- result files

def render_serve_markdown(doc: dict) -> str:
    meta, summary = doc["meta"], doc["summary"]
    lines = [f"# Benchmark: {doc['benchmark']}", "",
             f"- machine: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('threads')} threads per server; "
             f"torch {meta.get('torch')}, xllamacpp {meta.get('xllamacpp')}",
             f"- date: {meta.get('date')}; command: `{meta.get('command')}`", *provenance_lines(meta)]
    for key in ("model", "gguf", "prompts", "n_prompts", "max_new_tokens", "requests_per_level", "ctx_per_slot",
                "endpoint", "isolation"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    if meta.get("skipped_engines"):
        lines.append("- skipped: " + "; ".join(f"{a} ({why})" for a, why in meta["skipped_engines"].items()))
    lines += ["", "Slots = concurrency c for both servers. Aggregate tok/s = tokens generated by all requests of the "
              "level / wall time of the level; scaling = that over the engine's lowest level. TTFT = request sent to "
              "first streamed text; per-token = (last chunk - first chunk) / (tokens - 1) per request. "
              "Same as = output texts equal to the reference's for the same prompt (for llama.cpp, which runs "
              "the GGUF's quantized weights, information only).", "", md_table(*serve_table(summary))]
    mism = [(e, c, p) for e, by_c in summary["engines"].items() for c, s in by_c.items()
            for p in s.get("equality", {}).get("differing_prompts", [])]
    if mism:
        ref = summary["reference"]
        lines += ["", f"## Prompts whose output differs from {ref['engine']} c={ref['concurrency']}", "",
                  md_table(["engine", "c", "prompt"], [[e, c, p] for e, c, p in mism])]
    return "\n".join(lines) + "\n"


def render_serve_chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = doc["summary"]
    colors = {"m2r2": "tab:blue", "llamacpp": "tab:gray"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for eng, by_c in summary["engines"].items():
        cs = [int(c) for c in by_c]
        col = colors.get(eng, "tab:orange")
        ax.plot(cs, [by_c[str(c)]["aggregate_tokens_per_s"] for c in cs], "o-", color=col, label=eng)
        for c in cs:
            ax.annotate(f"{by_c[str(c)]['aggregate_tokens_per_s']:.0f}", (c, by_c[str(c)]["aggregate_tokens_per_s"]),
                        xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7, color=col)
        def ms(k: str) -> list[float]:
            return [float("nan") if by_c[str(c)][k] is None else 1000 * by_c[str(c)][k] for c in cs]
        ax2.plot(cs, ms("tpot_p50_s"), "o-", color=col, label=f"{eng} per-token p50")
        ax2.plot(cs, ms("tpot_p99_s"), "o:", color=col, alpha=0.6, label=f"{eng} per-token p99")
        ax2.plot(cs, ms("ttft_p50_s"), "s--", color=col, label=f"{eng} TTFT p50")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(summary["concurrency"], [str(c) for c in summary["concurrency"]])
        a.set_xlabel("concurrency (clients = slots)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{doc['benchmark']}: throughput", fontsize=10)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.set_ylabel("ms")
    ax2.set_title("latency", fontsize=10)
    save_chart(fig, path, doc["meta"])


def write_serve_results(name: str, meta: dict, records: Sequence[dict], summary: dict,
                        out_dir: str | os.PathLike = "benchmarks/results") -> dict[str, Path]:
    """``<out_dir>/<name>.json`` (benchmark, meta, records, summary), ``.md`` and ``.png`` rendered from it; the
    table to stderr and one JSON summary line to stdout (as ``report.write_results``)."""
    from ..provenance import machine_info
    from .report import SCHEMA_VERSION

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "meta": {"schema_version": SCHEMA_VERSION, **machine_info(), **meta},
           "records": list(records), "summary": summary}
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(render_serve_markdown(doc), encoding="utf-8")
    render_serve_chart(doc, paths["png"])
    print("\n" + text_table(*serve_table(summary)), file=sys.stderr)
    print(f"results in {paths['json']} (.md, .png)", file=sys.stderr)
    line = {"benchmark": name, "json": str(paths["json"]),
            "engines": {e: {c: {"aggregate_tokens_per_s": s["aggregate_tokens_per_s"],
                                **({"identical": f"{s['equality']['identical']}/{s['equality']['compared']}"}
                                   if "equality" in s else {})} for c, s in by_c.items()}
                        for e, by_c in summary["engines"].items()}}
    print(json.dumps(line), flush=True)
    return paths
