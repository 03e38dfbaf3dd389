"""Lookahead decoding (Fu et al. 2024) as a drafter of the shared speculative loop.

A 2-D window of guesses, N-1 levels of W tokens, is refined by Jacobi iterations: level l, column i stands
at position n+1+l+i (n: the pending token's position) and attends to the committed context, the pending
token, level-0 columns 0..i and the column-i tokens of levels 1..l (a contiguous run of positions ending at
itself). The last level's read-outs become a new level; each column's trajectory (level 0, ..., level N-2,
new) is an N-gram added to a pool keyed by its first token; the window then drops level 0. Drafting
proposes the most recent pool N-gram whose first token is the pending token: its N-1 remaining tokens.

The window rows ride in the verification forward (``verify_forward``), as the method requires to be worth
anything: verification rows at cache slots n..n+g, window rows at slots n+g+1.. (past everything committed
or verified: stale after the step, masked and overwritten later), with their own RoPE positions and a mask
that keeps the two branches apart (verification rows see only slots <= their own; window rows see the
context through the pending token and their own trajectory). The engine's ``StepContext`` takes such a
mask as is, so nothing in the engine changes. Cost: (N-1)*W extra rows in every verification forward; with
the defaults (W=4, N=4) 12 rows, so a forward has at most 16 rows and stays in the engine's few-rows layout
(one read of each weight). Only one candidate is verified (G=1: the one verifier takes a chain), and the
window is refined greedily whatever the sampling: drafts are deterministic, verified as point masses.
"""

from __future__ import annotations

import torch

from ..loop import DecodeState
from .base import Draft, Drafter


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, window: int = 4, ngram: int = 4, pool_per_key: int = 4, seed: int = 0):
        if window < 1 or ngram < 2 or pool_per_key < 1:
            raise ValueError(f"lookahead needs window >= 1, ngram >= 2, pool_per_key >= 1; got "
                             f"{window}, {ngram}, {pool_per_key}")
        self.W, self.N, self.G, self.seed = window, ngram, pool_per_key, seed
        self.M = (ngram - 1) * window
        self.extra_slots = self.M  # window rows written past the verification rows
        # which window rows each window row sees (row r = level * W + column)
        L, W = ngram - 1, window
        vis = torch.zeros(self.M, self.M, dtype=torch.bool)
        for l in range(L):
            for i in range(W):
                r = l * W + i
                vis[r, :i + 1] = True  # level 0, columns 0..i
                for l2 in range(1, l + 1):  # levels 1..l of column i (itself included)
                    vis[r, l2 * W + i] = True
        self.visible = vis
        self.level_of = torch.arange(self.M) // W
        self.col_of = torch.arange(self.M) % W

    def setup(self, state: DecodeState) -> None:
        g = torch.Generator().manual_seed(self.seed)  # never the sampling generator: drafts stay independent
        B = state.batch
        self.window = torch.empty(B, self.N - 1, self.W, dtype=torch.long)
        for b, p in enumerate(state.prompts):  # initial guesses: random tokens of the row's prompt
            pt = torch.tensor(p, dtype=torch.long)
            self.window[b] = pt[torch.randint(len(p), (self.N - 1, self.W), generator=g)]
        self.pool: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in range(B)]
        self.hits = self.lookups = 0

    def stats(self) -> dict:
        return {"pool_ngrams": sum(sum(len(v) for v in p.values()) for p in self.pool), "pool_hits": self.hits,
                "lookups": self.lookups, "window": self.W, "ngram": self.N}

    def draft(self, state: DecodeState, gamma: int):
        rows = []
        for b in range(state.batch):
            cands = self.pool[b].get(int(state.pending[b]), []) if not state.done[b] else []
            self.lookups += not state.done[b]
            self.hits += bool(cands)
            rows.append(list(cands[-1]) if cands else [])
        g = max(len(r) for r in rows)
        tokens = torch.zeros(state.batch, g, dtype=torch.long)
        for b, r in enumerate(rows):  # short rows padded with the pending token: the verifier decides
            tokens[b] = state.pending[b]
            if r:
                tokens[b, : len(r)] = torch.tensor(r)
        return Draft(tokens)

    def verify_forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        m, cache = state.model, state.cache
        B, V1 = ids.shape  # V1 = g + 1 verification rows
        n = cache.lengths.view(-1, 1)
        M = self.M
        win = self.window.view(B, M)
        all_ids = torch.cat([ids, win], 1)  # (B, T)
        T = V1 + M
        slots = n + torch.arange(T)  # contiguous per row
        rope_pos = torch.cat([positions, n + 1 + self.level_of + self.col_of], 1)
        span = int(slots.max()) + 1
        keys = torch.arange(span).view(1, 1, -1)
        mask = keys <= (n + torch.arange(V1)).unsqueeze(-1)  # verification rows: causal  (B, V1, S)
        rel = keys - (n + V1).unsqueeze(-1)  # (B, 1, S): index into the window rows
        inwin = (rel >= 0) & (rel < M)
        wmask = self.visible[:, rel.clamp(0, M - 1)[:, 0]].transpose(0, 1) & inwin  # (B, M, S)
        wmask = wmask | (keys <= n.unsqueeze(-1))  # the context and the pending token
        ctx = m.context(cache, slots, rope_positions=rope_pos, mask=torch.cat([mask, wmask], 1).unsqueeze(1))
        x = m.embed(all_ids)
        for i in range(m.cfg.num_layers):
            x = m.layer(i, x, ctx)
        cache.counters.forward_passes += 1
        logits = m.head(x)
        self._update(logits[:, V1:].argmax(-1))
        return logits[:, :V1]

    def _update(self, guess: torch.Tensor) -> None:
        """Collect each column's N-gram (levels 0..N-2, then the last level's read-out) into the pool and
        slide the window by one level."""
        B = guess.shape[0]
        new = guess.view(B, self.N - 1, self.W)[:, -1]  # (B, W)
        grams = torch.cat([self.window, new.unsqueeze(1)], 1)  # (B, N, W)
        for b in range(B):
            pool = self.pool[b]
            for col in grams[b].t().tolist():
                key, rest = col[0], tuple(col[1:])
                lst = pool.setdefault(key, [])
                if rest in lst:
                    lst.remove(rest)
                lst.append(rest)  # most recent last
                if len(lst) > self.G:
                    del lst[0]
        self.window = torch.cat([self.window[:, 1:], new.unsqueeze(1)], 1)
