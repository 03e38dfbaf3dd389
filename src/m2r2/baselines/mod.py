"""Mixture-of-Depths routing applied post hoc to a frozen pretrained model (a baseline for M2R2's exits).

MoD (Raposo et al., 2024) trains a router per block, from scratch, that sends only the top-capacity tokens
through the block; the rest ride the residual connection. On a *pretrained* model nothing was trained to
be skipped, so the routers here learn which tokens a block matters least for: per routed block i, a
linear router on the RMS-normalised block input predicts the log of the block's relative update
``log(||B_i(x) - x|| / ||x||)`` (a token whose update is small loses little when the block is skipped).
Each router is a ridge regression solved in closed form from streamed normal equations over the
self-distillation data (the exact optimum of its objective: no learning rate, nothing to tune but the
ridge), and calibrated on held-out sequences: the stored quantiles of its predicted scores turn a
*capacity* into a per-block threshold, so ``skip=0.25`` skips about a quarter of the tokens at every
routed block. The decision reads only the token's own state, so it is causal: decoding needs no
auxiliary predictor (MoD's top-k over a sequence is not available one token at a time).

A skipped block still writes the token's K/V, computed from the state entering the block (exactly what
the block would compute from that state), so later tokens always find a K/V there: the only cost kept is
the block's k/v projection (~6% of its weights on SmolLM2). First and last blocks are never routed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, StrategyError
from ..artifacts import load_pair, save_pair

MOD_FORMAT = 1
N_QUANTILES = 101


@dataclass
class MoDConfig:
    hidden_size: int
    num_layers: int
    routed: list[int]
    base_identity: str = ""
    ridge: float = 1.0
    format: int = MOD_FORMAT
    training: dict = field(default_factory=dict)


class MoDRouters(nn.Module):
    """One linear router per routed block, with held-out score quantiles for capacity calibration."""

    def __init__(self, cfg: MoDConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.routed)
        self.weight = nn.Parameter(torch.zeros(n, cfg.hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.register_buffer("quantiles", torch.zeros(n, N_QUANTILES))
        self.slot = {layer: j for j, layer in enumerate(cfg.routed)}

    @staticmethod
    def features(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Predicted log relative update of block ``layer`` for states h (..., D)."""
        j = self.slot[layer]
        return self.features(h) @ self.weight[j] + self.bias[j]

    def thresholds(self, skip: float) -> dict[int, float]:
        """Per routed block, the score below which a token skips it so that a fraction ``skip`` of tokens
        (on held-out data) does."""
        if not 0.0 <= skip <= 1.0:
            raise StrategyError(f"MoD skip fraction must be in [0, 1], got {skip}")
        import numpy as np
        grid = np.linspace(0.0, 1.0, N_QUANTILES)
        # linear interpolation inside the stored quantile curve; skip=0 -> never
        return {layer: float(np.interp(skip, grid, self.quantiles[j].numpy())) if skip > 0 else float("-inf")
                for layer, j in self.slot.items()}

    # ---- files ----
    def save(self, path: str | os.PathLike) -> Path:
        return save_pair(path, "mod", self.state_dict(), asdict(self.cfg))

    @classmethod
    def load(cls, path: str | os.PathLike, identity: str | None = None,
             num_layers: int | None = None) -> "MoDRouters":
        r = load_pair(path, "mod", "MoD routers", lambda raw: cls(MoDConfig(**raw)))
        cfg, d = r.cfg, Path(path)
        if not all(isinstance(i, int) and 0 <= i < cfg.num_layers for i in cfg.routed) \
                or len(set(cfg.routed)) != len(cfg.routed):
            raise AdapterError(f"the MoD routers in {d} route blocks {cfg.routed}: not distinct blocks of a "
                               f"{cfg.num_layers}-layer model")
        if identity is not None and cfg.base_identity and cfg.base_identity != identity:
            raise AdapterError(f"the MoD routers in {d} were trained for another model ({cfg.base_identity}), "
                               f"not {identity}")
        if num_layers is not None and cfg.num_layers != num_layers:
            raise AdapterError(f"the MoD routers in {d} are for a {cfg.num_layers}-layer model, not {num_layers}")
        return r.eval()


def find_shipped(identity: str) -> Path | None:
    from ..stream.accelerator import shipped_dir
    root = shipped_dir()
    for f in sorted(root.glob("*/mod.json")) if root.is_dir() else []:
        try:
            if json.loads(f.read_text()).get("base_identity") == identity:
                return f.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


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

    from ..training.adapters import make_batch

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
    from ..training.data import load_dataset

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
    (out / "mod-report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_layer"}))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..options import float_in, int_at_least
    p = subparsers.add_parser("train-mod", help="fit post-hoc Mixture-of-Depths routers (the MoD baseline)",
                              description=__doc__.split("\n\n")[0])
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
