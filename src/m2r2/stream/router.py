"""ARLA, the exit router: does the fast stream's read-out at layer l already equal the full model's token?

Design (ours; the paper names the router but its abstract gives no architecture): the trajectory of the
fast stream's states up to layer l, each RMS-normalised and projected to a small latent (shared
projection plus a learned per-layer embedding), a one-head attention from layer l's latent over layers
1..l, and a small MLP on [attended, own latent] to one logit. It reads only the states the fast stream
computes anyway, so checking it costs a few small matrix products per layer, while a confidence rule
(CALM) must run the 49,152-row LM head at every layer it checks; the head then runs once, at the exit.

Trained after the adapters, with BCE on agreement labels (1 where the read-out at fast layer l equals the
full model's next token) from the self-distillation data (``m2r2 train-router``); saved beside the
adapter it was trained for (``router.safetensors`` + ``router.json``). The training (features, fit, the
``train-router`` command) is ``m2r2.training.router``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..artifacts import load_pair, save_pair

ROUTER_FORMAT = 1


@dataclass
class RouterConfig:
    hidden_size: int
    fast_layers: int
    latent: int = 64
    format: int = ROUTER_FORMAT
    training: dict = field(default_factory=dict)


class ARLARouter(nn.Module):
    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.latent
        self.proj = nn.Linear(cfg.hidden_size, d)
        self.layer_emb = nn.Parameter(torch.zeros(cfg.fast_layers + 1, d))
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, 1))

    def latents(self, states: torch.Tensor) -> torch.Tensor:
        """states (..., l, D) of fast layers 1..l -> latents (..., l, d)."""
        l = states.shape[-2]
        x = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.proj(x) + self.layer_emb[1: l + 1]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Exit logits for every layer of a trajectory: states (N, l, D) -> (N, l), where entry j attends
        over layers 1..j+1 only (causal over depth), so one call trains every layer at once."""
        z = self.latents(states)  # (N, l, d)
        l = z.shape[1]
        att = (self.q(z) @ self.k(z).transpose(1, 2)) / self.cfg.latent ** 0.5  # (N, l, l)
        causal = torch.ones(l, l, dtype=torch.bool, device=z.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = att @ self.v(z)
        return self.mlp(torch.cat([o, z], -1)).squeeze(-1)

    @torch.no_grad()
    def prob(self, trajectory: list[torch.Tensor]) -> float:
        """P(exit is right) at the last layer of a trajectory of (D,)-shaped (or (1,1,D)) states."""
        s = torch.stack([t.reshape(-1).float() for t in trajectory]).unsqueeze(0)
        return float(torch.sigmoid(self.forward(s)[0, -1]))

    # ---- files ----
    def save(self, path: str | os.PathLike) -> Path:
        return save_pair(path, "router", self.state_dict(), asdict(self.cfg))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ARLARouter":
        r = load_pair(path, "router", "ARLA router", lambda raw: cls(RouterConfig(**raw)))
        return r.eval().requires_grad_(False)
