"""Lossless speculative decoding: one strategy, one verifier, pluggable drafters.

``Speculative(drafter)`` is the strategy every speculative method in m2r2 shares; only the drafter
differs between M2R2 and its peers. One step:

1. the drafter proposes up to ``gamma`` tokens per row (a ``Draft``: token ids and, for drafters that
   sample, their proposal distributions; a deterministic drafter gives none, i.e. a point mass);
2. the full model verifies the pending token and every draft in one forward pass over the shared cache
   (its K/V overwrite whatever the drafter wrote into those slots);
3. ``verify`` accepts, per row, the longest prefix the model agrees with: greedy, the drafts equal to its
   argmax; sampling, speculative rejection sampling (accept d with probability min(1, p(d)/q(d)), else
   sample the normalised residual max(0, p - q)), so the output distribution is exactly the model's;
4. the accepted tokens are committed by advancing each row's cache length (rows accept different
   counts; slots past a row's length are stale and masked), and the model's own next token becomes the
   pending one.

Draft length adapts: ``gamma`` grows by one after a step where every live row accepted all drafts and
shrinks by one otherwise, within [1, ``max_gamma``]; drafters may stop early (e.g. when unsure).

Drafters here:

* ``StreamDrafter``: runs the first layers of the model itself for each draft token, either the M2R2 fast
  stream (blocks + accelerator adapters, ``m2r2``) or the plain slow stream cut at a layer (LayerSkip-style
  early-exit drafting, ``early-exit``), read out by the frozen final norm and LM head, optionally over a
  reduced draft vocabulary. Draft j runs at position n+j and writes its K/V into the cache slots n+j of
  the layers it runs (temporarily), so later drafts attend to the slow K/V before n and to the drafts' own
  K/V after it, exactly as in training.
* ``PromptLookupDrafter``: copies the continuation of the latest earlier occurrence of the context's last
  n-gram (prompt-lookup decoding); free to draft, good on inputs that get quoted back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..stream.accelerator import Accelerator
from .loop import DecodeState
from ..engine.model import WEIGHT_BYTES, Linear, Transformer
from ..engine.sampling import SamplingConfig


@dataclass
class Draft:
    tokens: torch.Tensor  # (B, g) proposed token ids (g may be 0)
    q: torch.Tensor | None = None  # (B, g, V) proposal distributions; None = deterministic (point masses)


class Drafter(Protocol):
    name: str

    def setup(self, state: DecodeState) -> None: ...

    def draft(self, state: DecodeState, gamma: int) -> Draft: ...


# ---------------------------------------------------------------------------------------------------
# the verifier


def verify(logits: torch.Tensor, draft: Draft, sampling: SamplingConfig,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts against the full model's ``logits`` (B, g+1, V) at the pending position and the g
    draft positions. Returns (accepted (B,) number of drafts kept, nxt (B,) the model's next token after
    them). Greedy: longest prefix equal to the argmax. Sampling: speculative rejection sampling; without
    proposal distributions the draft is a point mass (accept d with probability p(d), else sample p with d
    removed, renormalised)."""
    drafts = draft.tokens
    B, g = drafts.shape
    if sampling.greedy:
        target = logits.argmax(-1)  # (B, g+1)
        accepted = (drafts == target[:, :g]).long().cumprod(1).sum(1)
        return accepted, target[torch.arange(B), accepted]
    p = sampling.probs(logits)  # (B, g+1, V)
    q = draft.q
    accepted = torch.zeros(B, dtype=torch.long)
    nxt = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        a = 0
        while a < g:
            d = int(drafts[b, a])
            pa = float(p[b, a, d])
            qa = 1.0 if q is None else float(q[b, a, d])
            u = float(torch.rand((), generator=generator))
            if qa > 0 and u < min(1.0, pa / qa):
                a += 1
                continue
            if q is None:
                resid = p[b, a].clone()
                resid[d] = 0
            else:
                resid = (p[b, a] - q[b, a]).clamp_min(0)
            total = float(resid.sum())
            dist = resid / total if total > 0 else p[b, a]
            nxt[b] = torch.multinomial(dist, 1, generator=generator)[0]
            break
        else:
            nxt[b] = torch.multinomial(p[b, g], 1, generator=generator)[0]
        accepted[b] = a
    return accepted, nxt


# ---------------------------------------------------------------------------------------------------
# the strategy


