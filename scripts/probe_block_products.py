"""Cost of the GGUF block products (weights="gguf") against the float32 ones, per number of rows: the 120
products of the embedded model's 30 blocks (qkv, o, gate_up, down shapes), each layer its own weight (so every
call streams from memory, as in decoding), through native.qgemv (Q4_1 blocks) and native.gemv (float32).
Writes benchmarks/results/block-products.json.

    python scripts/probe_block_products.py
"""

import json
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import m2r2  # noqa: F401  (OpenMP policy before torch's pool starts)
from m2r2.engine import native
from m2r2.provenance import machine_info, pin_threads, run_end, run_start

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def main():
    start = run_start()
    pin_threads(2)
    assert native.available()
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(30):
        layer = {}
        for name, (out, inp) in SHAPES.items():
            raw = quants.quantize((rng.standard_normal((out, inp)) * 0.05).astype(np.float32), Q.Q4_1)
            deq = quants.dequantize(raw, Q.Q4_1).astype(np.float32)
            layer[name] = (torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(deq).T.contiguous(), out, inp)
        layers.append(layer)

    def step(rows, kind):
        xs = {inp: torch.randn(rows, inp) for inp in (576, 1536)}
        for layer in layers:
            for raw, wt, out, inp in layer.values():
                if kind == "q4_1":
                    native.qgemv(xs[inp], raw, "q4_1", None, out)
                else:
                    native.gemv(xs[inp], wt, None, out)

    res = {}
    for rows in (1, 2, 3, 5, 8, 9, 16):
        res[rows] = {}
        for kind in ("q4_1", "float32"):
            for _ in range(2):
                step(rows, kind)
            t = time.perf_counter()
            for _ in range(10):
                step(rows, kind)
            res[rows][kind] = (time.perf_counter() - t) / 10 * 1000
    curve = {str(r): {k: {"ms": v, "x_one_row": v / res[1][k]} for k, v in d.items()} for r, d in res.items()}
    doc = {"benchmark": "block-products", "meta": {**machine_info(), "start": start, "end": run_end()},
           "what": "120 products of the embedded model's block shapes, distinct weights, ms per step", "curve": curve}
    with open("benchmarks/results/block-products.json", "w") as f:
        json.dump(doc, f, indent=1)
    for r, d in curve.items():
        print(r, {k: f"{v['ms']:.2f} ms ({v['x_one_row']:.2f}x)" for k, v in d.items()})


if __name__ == "__main__":
    main()
