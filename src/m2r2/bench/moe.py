"""``m2r2 bench moe``: ahead-of-time expert loading under a fast-memory budget, every strategy on one engine.

The model is the embedded SmolLM2 MoEfied (``m2r2 moefy``; shipped artifacts), its experts in slow memory
and a budget of B expert slots in fast memory (``m2r2.moe.memory``). Per prompt, the all-resident run
comes first: it is the output every other run must reproduce token for token, and its expert trace is
the oracle's knowledge. Then, for each slow memory (a modelled link per ``--bandwidth`` x ``--latency-us``,
and with ``--storage`` real per-expert file reads with the page cache bypassed) and each budget, every
strategy decodes the same prompt:

* ``on-demand-lru`` / ``on-demand-lfu``: load on a miss, evict least recently / frequently used;
* ``pinned-lfu``: half the budget holds the experts used most often by the *other* prompts (their all-resident
  traces: a calibration that never sees the prompt being decoded), the other half is LRU;
* ``slow-prefetch``: the slow state through the next layer's router (Pre-gated MoE / AdapMoE-style);
* ``m2r2-prefetch``: the M2R2 fast stream (shipped R=2 adapter) predicts layers ahead, top-k' experts;
* ``m2r2-hybrid``: the same, plus the slow-state prediction of the next layer added to it (more recall);
* ``oracle``: the true trace, prefetched in order of need, Belady eviction; ``all-resident``: no loads.

Reported per (memory, budget, strategy): decode tokens/s, stall ms per token, hit rate (expert needs
served from fast memory without waiting), loads per token, prediction precision/recall, speedup over
``on-demand-lru`` (per prompt, geometric mean), the fraction of the LRU-to-oracle gap closed, and whether
every output equals the all-resident one. JSON, markdown table and a PNG of speedup against budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..options import int_at_least
from ..errors import M2R2Error
from ..provenance import machine_info, pin_threads, run_end, run_start
from .report import md_table, provenance_lines
from .stats import geomean

STRATEGIES = ("on-demand-lru", "on-demand-lfu", "pinned-lfu", "slow-prefetch", "m2r2-prefetch", "m2r2-hybrid",
              "oracle")
BASELINE = "on-demand-lru"
REUSE_AWARE = ("slow-prefetch", "m2r2-prefetch", "m2r2-hybrid")  # prefetchers evict what is not expected again


def _floats(s: str, name: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise M2R2Error(f"{name} must be comma-separated numbers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise M2R2Error(f"{name} needs positive values, got {s!r}")
    return vals


def run_one(lm, moe, acc, prompt, max_new: int, strategy: str, budget: int | None, store, trace,
            prefetch_k: int, counts: dict | None = None, loader_cpu: int | None = None,
            horizon: int | None = None, routers=None) -> dict:
    """One decode of ``prompt`` under ``strategy``; returns tokens, timing and cache statistics. ``counts``: the
    calibration usage counts of ``pinned-lfu``; ``loader_cpu``: the CPU the loader thread is pinned to."""
    from ..moe.memory import ExpertCache
    from ..moe.prefetch import M2R2Prefetch, MoEDecode, OnDemand, Oracle, Pinned, SlowPrefetch, Tracing

    cache = None
    if strategy == "all-resident":
        prov = Tracing(moe.bank, moe.num_layers)
        strat = MoEDecode(moe, prov, name=strategy)
    else:
        cache = ExpertCache(moe, budget, store, evict="lfu" if strategy == "on-demand-lfu" else "lru",
                            loader_cpu=loader_cpu)
        policy = {"on-demand-lru": OnDemand, "on-demand-lfu": OnDemand}.get(strategy)
        policy = policy() if policy else (Pinned(counts or {}) if strategy == "pinned-lfu" else
                                          SlowPrefetch(moe, prefetch_k) if strategy == "slow-prefetch" else
                                          M2R2Prefetch(moe, prefetch_k, horizon=horizon, routers=routers)
                                          if strategy == "m2r2-prefetch" else
                                          M2R2Prefetch(moe, prefetch_k, refine=True, horizon=horizon, routers=routers)
                                          if strategy == "m2r2-hybrid"
                                          else Oracle(trace))
        cache.policy = policy
        cache.reuse = strategy in REUSE_AWARE
        if hasattr(policy, "prepare"):
            policy.prepare(cache)
        fast = strategy in ("m2r2-prefetch", "m2r2-hybrid")
        strat = MoEDecode(moe, cache, acc if fast else None, policy if fast else None, name=strategy)
    try:
        out = lm.generate(list(prompt.token_ids), max_new_tokens=max_new, strategy=strat)
    finally:
        if cache is not None:
            cache.close()
    s = out.stats
    dec_s = s.seconds - s.prefill_seconds
    dec_tok = max(0, len(out.token_ids) - 1)
    rec = {"strategy": strategy, "prompt_id": prompt.id, "new_tokens": len(out.token_ids),
           "decode_tokens": dec_tok, "decode_seconds": dec_s, "prefill_seconds": s.prefill_seconds,
           "tokens_per_s": dec_tok / dec_s if dec_s > 0 else 0.0, "token_ids": out.token_ids,
           "fast_seconds": s.extra.get("fast_seconds", 0.0)}
    if cache is not None:
        rec["cache"] = cache.stats.to_dict()
        rec["loader_busy_seconds"] = cache.loader.busy_seconds
    else:
        rec["trace"] = prov.trace
    return rec


def aggregate(rows: list[dict], base: dict[str, dict], oracle: dict[str, dict], ref: dict[str, list],
              resident: dict[str, dict] | None = None) -> dict:
    tok = sum(r["decode_tokens"] for r in rows)
    sec = sum(r["decode_seconds"] for r in rows)
    out = {"prompts": len(rows), "decode_tokens": tok, "tokens_per_s": tok / sec if sec else 0.0,
           "identical_to_resident": sum(r["token_ids"] == ref[r["prompt_id"]] for r in rows)}
    ratios = [r["tokens_per_s"] / base[r["prompt_id"]]["tokens_per_s"] for r in rows
              if r["prompt_id"] in base and base[r["prompt_id"]]["tokens_per_s"] > 0 and r["tokens_per_s"] > 0]
    out["speedup_vs_lru"] = geomean(ratios) if ratios else None
    for key, other in (("of_oracle", oracle), ("of_resident", resident or {})):  # per prompt, geometric mean
        rs = [r["tokens_per_s"] / other[r["prompt_id"]]["tokens_per_s"] for r in rows
              if r["prompt_id"] in other and other[r["prompt_id"]]["tokens_per_s"] > 0 and r["tokens_per_s"] > 0]
        out[key] = geomean(rs) if rs else None
    # fraction of the LRU -> oracle gap in seconds per token that this strategy closes (pooled)
    spt = lambda rs: sum(r["decode_seconds"] for r in rs) / max(1, sum(r["decode_tokens"] for r in rs))  # noqa: E731
    if base and oracle:
        b = spt([base[r["prompt_id"]] for r in rows if r["prompt_id"] in base])
        o = spt([oracle[r["prompt_id"]] for r in rows if r["prompt_id"] in oracle])
        out["gap_closed"] = (b - spt(rows)) / (b - o) if b - o > 1e-9 else None
    caches = [r["cache"] for r in rows if "cache" in r]
    if caches:
        keys = ("lookups", "hits", "late", "misses", "loads", "prefetch_loads", "prefetch_used", "stall_seconds",
                "tokens", "pred_tp", "pred_fp", "pred_fn", "bytes_loaded")
        c = {k: sum(x[k] for x in caches) for k in keys}
        out["hit_rate"] = c["hits"] / c["lookups"] if c["lookups"] else None
        out["late_rate"] = c["late"] / c["lookups"] if c["lookups"] else None
        out["stall_ms_per_token"] = 1e3 * c["stall_seconds"] / c["tokens"] if c["tokens"] else None
        out["loads_per_token"] = c["loads"] / c["tokens"] if c["tokens"] else None
        out["precision"] = c["pred_tp"] / (c["pred_tp"] + c["pred_fp"]) if c["pred_tp"] + c["pred_fp"] else None
        out["recall"] = c["pred_tp"] / (c["pred_tp"] + c["pred_fn"]) if c["pred_tp"] + c["pred_fn"] else None
        out["prefetch_useful"] = c["prefetch_used"] / c["prefetch_loads"] if c["prefetch_loads"] else None
        ahead: dict = {}
        for x in caches:
            for a, (tp, fp, fn) in x.get("by_lookahead_counts", {}).items():
                t = ahead.setdefault(int(a), [0, 0, 0])
                t[0], t[1], t[2] = t[0] + tp, t[1] + fp, t[2] + fn
        out["by_lookahead"] = {a: {"precision": tp / (tp + fp) if tp + fp else None,
                                   "recall": tp / (tp + fn) if tp + fn else None, "n": tp + fn}
                               for a, (tp, fp, fn) in sorted(ahead.items())}
    fs = sum(r.get("fast_seconds", 0.0) for r in rows)
    out["fast_ms_per_token"] = 1e3 * fs / tok if tok and fs else None
    return out


def _fmt(x, spec=".2f"):
    return "-" if x is None else f"{x:{spec}}"


def render_markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# Benchmark: {doc['benchmark']}", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}; "
             f"loadavg at start {m.get('loadavg_start')}",
             f"- date: {m['date']}; command: `{m['command']}`", *provenance_lines(m),
             f"- model: {m['model']} MoEfied, {m['experts_per_layer']} experts/layer x {m['layers']} layers = "
             f"{m['total_experts']} experts of {m['expert_mb']:.2f} MB ({m.get('expert_format', 'f32')}); top-k "
             f"{m['top_k']}, prefetch top-k' {m['prefetch_k']}; M2R2 adapter R={m['rate']}; compute on 1 core, "
             f"expert loader thread pinned to CPU {m.get('loader_cpu')}",
             f"- prompts: {m['n_prompts']} ({m['prompts']}), {m['max_new_tokens']} new tokens, greedy, batch 1",
             f"- the prefetching strategies evict reuse-aware (an expert just used is expected again one token later); "
             f"M2R2 issues a predicted layer's loads {m.get('m2r2_horizon') or 0} layers ahead (0: at once)",
             *([f"- M2R2 fast-state routers fitted on {c['prompts']} prompts x {c['max_new_tokens']} tokens of "
                f"{c['data']}, ridge {c['ridge']:g} chosen on the last {c['heldout_prompts']} of them (top-k precision "
                f"there: the layers' own routers {c['heldout_precision_own_routers']:.2f}, fitted "
                f"{c['heldout_precision_fitted']:.2f})"]
               if (c := m.get("fast_router_calibration")) else []),
             f"- all-resident decode: {m['resident_tokens_per_s']:.1f} tokens/s; the dense model on the same prompts "
             f"and thread: {m.get('dense_tokens_per_s', 0):.1f} tokens/s; a token uses "
             f"{100 * m.get('active_param_fraction', 1):.1f}% of the parameters, so the all-resident step is "
             f"{m.get('resident_vs_scaled_dense') or 0:.2f}x the dense step scaled by that fraction"]
    if m.get("storage"):
        st = m["storage"]
        lines.append(f"- storage: {st['ms_per_expert']:.2f} ms per expert read, {st['gbps']:.2f} GB/s "
                     f"({st['page_cache_bypass']})")
    lines += ["", "Decode tokens/s (prefill excluded); speedup = per-prompt ratio to on-demand LRU, geometric mean; "
              "gap closed = (LRU - s) / (LRU - oracle) in seconds per token; hit = needed expert already loaded; "
              "precision/recall of the expert predictions for each (token, layer). ms/tok = stall (the compute thread "
              "waiting for a load) + other (compute, the policy's bookkeeping, and whatever the loader thread's copies "
              "and wake-ups cost the compute thread); fast = the M2R2 fast row and its predictions (part of other).",
              ""]
    header = ["memory", "budget", "strategy", "tok/s", "x LRU", "of oracle", "of resident", "gap closed", "ms/tok",
              "stall ms/tok",
              "other ms/tok", "fast ms/tok", "hit rate", "loads/tok", "precision", "recall", "same as resident"]
    rows = []
    for mem, by_b in doc["summary"].items():
        for b, by_s in by_b.items():
            for s, a in by_s.items():
                ms = 1e3 / a["tokens_per_s"] if a["tokens_per_s"] else None
                st = a.get("stall_ms_per_token")
                rows.append([mem, b, s, _fmt(a["tokens_per_s"], ".1f"), _fmt(a.get("speedup_vs_lru")),
                             _fmt(a.get("of_oracle")), _fmt(a.get("of_resident")), _fmt(a.get("gap_closed")), _fmt(ms, ".0f"), _fmt(st, ".0f"),
                             _fmt(None if ms is None or st is None else ms - st, ".0f"),
                             _fmt(a.get("fast_ms_per_token"), ".0f"),
                             _fmt(a.get("hit_rate")), _fmt(a.get("loads_per_token"), ".1f"),
                             _fmt(a.get("precision")), _fmt(a.get("recall")),
                             f"{a['identical_to_resident']}/{a['prompts']}"])
    lines.append(md_table(header, rows))
    # prediction quality by look-ahead (layers between the slow stream and the predicted layer)
    mem0 = next(iter(doc["summary"]), None)
    if mem0:
        b0 = "25%" if "25%" in doc["summary"][mem0] else next(iter(doc["summary"][mem0]))
        arows = [[s, str(a), _fmt(v["precision"]), _fmt(v["recall"]), str(v["n"])]
                 for s, agg in doc["summary"][mem0][b0].items() for a, v in (agg.get("by_lookahead") or {}).items()
                 if s != "oracle"]
        if arows:
            lines += ["", f"## Expert prediction by look-ahead ({mem0}, budget {b0})", "",
                      "Look-ahead = layers between the slow stream's position when the prediction was made and the "
                      "predicted layer; n = needed experts at that look-ahead.", "",
                      md_table(["strategy", "look-ahead", "precision", "recall", "n"], arows)]
    return "\n".join(lines) + "\n"


def render_chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mems = list(doc["summary"])
    fig, axes = plt.subplots(1, len(mems), figsize=(5 * len(mems), 4), squeeze=False)
    for ax, mem in zip(axes[0], mems):
        by_b = doc["summary"][mem]
        budgets = list(by_b)
        xs = [float(b.rstrip("%")) for b in budgets]
        for s in [*STRATEGIES]:
            ys = [by_b[b].get(s, {}).get("speedup_vs_lru") for b in budgets]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=s)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("fast-memory budget (% of experts)")
        ax.set_ylabel("decode speedup over on-demand LRU")
        ax.set_title(mem, fontsize=9)
        ax.set_xticks(xs)
        ax.legend(fontsize=7)
    m = doc["meta"]
    fig.suptitle(f"m2r2 bench moe: {m['total_experts']} experts, top-{m['top_k']} · {m['cpu']} · "
                 f"{m['threads']} thread(s) · {m['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:

    import m2r2
    from ..moe.stores import FileStore, LinkStore, measure_storage
    from ..moe.moefy import load_moefied
    from ..artifacts import cache_root
    from .args import build_prompts

    args.threads = pin_threads(args.threads or 1)
    # the loader thread needs the GIL for a moment after each transfer; Python's default 5 ms switch interval
    # would add up to 5 ms to every load the compute thread waits for
    sys.setswitchinterval(args.switch_interval_us * 1e-6)
    budgets = _floats(args.budget, "--budget")
    if any(b > 1 for b in budgets):
        raise M2R2Error("--budget values are fractions of all experts, in (0, 1]")
    bandwidths = [] if args.bandwidth.strip().lower() in ("", "none") else _floats(args.bandwidth, "--bandwidth")
    if not bandwidths and not args.storage:
        raise M2R2Error("nothing to measure: give --bandwidth values or --storage")
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise M2R2Error(f"unknown strategies {bad} (available: {', '.join(STRATEGIES)})")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    load_avg = run_start()["loadavg"]
    lm = m2r2.load(args.model, dtype="float32", threads=args.threads)
    prompts, warm = build_prompts(lm, args)
    if len(prompts) < 2 and "pinned-lfu" in names:
        raise M2R2Error("pinned-lfu calibrates on the other prompts' traces: give at least 2 prompts")
    acc = (lm.load_accelerator(args.adapter, rate=args.rate)
           if {"m2r2-prefetch", "m2r2-hybrid"} & set(names) else None)
    # the dense model's own decode first (same prompts, tokens and thread): the step the all-resident MoE is held to,
    # scaled by the fraction of the parameters a token uses
    lm.generate(list(warm.token_ids), max_new_tokens=8)
    dense_tok = dense_sec = 0.0
    for p in prompts:
        st = lm.generate(list(p.token_ids), max_new_tokens=args.max_new_tokens).stats
        dense_tok += st.new_tokens - 1
        dense_sec += st.seconds - st.prefill_seconds
    moe = load_moefied(lm, args.moe, num_experts=args.experts, top_k=args.top_k, expert_format=args.expert_format)
    # one compute thread on CPU 0, the loader thread on CPU 1 (where there is one): loads never take the compute
    # thread's core, and what they still cost it (the GIL, memory traffic) shows as the strategies' "other" time
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        loader_cpu = None
        if args.threads == 1 and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})
            loader_cpu = cpus[1]
        k = moe.top_k
        pk = args.prefetch_k or k
        if pk < k:
            raise M2R2Error(f"--prefetch-k ({pk}) must be >= the top-k ({k})")
        total = moe.total_experts
        mems: list[tuple[str, object]] = [(f"link {bw:g} GB/s {args.latency_us:g} us",
                                           LinkStore(moe.bank, bw, args.latency_us * 1e-6)) for bw in bandwidths]
        storage = None
        if args.storage:
            d = Path(args.storage_dir) if args.storage_dir else cache_root() / "moe" / lm.source.identity[:16] / (
                f"e{moe.spec.num_experts}-{moe.spec.expert_format}-{moe.fingerprint()[:12]}")
            fs = FileStore(d, moe.bank)
            storage = measure_storage(fs, list(moe.bank)[: min(48, total)], moe.expert_bytes())
            mems.append((f"storage ({storage['page_cache_bypass']})", fs))
        print(f"m2r2 bench moe: {total} experts of {moe.expert_bytes() / 1e6:.2f} MB, top-{k}, prefetch k'={pk}; "
              f"{len(prompts)} prompts; budgets {budgets}; memories {[m for m, _ in mems]}; strategies {names}",
              file=sys.stderr)
        from tqdm.auto import tqdm

        from ..moe.fast_routers import fit_fast_routers
        from ..moe.prefetch import usage_counts
        routers, calibration = None, None
        if acc is not None and args.calibration_prompts:  # the fast stream's routers, fitted on self-distillation prompts
            from ..moe.moefy import load_records
            recs = load_records(args.calibration_data)[: args.calibration_prompts]
            routers, calibration = fit_fast_routers(lm, moe, acc, [r["prompt_ids"] for r in recs],
                                                    args.calibration_tokens, progress=not args.no_progress)
            calibration["data"] = args.calibration_data
            print(f"m2r2 bench moe: fast routers calibrated: {calibration}", file=sys.stderr)
        # warm-up (untimed): one all-resident decode
        run_one(lm, moe, acc, warm, 8, "all-resident", None, None, None, pk)
        records, ref, traces = [], {}, {}
        n_runs = len(prompts) * (1 + sum(len(budgets) * len(names) for _ in mems))
        bar = tqdm(total=n_runs, desc="bench moe", unit="run", disable=args.no_progress)
        for p in prompts:  # all-resident first: the reference outputs, the oracle's traces, the calibration counts
            r = run_one(lm, moe, acc, p, args.max_new_tokens, "all-resident", None, None, None, pk)
            ref[p.id], traces[p.id] = r["token_ids"], r.pop("trace")
            records.append({**r, "memory": "resident", "budget": "100%"})
            bar.update(1)
        for i, p in enumerate(prompts):
            counts = usage_counts([t for q, t in traces.items() if q != p.id])  # never this prompt's own trace
            for mem, store in mems:
                for b in budgets:
                    n = max(k, round(b * total))
                    order = names[i % len(names):] + names[: i % len(names)]  # no strategy always runs first
                    for s in order:
                        bar.set_postfix_str(f"{p.id} {mem} {b:.1%} {s}", refresh=False)
                        r = run_one(lm, moe, acc, p, args.max_new_tokens, s, n, store, traces[p.id], pk, counts,
                                    loader_cpu, args.m2r2_horizon or None, routers)
                        records.append({**r, "memory": mem, "budget": f"{100 * b:g}%", "budget_experts": n})
                        bar.update(1)
        bar.close()
    finally:  # the process's own CPUs again (the pinning is for the measured runs only)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    run_end()
    for _, store in mems:
        store.close()
    summary: dict = {}
    resident = {r["prompt_id"]: r for r in records if r["strategy"] == "all-resident"}
    for mem, _ in mems:
        summary[mem] = {}
        for b in budgets:
            bk = f"{100 * b:g}%"
            rows = [r for r in records if r["memory"] == mem and r["budget"] == bk]
            base = {r["prompt_id"]: r for r in rows if r["strategy"] == BASELINE}
            orc = {r["prompt_id"]: r for r in rows if r["strategy"] == "oracle"}
            summary[mem][bk] = {s: aggregate([r for r in rows if r["strategy"] == s], base, orc, ref, resident)
                                for s in names}
    res = [r for r in records if r["strategy"] == "all-resident"]
    resident_tps = sum(r["decode_tokens"] for r in res) / sum(r["decode_seconds"] for r in res)
    c = lm.model.cfg
    attn, ffn, head = c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size), \
        c.num_layers * 3 * c.hidden_size * c.intermediate_size, c.vocab_size * c.hidden_size
    active = (attn + ffn * k / moe.spec.num_experts + head) / (attn + ffn + head)
    dense_tps = dense_tok / dense_sec if dense_sec else 0.0
    meta = {**machine_info(), "schema_version": 1, "loadavg_start": load_avg, "model": lm.source.name,
            "moe": moe.info.get("kind"), "experts_per_layer": moe.spec.num_experts, "layers": moe.num_layers,
            "total_experts": total, "expert_mb": moe.expert_bytes() / 1e6, "top_k": k, "prefetch_k": pk,
            "rate": args.rate, "budgets": budgets, "bandwidths_gbps": bandwidths, "latency_us": args.latency_us,
            "storage": storage, "prompts": args.prompt_ids or args.prompts, "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "resident_tokens_per_s": resident_tps,
            "dense_tokens_per_s": dense_tps, "active_param_fraction": active,
            # all-resident ms/token over (dense ms/token x active fraction): 1.0 = the MoE step costs exactly its share
            "resident_vs_scaled_dense": (1 / resident_tps) / (active / dense_tps) if resident_tps and dense_tps else None,
            "strategies": names, "switch_interval_us": args.switch_interval_us, "expert_format": moe.spec.expert_format,
            "experts_bytes": moe.expert_bytes(), "loader_cpu": loader_cpu,
            "m2r2_horizon": args.m2r2_horizon, "fast_router_calibration": calibration, "moe_quality": moe.info.get("quality"), "moe_recovery": (moe.info.get("recovery") or {}).get("steps")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = [{k_: v for k_, v in r.items() if k_ != "token_ids"} for r in records]
    doc = {"benchmark": args.out, "meta": meta, "records": recs, "summary": summary}
    (out / f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{args.out}.md").write_text(render_markdown(doc))
    render_chart(doc, out / f"{args.out}.png")
    print(render_markdown(doc), file=sys.stderr)
    print(json.dumps({"benchmark": args.out, "json": str(out / f"{args.out}.json"),
                      "summary": {m_: {b_: {s: round(a["speedup_vs_lru"] or 0, 3) for s, a in v.items()}
                                       for b_, v in by.items()} for m_, by in summary.items()}}), flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("moe", help="MoE expert offloading: on-demand LRU/LFU vs slow-state, M2R2 and oracle "
                                         "prefetch under a fast-memory budget",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="dense model to MoEfy (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--moe", default=None, help="MoEfication directory (default: the shipped one with --experts)")
    p.add_argument("--experts", type=int_at_least("--experts", 2), default=16,
                   help="experts per layer of the shipped MoEfication to use (default 16: top-4, recovered)")
    p.add_argument("--expert-format", choices=("f32", "q8_0", "q4_1"), default="q8_0",
                   help="how experts are stored and moved (default q8_0: a quarter of float32's bytes)")
    p.add_argument("--adapter", default=None, help="M2R2 adapter directory (default: the shipped one for --rate)")
    p.add_argument("--rate", type=int, default=2)
    p.add_argument("--top-k", type=int_at_least("--top-k", 1), default=None, help="experts per token and layer "
                                                                                   "(default: the MoEfication's)")
    p.add_argument("--prefetch-k", type=int_at_least("--prefetch-k", 1), default=None,
                   help="k' experts prefetched per predicted layer (default: top-k)")
    p.add_argument("--m2r2-horizon", type=int_at_least("--m2r2-horizon", 0), default=2,
                   help="M2R2 strategies issue a predicted layer's loads once the slow stream is within this many "
                        "layers of it (default 2; 0: as soon as predicted)")
    p.add_argument("--calibration-prompts", type=int_at_least("--calibration-prompts", 0), default=32,
                   help="self-distillation prompts the M2R2 strategies' fast-state routers are fitted on (0: the "
                        "target layers' own routers)")
    p.add_argument("--calibration-tokens", type=int_at_least("--calibration-tokens", 2), default=48)
    p.add_argument("--calibration-data", default="data/distill-smollm2-135m",
                   help="where the calibration prompts come from (never an evaluation set)")
    p.add_argument("--budget", default="0.125,0.25,0.5", help="fast-memory budgets, fractions of all experts")
    p.add_argument("--bandwidth", default="0.5,2,8", help="modelled link bandwidths in GB/s (comma-separated; 'none' for storage only)")
    p.add_argument("--latency-us", type=float, default=50.0, help="modelled link latency per transfer (µs)")
    p.add_argument("--storage", action="store_true", help="also real per-expert file reads (page cache bypassed)")
    p.add_argument("--storage-dir", default=None, help="where the expert files go (default: the m2r2 cache)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--prompts", default="mt-bench")
    p.add_argument("--prompt-ids", default=None)
    p.add_argument("--limit", type=int_at_least("--limit", 1), default=20)
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 2), default=64)
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=1)
    p.add_argument("--switch-interval-us", type=float, default=100.0,
                   help="Python's GIL switch interval during the run (default 100 µs; Python's own is 5000)")
    p.add_argument("--out", default="moe")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