class Speculative:
    """Draft, verify in one full forward, accept, commit: lossless with any drafter."""

    def __init__(self, drafter: Drafter, gamma: int = 4, max_gamma: int = 8, adaptive: bool = True):
        if not 1 <= gamma <= max_gamma:
            raise ValueError(f"need 1 <= gamma <= max_gamma, got gamma={gamma}, max_gamma={max_gamma}")
        self.drafter = drafter
        self.name = drafter.name
        self.gamma0, self.max_gamma, self.adaptive = gamma, max_gamma, adaptive
        # verification writes the pending token and up to max_gamma drafts (and any rows the drafter adds)
        self.cache_slack = max_gamma + 1 + getattr(drafter, "extra_slots", 0)
        self.context_reserve = 0  # near the context end ``step`` shrinks the drafts to the room left

    def setup(self, state: DecodeState) -> None:
        self.gamma = self.gamma0
        self.steps = self.drafted = self.accepted = 0
        self.draft_seconds = self.verify_seconds = 0.0
        self.drafter.setup(state)

    def stats(self) -> dict:
        s = {"verify_steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
             "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
             "tokens_per_verify": (self.accepted + self.steps) / self.steps if self.steps else 0.0,
             "draft_seconds": self.draft_seconds, "verify_seconds": self.verify_seconds}
        extra = getattr(self.drafter, "stats", None)
        if callable(extra):
            s.update(extra())
        return s

    def step(self, state: DecodeState) -> list[list[int]]:
        t0 = time.perf_counter()
        # slots free after the pending token's in every row (the forward writes all rows), within the cache and
        # the model's positions: near the context end the drafts shrink to fit, so decoding ends exactly where
        # plain decoding would
        cap = min(state.cache.max_len, state.model.rope_cos.shape[0])
        room = cap - 1 - int(state.cache.lengths.max())
        extra = getattr(self.drafter, "extra_slots", 0)  # rows the drafter adds to the verification forward
        gamma = min(self.gamma, room - extra)
        if gamma > 0:
            draft = self.drafter.draft(state, gamma)
            if draft.tokens.shape[1] > gamma:  # a drafter may propose more than asked (lookahead's n-grams)
                draft = Draft(draft.tokens[:, :gamma], None if draft.q is None else draft.q[:, :gamma])
        else:  # no room for a draft: verify the pending token alone (a plain step)
            draft = Draft(torch.zeros(state.batch, 0, dtype=torch.long))
        t1 = time.perf_counter()
        drafts = draft.tokens
        B, g = drafts.shape
        n = state.cache.lengths
        ids = torch.cat([state.pending.view(-1, 1), drafts], 1)  # (B, g+1)
        positions = n.view(-1, 1) + torch.arange(g + 1)
        # (B, g+1, V): slow K/V overwrite the drafts' slots. A drafter may run this forward itself
        # (``verify_forward``) to keep states it drafts from (Medusa) or to add rows of its own (Lookahead)
        fwd = getattr(self.drafter, "verify_forward", None)
        if fwd is None or room < g + extra:  # no room for the drafter's own rows either: the model alone
            logits = state.model(ids, state.cache, positions)
        else:
            logits = fwd(state, ids, positions)
        accepted, nxt = verify(logits, draft, state.sampling, state.generator)
        self.draft_seconds += t1 - t0
        self.verify_seconds += time.perf_counter() - t1
        live = [b for b in range(B) if not state.done[b]]  # never empty: the loop stops when all rows are done
        new = [drafts[b, : int(accepted[b])].tolist() + [int(nxt[b])] for b in range(B)]
        # commit the pending token and the accepted drafts; finished rows stand still (their cache must not
        # outgrow its slots while other rows go on)
        grow = torch.where(torch.tensor(state.done), 0, accepted + 1)
        # a row that reaches the last slot has used its whole budget (it is done now): keep its pending slot free
        grow = torch.minimum(grow, cap - 1 - n)
        state.cache.advance(grow)
        state.pending = torch.where(grow > 0, nxt, state.pending)
        self.steps += 1
        self.drafted += g * len(live)
        self.accepted += int(accepted[live].sum())
        if self.adaptive and g > 0:
            all_in = bool((accepted[live] == g).all())
            self.gamma = min(self.max_gamma, self.gamma + 1) if all_in else max(1, self.gamma - 1)
        return new


# ---------------------------------------------------------------------------------------------------
# drafters


