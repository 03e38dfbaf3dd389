"""Plain decoding: one full-depth forward per token (the reference every other strategy is measured against)."""

from __future__ import annotations

import torch

from .state import DecodeState, Strategy


class PlainStrategy(Strategy):
    """Ordinary autoregressive decoding: one full-depth forward per token."""

    name = "plain"
    cache_slack = 0

    def setup(self, state: DecodeState) -> None:
        pass

    def step(self, state: DecodeState) -> list[list[int]]:
        ids = state.pending.view(-1, 1)
        positions = state.cache.lengths.view(-1, 1)
        logits = state.model(ids, state.cache, positions)[:, 0]  # (B, V)
        # finished rows stand still: near the context end their cache must not outgrow its slots while others go on
        state.cache.advance(torch.tensor([0 if d else 1 for d in state.done]) if any(state.done) else 1)
        nxt = state.sampling.sample(logits, state.generator)
        state.pending = nxt
        return [[t] for t in nxt.tolist()]
