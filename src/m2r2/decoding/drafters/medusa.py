"""Medusa heads (Cai et al. 2024): K extra heads on the model's final hidden state guess the tokens after
the next one, a drafter for the shared speculative loop.

Head k (k = 1..K) maps the final hidden state h_t of position t (the one whose LM-head read-out is the
model's own next token t+1) to a guess of token t+1+k: a residual block ``h + SiLU(W_k h + b_k)`` read out
by the model's frozen final norm and (tied) LM head, optionally over a reduced draft vocabulary. W_k starts
at zero, so an untrained head reads out the model's own next-token distribution (shifted by k).

Drafting needs h at the position that produced the pending token, which only the full model computes: the
drafter therefore runs the verification forward itself (``verify_forward``, the hook ``Speculative``
offers) and keeps the last layer's states; after verification the pending token came from row
``accepted`` of that forward. The first step after prefill has no such state and drafts nothing. Chain
drafting, top-1 (or sampled) per head, through the one verifier; tree attention over several candidates
per head is not done (the engine's mask is causal over positions, and on CPU every extra verification row
costs). Under sampling each head's distribution is the proposal of its draft token; it ignores the earlier
drafts, which keeps rejection sampling exact (a proposal may be any function of the context).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterError
from ...artifacts import find_shipped as find_artifact, load_artifact, save_artifact, shapes_of
from ..loop import DecodeState
from .base import Draft, Drafter, DraftHead
from ...engine.model import Transformer


WEIGHTS, CONFIG = "medusa.safetensors", "medusa.json"


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, heads: int = 3, base_identity: str | None = None):
        super().__init__()
        if heads < 1:
            raise ValueError(f"need at least one Medusa head, got {heads}")
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for b in self.blocks:
            nn.init.zeros_(b.weight)
            nn.init.zeros_(b.bias)
        self.base_identity = base_identity
        self.training_info: dict = {}

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def states(self, h: torch.Tensor) -> list[torch.Tensor]:
        """h (..., D) final hidden states -> K residual states (..., D), read out by the model's head."""
        return [h + F.silu(b(h.to(b.weight.dtype))).to(h.dtype) for b in self.blocks]

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        cfg = {"kind": "medusa", "format": 1, "heads": self.num_heads, "hidden_size": self.blocks[0].in_features,
               "base_identity": self.base_identity, "training": self.training_info}
        return save_artifact(path, "medusa", self.state_dict(), cfg, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, identity: str | None = None) -> "MedusaHeads":
        def parse(cfg: dict) -> dict:
            hidden, heads = cfg["hidden_size"], cfg["heads"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads)):
                raise AdapterError(f"{Path(path) / CONFIG}: hidden_size and heads must be positive integers, "
                                   f"got {hidden}, {heads}")
            return cfg

        cfg, sd = load_artifact(path, "medusa", "Medusa heads", parse=parse, identity=identity,
                                expected=lambda cfg: shapes_of(cls(cfg["hidden_size"], cfg["heads"])))
        m = cls(cfg["hidden_size"], cfg["heads"], cfg.get("base_identity"))
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        m.training_info = cfg.get("training", {})
        return m.eval().requires_grad_(False)


def medusa_loss(heads: MedusaHeads, model: Transformer, h: torch.Tensor, teacher_logp: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Self-distillation loss of the heads on one batch: ``h`` (B, T, D) the frozen model's final hidden
    states, ``teacher_logp`` (B, T, V) its log-probabilities, ``mask`` (B, T) the scored positions. Head k at
    position t is trained towards the model's own distribution at t+k, i.e. over token t+k+1 (KL, like the
    M2R2 adapters' objective); positions whose t+k falls past the scored span are skipped."""
    terms, agree = [], {}
    T = h.shape[1]
    for k, z in enumerate(heads.states(h), start=1):
        if T <= k:
            break
        valid = mask[:, :-k] & mask[:, k:]  # position t and its target t+k both scored
        sel = valid.nonzero(as_tuple=True)
        if sel[0].numel() == 0:
            continue
        tgt = teacher_logp[:, k:][sel]  # (N, V)
        logp = torch.log_softmax(model.head(z[:, :-k][sel]), -1)
        terms.append((tgt.exp() * (tgt - logp)).sum(-1).mean())
        agree[k] = float((logp.detach().argmax(-1) == tgt.argmax(-1)).float().mean())
    loss = torch.stack(terms).mean()
    return loss, {"loss": float(loss.detach()), "agree": agree}


class MedusaDrafter(Drafter):
    """Drafts up to K tokens per step from the Medusa heads on the last verified final hidden state."""

    name = "medusa"

    def __init__(self, heads: MedusaHeads, vocab: torch.Tensor | None = None):
        self.heads, self.vocab = heads, vocab
        self._head = None

    def setup(self, state: DecodeState) -> None:
        if self._head is None or self._head.model is not state.model:
            self._head = DraftHead(state.model, self.vocab)
        self.h = None  # (B, g+1, D) final states of the last verification forward
        self.n_before = None
        self.calls = 0

    def stats(self) -> dict:
        return {"draft_calls": self.calls, "draft_vocab": self._head.size, "medusa_heads": self.heads.num_heads}

    def verify_forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The verification forward, keeping the last layer's states for the next draft."""
        x = state.model.hidden(ids, state.cache, positions)
        self.h, self.n_before = x, state.cache.lengths.clone()
        return state.model.head(x)

    def draft_bytes(self, model: Transformer) -> float:
        """No layer runs to draft: one head's block per draft token, and the read-out rows."""
        return self.heads.param_bytes() // self.heads.num_heads + self._head.read_bytes()

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        B = state.batch
        if self.h is None:  # first step after prefill: no final state yet
            return Draft(torch.zeros(B, 0, dtype=torch.long))
        # the pending token came out of verification row (tokens committed by that step) - 1
        row = (state.cache.lengths - self.n_before - 1).clamp_min(0)
        h = self.h[torch.arange(B), row]  # (B, D)
        g = min(gamma, self.heads.num_heads)
        s, head = state.sampling, self._head
        drafts, qs = [], []
        for z in self.heads.states(h)[:g]:
            logits = head.logits(z)
            self.calls += 1
            tok, q = head.pick(logits, s, state.generator)
            if q is not None:
                qs.append(head.scatter_full(q))
            drafts.append(tok)
        return Draft(torch.stack(drafts, 1), torch.stack(qs, 1) if qs else None)


def find_shipped(identity: str, kind: str) -> Path | None:
    """A shipped peer artifact (``kind``: "medusa" or "draft-model") for this base model, if any."""
    return find_artifact(identity, kind)
