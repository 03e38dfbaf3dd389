"""Sampling settings and the one function that turns logits into a next-token distribution.

Speculative strategies use ``SamplingConfig.probs`` for both the target and draft distributions, so the
rejection-sampling verifier and plain decoding sample from exactly the same warped distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SamplingError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not (isinstance(k, int) and k >= 0):
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise SamplingError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device="cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped next-token distribution (..., V) in float32. Greedy gives a one-hot at the argmax."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= (1 - self.top_p)
            remove[..., -1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
        return logits.softmax(-1)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token ids (...,) from logits (..., V)."""
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        flat = p.reshape(-1, p.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(p.shape[:-1])
