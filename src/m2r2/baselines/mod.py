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
The fitting (and the ``train-mod`` command) is ``m2r2.training.mod``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, StrategyError
from ..artifacts import find_shipped as find_artifact, load_pair, save_pair

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
        d = Path(path)

        def build(raw: dict) -> "MoDRouters":
            cfg = MoDConfig(**raw)
            if not all(isinstance(i, int) and 0 <= i < cfg.num_layers for i in cfg.routed) \
                    or len(set(cfg.routed)) != len(cfg.routed):
                raise AdapterError(f"the MoD routers in {d} route blocks {cfg.routed}: not distinct blocks of a "
                                   f"{cfg.num_layers}-layer model")
            return cls(cfg)

        # routers recording no base model (an empty base_identity) load for any
        r = load_pair(d, "mod", "MoD routers", build, identity=identity, identity_optional=True)
        cfg = r.cfg
        if num_layers is not None and cfg.num_layers != num_layers:
            raise AdapterError(f"the MoD routers in {d} are for a {cfg.num_layers}-layer model, not {num_layers}")
        return r.eval()


def find_shipped(identity: str) -> Path | None:
    return find_artifact(identity, "mod")