class DraftHead(torch.nn.Module):
    """The frozen final norm and LM head, optionally restricted to a draft vocabulary (a subset of token
    ids). On CPU the 49,152-row head of the embedded model is a fifth of its weights; a frequent-token
    subset cuts what every draft reads. Drafts outside the subset are impossible, never wrong: the
    verifier still decides."""

    def __init__(self, model: Transformer, vocab: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
        if self.vocab is not None:
            full = model.lm_head
            dense = full.dense()[self.vocab]  # (K, D)
            self.sub = Linear(full.in_features, len(self.vocab), False, full.parts).to(dense.dtype)
            with torch.no_grad():
                self.sub.weight.copy_(Linear.pack(dense, full.parts))
            self.sub.build_row_layout()
            self.sub.requires_grad_(False)

    @property
    def size(self) -> int:
        return self.model.cfg.vocab_size if self.vocab is None else len(self.vocab)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K) logits over the draft vocabulary (float32)."""
        if self.vocab is None:
            return self.model.head(h)
        return self.sub(self.model.norm(h)).float()

    def to_full(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab is None else self.vocab[idx]

    def pick(self, logits: torch.Tensor, sampling, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft token per row from logits (B, K) over this head's vocabulary: the argmax under greedy
        decoding, else a sample from the sampling distribution q. Returns (token ids in the full
        vocabulary (B,), q (B, K), or None under greedy)."""
        if sampling.greedy:
            return self.to_full(logits.argmax(-1)), None
        q = sampling.probs(logits)
        return self.to_full(torch.multinomial(q, 1, generator=generator)[:, 0]), q

    def scatter_full(self, q: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft vocabulary (B, K) as one over the full vocabulary (B, V)."""
        if self.vocab is None:
            return q
        out = q.new_zeros(q.shape[0], self.model.cfg.vocab_size)
        out[:, self.vocab] = q
        return out


class StreamDrafter:
    """Drafts with the first layers of the model: the M2R2 fast stream (``accelerator`` given: its
    ``ceil(L/R)`` blocks with adapters) or the slow stream cut at ``depth`` (early-exit drafting without
    adapters; at the full depth with reduced-precision ``weights``, the quantized self-draft).
    ``stop_below``: stop drafting when every row's top draft probability is below it. ``weights``: run the
    model's linear layers from their "fp16" or "int8" copies while drafting (``Linear.build_lowp``): 1/2 or
    1/4 of the bytes per draft token. Drafts read and write the shared cache; the verification forward
    rewrites every drafted slot with the verifier's own K/V, so the cache stays exact."""

    def __init__(self, accelerator: Accelerator | None = None, depth: int | None = None,
                 vocab: torch.Tensor | None = None, stop_below: float = 0.0, name: str | None = None,
                 weights: str = "fp32"):
        self.acc = accelerator
        if self.acc is None and depth is None:
            raise ValueError("early-exit drafting needs a depth (the layer to read out)")
        self.depth = depth if depth is not None else self.acc.fast_layers
        if self.acc is not None and self.depth > self.acc.fast_layers:
            raise ValueError(f"depth {self.depth} exceeds the fast stream's {self.acc.fast_layers} layers")
        if weights not in WEIGHT_BYTES:
            raise ValueError(f"draft weights must be one of {list(WEIGHT_BYTES)}, got {weights!r}")
        self.vocab, self.stop_below, self.weights = vocab, stop_below, weights
        self.weight_scale = WEIGHT_BYTES[weights] / WEIGHT_BYTES["fp32"]  # bytes per weight relative to float32
        self.name = name or ("m2r2" if self.acc is not None else "early-exit")
        self._head: DraftHead | None = None

    def setup(self, state: DecodeState) -> None:
        if self._head is None or self._head.model is not state.model:
            self._head = DraftHead(state.model, self.vocab)
        state.model.build_weights(self.weights)  # if ``lm.strategy`` has not already
        self.calls = 0

    def stats(self) -> dict:
        return {"draft_calls": self.calls, "draft_depth": self.depth, "draft_vocab": self._head.size,
                "draft_weights": self.weights}

    def _hidden(self, model: Transformer, tok: torch.Tensor, ctx) -> torch.Tensor:
        if self.acc is not None:
            return self.acc.fast_forward(model, tok, ctx, depth=self.depth)
        x = model.embed(tok)
        for i in range(self.depth):
            x = model.layer(i, x, ctx)
        return x

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        if self.weights == "fp32":
            return self._draft(state, gamma)
        with state.model.use_weights(self.weights):
            return self._draft(state, gamma)

    def _draft(self, state: DecodeState, gamma: int) -> Draft:
        model, s, head = state.model, state.sampling, self._head
        n = state.cache.lengths
        tok = state.pending
        drafts, qs = [], []
        for j in range(gamma):
            ctx = model.context(state.cache, (n + j).view(-1, 1))
            logits = head.logits(self._hidden(model, tok.view(-1, 1), ctx)[:, 0])  # (B, K)
            self.calls += 1
            tok, q = head.pick(logits, s, state.generator)
            if q is None:
                conf = torch.softmax(logits, -1).max(-1).values if self.stop_below > 0 else None
            else:
                qs.append(head.scatter_full(q))
                conf = q.max(-1).values
            drafts.append(tok)
            if self.stop_below > 0 and bool((conf < self.stop_below).all()):
                break
        return Draft(torch.stack(drafts, 1), torch.stack(qs, 1) if qs else None)


class PromptLookupDrafter:
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


class SelfSpeculative(Speculative):
    """M2R2 self-speculative decoding: ``Speculative`` over the fast stream's drafts."""

    def __init__(self, accelerator: Accelerator, gamma: int = 4, max_gamma: int = 8, stop_below: float = 0.0,
                 adaptive: bool = True, vocab: torch.Tensor | None = None):
        super().__init__(StreamDrafter(accelerator, vocab=vocab, stop_below=stop_below), gamma, max_gamma,
                         adaptive)
