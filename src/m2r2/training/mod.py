"""``m2r2 train-mod``: fit post-hoc Mixture-of-Depths routers (``m2r2.baselines.mod``, the MoD baseline).

Per routed block, a ridge regression from the RMS-normalised block input to the log relative update of the
block, solved in closed form from streamed normal equations over the self-distillation data, then calibrated
on held-out sequences (stored score quantiles turn a skip fraction into a per-block threshold).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..artifacts import write_json
from ..baselines.mod import N_QUANTILES, MoDConfig, MoDRouters


# ---------------------------------------------------------------------------------------------------
# fitting: streamed normal equations over the slow stream's states on the self-distillation data


@torch.no_grad()
def block_updates(model, ids: torch.Tensor, mask: torch.Tensor, routed: list[int]):
    """For the response positions of one sequence: per routed block, (features (n, D), log relative update (n,))."""
    from ..stream.accelerator import slow_trace
    states, _ = slow_trace(model, ids)
    sel = mask[0].nonzero()[:, 0]
    out = {}
    for i in routed:
        x, y = states[i][0, sel].float(), states[i + 1][0, sel].float()
        rel = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)
        out[i] = (MoDRouters.features(x), rel.clamp_min(1e-6).log())
    return out


def fit(lm, records: list[dict], val_records: list[dict], routed: list[int], ridge: float = 1.0,
        max_len: int = 320, progress: bool = True) -> tuple[MoDRouters, dict]:
    from tqdm.auto import tqdm

    from .adapters import make_batch

    model, D = lm.model, lm.config.hidden_size
    A = {i: torch.zeros(D + 1, D + 1, dtype=torch.float64) for i in routed}
    b = {i: torch.zeros(D + 1, dtype=torch.float64) for i in routed}
    n_pos = 0
    for r in tqdm(records, desc="MoD routers (fit)", unit="seq", file=sys.stderr, disable=not progress):
        ids, mask = make_batch([r], [0], max_len)
        for i, (x, y) in block_updates(model, ids, mask, routed).items():
            xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
            A[i] += xb.T @ xb
            b[i] += xb.T @ y.double()
        n_pos += int(mask.sum())
    routers = MoDRouters(MoDConfig(D, lm.config.num_layers, list(routed), lm.source.identity, ridge))
    for j, i in enumerate(routed):
        reg = ridge * torch.eye(D + 1, dtype=torch.float64)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        w = torch.linalg.solve(A[i] + reg, b[i])
        routers.weight.data[j] = w[:-1].float()
        routers.bias.data[j] = w[-1].float()
    # calibration and held-out quality
    scores = {i: [] for i in routed}
    truth = {i: [] for i in routed}
    for r in tqdm(val_records, desc="MoD routers (held out)", unit="seq", file=sys.stderr, disable=not progress):
        ids, mask = make_batch([r], [0], max_len)
        for i, (x, y) in block_updates(model, ids, mask, routed).items():
            j = routers.slot[i]
            scores[i].append(x @ routers.weight[j] + routers.bias[j])
            truth[i].append(y)
    grid = torch.linspace(0, 1, N_QUANTILES)
    per_layer = {}
    for j, i in enumerate(routed):
        s, t = torch.cat(scores[i]), torch.cat(truth[i])
        routers.quantiles[j] = torch.quantile(s, grid)
        r2 = 1 - float(((s - t) ** 2).mean() / t.var().clamp_min(1e-12))
        # of the tokens the router would skip at 25% capacity, how many are truly among the 25% smallest
        k = max(1, len(s) // 4)
        picked = set(torch.topk(-s, k).indices.tolist())
        true = set(torch.topk(-t, k).indices.tolist())
        per_layer[i] = {"r2": round(r2, 4), "overlap@0.25": round(len(picked & true) / k, 4),
                        "mean_log_rel_update": round(float(t.mean()), 4)}
    report = {"train_positions": n_pos, "val_positions": sum(len(t) for t in truth[routed[0]]),
              "mean_r2": round(sum(v["r2"] for v in per_layer.values()) / len(per_layer), 4),
              "mean_overlap@0.25": round(sum(v["overlap@0.25"] for v in per_layer.values()) / len(per_layer), 4),
              "per_layer": per_layer}
    return routers, report


def main(args: argparse.Namespace) -> int:
    import m2r2
    from ..provenance import command_line
    from .data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = m2r2.load(args.model, threads=args.threads)
    L = lm.config.num_layers
    routed = list(range(1, L - 1))
    records = load_dataset(args.data, model_identity=lm.source.identity)
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    n_val = max(1, min(len(order) // 10, args.val_sequences))
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:][: args.sequences]]
    t0 = time.perf_counter()
    routers, report = fit(lm, train, val, routed, args.ridge, args.max_len, not args.no_progress)
    routers.cfg.training = {"command": command_line(), "data": str(args.data), "sequences": len(train),
                            "val_sequences": len(val), "wall_seconds": round(time.perf_counter() - t0, 1),
                            **{k: v for k, v in report.items() if k != "per_layer"}}
    out = Path(args.out)
    routers.save(out)
    write_json(out / "mod-report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "per_layer"}))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..options import float_in, int_at_least
    p = subparsers.add_parser("train-mod", help="fit post-hoc Mixture-of-Depths routers (the MoD baseline)",
                              description=sys.modules[MoDRouters.__module__].__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="self-distillation data directory (from `m2r2 data`)")
    p.add_argument("--out", required=True, help="directory for mod.json / mod.safetensors")
    p.add_argument("--sequences", type=int_at_least("--sequences", 1), default=200,
                   help="training sequences (default 200)")
    p.add_argument("--val-sequences", type=int_at_least("--val-sequences", 1), default=40,
                   help="held-out sequences for calibration (default 40)")
    p.add_argument("--ridge", type=float_in("--ridge", 0), default=1.0)
    p.add_argument("--max-len", type=int_at_least("--max-len", 2), default=320)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
