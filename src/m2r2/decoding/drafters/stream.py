"""Drafting with the model's own first layers: the M2R2 fast stream, or the slow stream cut at a layer."""

from __future__ import annotations

import torch

from ...engine import weights as _weights
from ...engine.model import Transformer
from ...stream.accelerator import Accelerator
from ..loop import DecodeState
from .base import Draft, Drafter, DraftHead, FinalStates, layer_bytes


class StreamDrafter(Drafter):
    """Drafts with the first layers of the model: the M2R2 fast stream (``accelerator`` given: its
    ``ceil(L/R)`` blocks with adapters) or the slow stream cut at ``depth`` (early-exit drafting without
    adapters; at the full depth with reduced-precision ``weights``, the quantized self-draft).
    ``stop_below``: stop drafting when every row's top draft probability is below it. ``weights``: run the
    model's linear layers from their "fp16" or "int8" copies while drafting (``Linear.build_lowp``): 1/2 or
    1/4 of the bytes per draft token. Drafts read and write the shared cache; the verification forward
    rewrites every drafted slot with the verifier's own K/V, so the cache stays exact. A fast stream that sees the
    slow one (``Accelerator.seer``) keeps the verification's final states: the first draft reads the state at the
    position before the pending token, each later one the fast stream's own final state of the draft before."""

    trees = True  # with ``branch`` > 1, each depth's next guesses become leaves of a draft tree

    def __init__(self, accelerator: Accelerator | None = None, depth: int | None = None,
                 vocab: torch.Tensor | None = None, stop_below: float = 0.0, name: str | None = None,
                 weights: str = "fp32"):
        self.acc = accelerator
        if self.acc is None and depth is None:
            raise ValueError("early-exit drafting needs a depth (the layer to read out)")
        self.depth = depth if depth is not None else self.acc.fast_layers
        if self.acc is not None and self.depth > self.acc.fast_layers:
            raise ValueError(f"depth {self.depth} exceeds the fast stream's {self.acc.fast_layers} layers")
        if weights not in _weights.FORMATS:
            raise ValueError(f"draft weights must be one of {list(_weights.FORMATS)}, got {weights!r}")
        self.vocab, self.stop_below, self.weights = vocab, stop_below, weights
        # bytes per weight relative to float32
        self.weight_scale = _weights.FORMATS[weights].bytes_per_weight / _weights.FP32.bytes_per_weight
        self.name = name or ("m2r2" if self.acc is not None else "early-exit")
        self._head: DraftHead | None = None

    def setup(self, state: DecodeState) -> None:
        if self._head is None or self._head.model is not state.model:
            self._head = DraftHead(state.model, self.vocab)
        state.model.build_weights(self.weights)  # if ``lm.strategy`` has not already
        self.calls = 0
        self.finals = FinalStates(state, state.model.cfg.hidden_size) if self._sees else None

    @property
    def _sees(self) -> bool:
        return self.acc is not None and self.acc.seer is not None

    def verify_forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, tree=None) -> torch.Tensor:
        if self.finals is None:
            return super().verify_forward(state, ids, positions, tree)
        return self.finals.forward(state, ids, positions, tree)

    def moved(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.finals is not None:
            self.finals.move(rows, src, dst)

    def stats(self) -> dict:
        return {"draft_calls": self.calls, "draft_depth": self.depth, "draft_vocab": self._head.size,
                "draft_weights": self.weights}

    def _hidden(self, model: Transformer, tok: torch.Tensor, ctx, prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.acc is not None:
            return self.acc.fast_forward(model, tok, ctx, depth=self.depth, prev=prev)
        x = model.embed(tok)
        for i in range(self.depth):
            x = model.layer(i, x, ctx)
        return x

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        if self.weights == "fp32":
            return self._draft(state, gamma)
        with _weights.using(self.weights):  # this thread's products only: the shared model is not touched
            return self._draft(state, gamma)

    def draft_bytes(self, model: Transformer) -> float:
        """The layers one draft token runs, the fast stream's adapters, the read-out rows, at the draft
        format's bytes per weight."""
        extra = self.acc.param_bytes() if self.acc is not None else 0
        return (layer_bytes(model) * self.depth + extra + self._head.read_bytes()) * self.weight_scale

    def _draft(self, state: DecodeState, gamma: int) -> Draft:
        model, s, head = state.model, state.sampling, self._head
        n = state.cache.lengths
        tok = state.pending
        drafts, qs, leaves, keeps = [], [], [], []
        prev = self.finals.at((n - 1).view(-1, 1)) if self.finals is not None else None  # (B, 1, D)
        for j in range(gamma):
            ctx = model.context(state.cache, (n + j).view(-1, 1))
            h = self._hidden(model, tok.view(-1, 1), ctx, prev)
            if prev is not None:
                prev = h
            logits = head.logits(h[:, 0])  # (B, K)
            self.calls += 1
            tok, q = head.pick(logits, s, state.generator)
            if self.branch > 1:
                alt, keep = self.guesses(logits, q, head.vocab, state.generator)
                leaves.append(alt)
                keeps.append(keep)
            if q is None:
                conf = torch.softmax(logits, -1).max(-1).values if self.stop_below > 0 else None
            else:
                qs.append(head.scatter_full(q))
                conf = q.max(-1).values
            drafts.append(tok)
            if self.stop_below > 0 and bool((conf < self.stop_below).all()):
                break
        return Draft.from_depths(drafts, qs, leaves, keeps)
