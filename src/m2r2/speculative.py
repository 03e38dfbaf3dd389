"""Lossless self-speculative decoding with M2R2 drafts: the ``m2r2`` strategy.

Each step drafts up to ``gamma`` tokens with the fast stream (``ceil(L/R)`` blocks plus accelerator
adapters, read out by the frozen final norm and LM head), then verifies the pending token and all drafts
with the full model in one forward pass over the shared cache:

* draft j runs at position n+j; its fast K/V go into the cache's slots n+j of the first F layers
  (temporary: the verification pass overwrites every slot it covers), so later drafts attend to the
  slow stream's K/V before n and to the drafts' own K/V after it, as in training;
* greedy: accept the longest prefix of drafts equal to the full model's argmax, plus the model's own
  next token; sampling: speculative rejection sampling (accept d with probability min(1, p(d)/q(d)),
  else sample the normalised residual max(0, p - q)), so the output distribution is the model's;
* commit what was accepted by advancing each row's cache length (rows accept different counts); slots
  past it are stale and masked.

Draft length adapts: drafting stops early when the fast stream's top probability falls below
``stop_below`` (for every row), and ``gamma`` grows by one after a fully accepted step and shrinks by one
otherwise, within [1, ``max_gamma``].
"""

from __future__ import annotations

import torch

from .accelerator import Accelerator
from .generate import DecodeState


class SelfSpeculative:
    name = "m2r2"

    def __init__(self, accelerator: Accelerator, gamma: int = 4, max_gamma: int = 8, stop_below: float = 0.0,
                 adaptive: bool = True):
        if not 1 <= gamma <= max_gamma:
            raise ValueError(f"need 1 <= gamma <= max_gamma, got gamma={gamma}, max_gamma={max_gamma}")
        self.acc = accelerator
        self.gamma0, self.max_gamma, self.stop_below, self.adaptive = gamma, max_gamma, stop_below, adaptive
        self.cache_slack = max_gamma + 1  # verification writes the pending token and max_gamma drafts

    def setup(self, state: DecodeState) -> None:
        self.gamma = self.gamma0
        self.steps = self.drafted = self.accepted = self.draft_calls = 0

    def stats(self) -> dict:
        return {"verify_steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_verify": (self.accepted + self.steps) / self.steps if self.steps else 0.0,
                "draft_calls": self.draft_calls}

    # ---- drafting ----
    def _draft(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts (B, g) and, when sampling, their draft distributions (B, g, V)."""
        model, acc, s = state.model, self.acc, state.sampling
        n = state.cache.lengths
        tok = state.pending
        drafts, qs = [], []
        for j in range(self.gamma):
            ctx = model.context(state.cache, (n + j).view(-1, 1))
            f = acc.fast_forward(model, tok.view(-1, 1), ctx)
            logits = model.head(f)[:, 0]  # (B, V)
            self.draft_calls += 1
            if s.greedy:
                tok = logits.argmax(-1)
                conf = torch.softmax(logits, -1).max(-1).values if self.stop_below > 0 else None
            else:
                q = s.probs(logits)
                tok = torch.multinomial(q, 1, generator=state.generator)[:, 0]
                qs.append(q)
                conf = q.max(-1).values
            drafts.append(tok)
            if self.stop_below > 0 and conf is not None and bool((conf < self.stop_below).all()):
                break
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)

    # ---- one step ----
    def step(self, state: DecodeState) -> list[list[int]]:
        model, s = state.model, state.sampling
        B = state.batch
        drafts, q = self._draft(state)  # (B, g)
        g = drafts.shape[1]
        n = state.cache.lengths
        ids = torch.cat([state.pending.view(-1, 1), drafts], 1)  # (B, g+1)
        positions = n.view(-1, 1) + torch.arange(g + 1)
        logits = model(ids, state.cache, positions)  # (B, g+1, V): slow K/V overwrite the drafts' slots
        new: list[list[int]] = []
        accepted = torch.zeros(B, dtype=torch.long)
        nxt = torch.zeros(B, dtype=torch.long)
        if s.greedy:
            target = logits.argmax(-1)  # (B, g+1)
            match = (drafts == target[:, :g]).long()
            accepted = match.cumprod(1).sum(1)  # length of the matching prefix
            nxt = target[torch.arange(B), accepted]
        else:
            p = s.probs(logits)  # (B, g+1, V)
            for b in range(B):
                a = 0
                while a < g:
                    d = int(drafts[b, a])
                    pa, qa = float(p[b, a, d]), float(q[b, a, d])
                    u = float(torch.rand((), generator=state.generator))
                    if qa > 0 and u < min(1.0, pa / qa):
                        a += 1
                        continue
                    resid = (p[b, a] - q[b, a]).clamp_min(0)
                    total = float(resid.sum())
                    dist = resid / total if total > 0 else p[b, a]
                    nxt[b] = torch.multinomial(dist, 1, generator=state.generator)[0]
                    break
                else:
                    nxt[b] = torch.multinomial(p[b, g], 1, generator=state.generator)[0]
                accepted[b] = a
        live = [b for b in range(B) if not state.done[b]]  # never empty: the loop stops when all rows are done
        for b in range(B):
            a = int(accepted[b])
            new.append(drafts[b, :a].tolist() + [int(nxt[b])])
        # commit the pending token and the accepted drafts; finished rows stand still (their cache must not
        # outgrow its slots while other rows go on)
        grow = torch.where(torch.tensor(state.done), 0, accepted + 1)
        state.cache.advance(grow)
        state.pending = torch.where(grow > 0, nxt, state.pending)
        self.steps += 1
        self.drafted += g * len(live)
        self.accepted += int(accepted[live].sum())
        if self.adaptive:
            all_in = bool((accepted[live] == g).all())
            self.gamma = min(self.max_gamma, self.gamma + 1) if all_in else max(1, self.gamma - 1)
        return new
