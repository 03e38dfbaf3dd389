"""Prompt-lookup decoding: drafts copied from an earlier occurrence of the context's last n-gram."""

from __future__ import annotations

import torch

from ..loop import DecodeState
from .base import Draft, Drafter


class PromptLookupDrafter(Drafter):
    """Prompt-lookup decoding: find the latest earlier occurrence of the last n tokens of a row's context
    (n from ``max_ngram`` down to ``min_ngram``) and propose the tokens that followed it. Deterministic
    (point-mass proposals); costs no model compute."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def setup(self, state: DecodeState) -> None:
        self.hits = self.lookups = 0

    def stats(self) -> dict:
        return {"lookup_hits": self.hits, "lookups": self.lookups}

    def lookup(self, ctx: list[int], gamma: int) -> list[int]:
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):  # latest earlier occurrence first
                if ctx[start: start + n] == tail:
                    return ctx[start + n: start + n + gamma]
        return []

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        rows = []
        for b in range(state.batch):
            if state.done[b]:
                rows.append([])
                continue
            ctx = state.prompts[b] + state.out[b]  # out[b] ends with the pending token
            self.lookups += 1
            found = self.lookup(ctx, gamma)
            self.hits += bool(found)
            rows.append(found)
        g = max(len(r) for r in rows)
        tokens = torch.zeros(state.batch, g, dtype=torch.long)
        for b, r in enumerate(rows):  # short rows are padded with a repeat of their last token: a cheap
            if r:  # proposal the verifier may still accept
                tokens[b, : len(r)] = torch.tensor(r)
                tokens[b, len(r):] = r[-1]
            else:
                tokens[b] = state.pending[b]
        return Draft(tokens)
