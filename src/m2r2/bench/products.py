"""`m2r2 bench products`: what extra rows cost. Every linear product of one decode step of the model's blocks
(qkv, o, gate_up, down of every layer, each layer its own weights so that every call streams from memory as in
decoding) at 1..16 token rows, for each weight storage: float32 and fp16 through m2r2's native kernels, float32
through oneDNN's prepacked inner product (the best existing CPU kernel for this shape, PyTorch's), and each GGUF
block format through m2r2's block kernels. Speculative verification, riding rows and batched serving all pay
this curve.

Each storage runs in its own process (a thread pool never shares the CPU with the next arm's), threads pinned,
warm-up, median of repeats. Besides the time and its ratio to one row, every point gets its two floors: memory
(the step's weight bytes at the measured bandwidth) and compute (rows x weights multiply-adds at the float32
multiply-add rate measured on the same threads); the larger is the hardware's bound for that point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from ..errors import M2R2Error

BLOCK_ARMS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k")
ARMS = ("fp32", "fp16", "onednn-fp32", *BLOCK_ARMS)


def block_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of the four fused linears of a block."""
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv": (nq + 2 * nkv, cfg.hidden_size), "o": (cfg.hidden_size, nq),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size)}


def _weights(arm: str, shapes: dict, layers: int, seed: int = 0) -> list[list[tuple]]:
    """Per layer, per linear: the product's operands in ``arm``'s storage (random values of a trained layer's size;
    speed does not depend on them)."""
    import numpy as np
    import torch
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        layer = []
        for name, (o, i) in shapes.items():
            if arm in BLOCK_ARMS:
                from ..engine.blocks import BLOCK_FORMATS
                f = BLOCK_FORMATS[arm.upper()]
                raw = rng.integers(0, 256, (o, i // f.weights_per_block * f.bytes_per_block), dtype=np.uint8)
                layer.append((torch.from_numpy(raw), o, i))
                continue
            w = torch.from_numpy((rng.standard_normal((o, i)) * 0.05).astype(np.float32))
            if arm == "onednn-fp32":
                layer.append((torch.ops.mkldnn._reorder_linear_weight(w, None), o, i))
            else:
                wt = w.T.contiguous()
                layer.append((wt.half() if arm == "fp16" else wt, o, i))
        out.append(layer)
    return out


def worker(arm: str, rows_list: list[int], threads: int, repeats: int, warmup: int, shapes: dict,
           layers: int) -> dict:
    """Runs in the arm's own process: ms per step (all products of all layers) for each number of rows."""
    import torch

    from ..engine import native
    from ..provenance import pin_threads
    pin_threads(threads)
    if arm != "onednn-fp32" and not native.available():
        raise M2R2Error("the native kernels could not be built here")
    ws = _weights(arm, shapes, layers)
    g = torch.Generator().manual_seed(1)
    times = {}
    for rows in rows_list:
        xs = {i: torch.randn(rows, i, generator=g) for _, (_, i) in shapes.items()}

        def step():
            for layer in ws:
                for w, o, i in layer:
                    if arm in BLOCK_ARMS:
                        native.qgemv_kind(xs[i], w, native.BLOCK_KINDS[arm], None, o)
                    elif arm == "onednn-fp32":
                        torch.ops.mkldnn._linear_pointwise(xs[i], w, None, "none", [None], "")
                    else:
                        native.gemv(xs[i], w, None, o)

        for _ in range(warmup):
            step()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            ts.append((time.perf_counter() - t0) * 1e3)
        times[rows] = statistics.median(ts)
    return {"ms": times}


def _bytes_per_weight(arm: str) -> float:
    from ..engine.blocks import BLOCK_FORMATS
    if arm in BLOCK_ARMS:
        return BLOCK_FORMATS[arm.upper()].bytes_per_weight
    return 2.0 if arm == "fp16" else 4.0


def main(args: argparse.Namespace) -> int:
    import m2r2
    from ..engine import native
    from ..provenance import machine_info, pin_threads, run_end, run_start
    from .report import md_table

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if not arms or bad:
        raise M2R2Error(f"unknown arm(s) {', '.join(bad) or '(none)'} (available: {', '.join(ARMS)})")
    try:
        rows_list = sorted({int(r) for r in args.rows.split(",")})
    except ValueError:
        raise M2R2Error(f"--rows takes comma-separated integers, not {args.rows!r}") from None
    if not rows_list or rows_list[0] < 1 or rows_list[-1] > 64:
        raise M2R2Error("--rows must lie in 1..64")
    start = run_start(args.bandwidth_mb)
    pin_threads(args.threads)
    lm = m2r2.load(args.model, dtype="float32")
    shapes = block_shapes(lm.config)
    layers = lm.config.num_layers
    weights_per_step = layers * sum(o * i for o, i in shapes.values())
    fma = native.fma_rate(args.threads) if native.available() else None
    results = {}
    try:
        from tqdm import tqdm
        bar = tqdm(arms, desc="bench products", disable=args.no_progress, file=sys.stderr)
    except ImportError:
        bar = arms
    for arm in bar:  # each arm in its own process
        code = "import json, sys; from m2r2.bench import products as p; print(json.dumps(p.worker(*json.loads(sys.argv[1]))))"
        r = subprocess.run([sys.executable, "-c", code,
                            json.dumps([arm, rows_list, args.threads, args.repeats, args.warmup, shapes, layers])],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise M2R2Error(f"arm {arm} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        results[arm] = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1])["ms"].items()}
    end = run_end(args.bandwidth_mb)
    bandwidth = start["bandwidth_gbps"]
    curve = {}
    for arm, ms in results.items():
        step_bytes = weights_per_step * _bytes_per_weight(arm)
        mem_ms = step_bytes / (bandwidth * 1e9) * 1e3
        curve[arm] = {"bytes_per_step": step_bytes, "memory_floor_ms": mem_ms, "points": {}}
        for rows, t in ms.items():
            comp_ms = rows * weights_per_step / fma * 1e3 if fma else None
            floor = max(mem_ms, comp_ms or 0.0)
            curve[arm]["points"][str(rows)] = {
                "ms": t, "x_one_row": t / ms[rows_list[0]] if rows_list[0] == 1 else None,
                "x_fp32_one_row": t / results["fp32"][1] if "fp32" in results and 1 in results["fp32"] else None,
                "compute_floor_ms": comp_ms, "floor_ms": floor, "pct_of_floor": 100.0 * floor / t}
    meta = {**machine_info(), "start": start, "end": end, "fma_rate_per_s": fma, "bandwidth_gbps": bandwidth,
            "model": repr(lm), "weights_per_step": weights_per_step, "repeats": args.repeats, "warmup": args.warmup}
    doc = {"benchmark": "products", "meta": meta,
           "what": f"all {4 * layers} block products of one step ({layers} layers x qkv, o, gate_up, down, distinct "
                   f"weights), ms per step by rows; floors: memory (bytes / bandwidth) and compute (rows x weights "
                   f"multiply-adds / measured FMA rate)", "curve": curve}
    from pathlib import Path
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    header = ["storage", "bytes/step", *[f"{r} rows ms (x1)" for r in rows_list], "floor @1 / @16"]
    table = []
    for arm, c in curve.items():
        pts = c["points"]
        cells = [f"{pts[str(r)]['ms']:.2f} ({pts[str(r)]['x_one_row'] or 0:.2f}x)" for r in rows_list]
        floors = " / ".join(f"{pts[str(r)]['floor_ms']:.2f}" for r in (rows_list[0], rows_list[-1]))
        table.append([arm, f"{c['bytes_per_step'] / 1e6:.0f} MB", *cells, floors])
    md = [f"# bench products\n", doc["what"] + ".\n",
          f"{meta['cpu']}, {args.threads} threads, bandwidth {bandwidth:.1f} GB/s, FMA rate "
          f"{(fma or 0) / 1e9:.1f} G multiply-adds/s, commit {meta.get('git_commit', '?')[:10]}"
          f"{' (dirty)' if meta.get('git_dirty') else ''}, load {start['loadavg'][0] if start['loadavg'] else '?'}; "
          f"command `{start['command']}`.\n", md_table(header, table)]
    (out / f"{args.out}.md").write_text("\n".join(md) + "\n")
    _chart(curve, rows_list, out / f"{args.out}.png", meta)
    print(md_table(header, table), file=sys.stderr)
    print(json.dumps({"benchmark": "products", "json": str(out / f"{args.out}.json"),
                      "ms": {a: {r: round(v["points"][str(r)]["ms"], 3) for r in rows_list} for a, v in curve.items()}}))
    return 0


def _chart(curve: dict, rows_list: list[int], path, meta: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, c in curve.items():
        ax.plot(rows_list, [c["points"][str(r)]["ms"] for r in rows_list], marker="o", label=arm)
    any_arm = next(iter(curve.values()))
    comp = [any_arm["points"][str(r)]["compute_floor_ms"] for r in rows_list]
    if all(c is not None for c in comp):
        ax.plot(rows_list, comp, "k--", label="compute floor (FMA rate)")
    ax.set_xlabel("token rows per product")
    ax.set_ylabel("ms per step (all block products)")
    ax.set_title(f"{meta.get('cpu')} · {meta.get('threads')} threads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("products", help="cost of 1..16 token rows per weight storage (the multi-row curve)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model whose block shapes to use (default: the embedded model)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated storages (default: {','.join(ARMS)})")
    p.add_argument("--rows", default="1,2,3,5,8,9,16", help="row counts (default 1,2,3,5,8,9,16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bandwidth-mb", type=int, default=256)
    p.add_argument("--out", default="products")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
