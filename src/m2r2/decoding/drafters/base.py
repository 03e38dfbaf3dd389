"""What every drafter is: the ``Drafter`` base class with a default for every optional hook, the ``Draft`` it
returns, and ``DraftHead``, the frozen read-out most model-based drafters share.

``Speculative`` (m2r2.decoding.speculative) calls only what is declared here: ``setup`` once per decode call,
``draft`` once per step, ``verify_forward`` for the verification pass (the default runs the full model;
Medusa keeps the states it drafts from, Lookahead adds its window rows, ``extra_slots`` of them), ``stats``
for the call's statistics, and ``draft_bytes`` for the benchmark's cost model: weight bytes one draft token
reads (0 for drafters that compute nothing to draft).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.model import Linear, Transformer
from ..loop import DecodeState


@dataclass
class Draft:
    """What a drafter proposes after each row's pending token: a chain of g tokens, or (``parents`` given) a tree of g
    nodes, draft i a child of draft ``parents[i]`` (-1: of the pending token), parents before children, the same
    shape for every row. Siblings' proposal distributions must be the same one (each sibling an independent sample
    from it: the verifier's multi-candidate rejection sampling is exact for that), or point masses."""

    tokens: torch.Tensor  # (B, g) proposed token ids (g may be 0)
    q: torch.Tensor | None = None  # (B, g, V) proposal distributions; None = deterministic (point masses)
    parents: list[int] | None = None  # a tree's shape; None: a chain (parents -1, 0, 1, ...)

    @property
    def depth(self) -> int:
        """The longest path's number of drafts."""
        if self.parents is None:
            return self.tokens.shape[1]
        depth = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return max(depth, default=0)

    def chain(self, g: int) -> "Draft":
        """The first ``g`` drafts of the main chain (a tree built by ``with_leaves`` keeps its chain first)."""
        tokens = self.tokens[:, :g]
        if self.parents is not None and self.parents[:g] != list(range(-1, g - 1)):
            raise ValueError("this tree does not start with its main chain")
        return Draft(tokens, None if self.q is None else self.q[:, :g])

    @staticmethod
    def with_leaves(chain: torch.Tensor, q: torch.Tensor | None, leaves: torch.Tensor | None,
                    keep: torch.Tensor | None = None) -> "Draft":
        """A chain (B, g) and, at each depth d, ``leaves[:, d]`` (B, g, k) other candidates for the same place (the
        drafter's next guesses there: children of chain draft d-1, leaves of the tree); ``keep`` (g, k) bool, if
        given, which of them to verify (the others are left out for every row). The chain comes first (so an
        accepted chain needs no cache compaction), then the leaves depth by depth; a leaf's proposal distribution is
        its chain sibling's."""
        if leaves is None or leaves.shape[-1] == 0:
            return Draft(chain, q)
        B, g, k = leaves.shape
        if keep is None:
            keep = torch.ones(g, k, dtype=torch.bool)
        depth, slot = keep.nonzero(as_tuple=True)  # depth by depth, in candidate order
        if depth.numel() == 0:
            return Draft(chain, q)
        parents = list(range(-1, g - 1)) + (depth - 1).tolist()
        tokens = torch.cat([chain, leaves[:, depth, slot]], 1)
        if q is not None:
            q = torch.cat([q, q[:, depth]], 1)
        return Draft(tokens, q, parents)

    @staticmethod
    def from_depths(drafts: list, qs: list, leaves: list, keeps: list) -> "Draft":
        """A drafter's per-depth results, depth by depth: draft tokens (B,), their proposal distributions (B, V) (empty
        under greedy), and with ``branch`` > 1 each depth's leaves (B, k) and keep flags (``Drafter.guesses``), as one
        ``Draft`` (a chain, or ``with_leaves``' tree)."""
        keep = None if all(k is None for k in keeps) else torch.stack(keeps)
        return Draft.with_leaves(torch.stack(drafts, 1), torch.stack(qs, 1) if qs else None,
                                 torch.stack(leaves, 1) if leaves else None, keep)


class Drafter:
    """Base class of every drafter. Subclasses set ``name`` and implement ``draft``; every other hook has a
    default here. A drafter instance serves one decode call at a time (``setup`` resets its counters)."""

    name: str = "drafter"
    extra_slots: int = 0  # cache slots its verification forward writes past the drafts (Lookahead's window)
    branch: int = 1  # candidates per depth a drafter that proposes trees offers (1: a chain; see ``alternatives``)
    # a greedy tree keeps a leaf only where some row's draft probability for it reaches this (0: every leaf), the
    # confidence-driven expansion of EAGLE-2; sampled trees keep every leaf (dropping samples by value would bias them)
    leaf_min_prob: float = 0.0
    trees: bool = False  # whether it does (``Draft.with_leaves``)

    def setup(self, state: DecodeState) -> None:
        """Called once per decode call, after prefill."""

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        """Up to ``gamma`` (more is cropped) proposed tokens per row after each row's pending token."""
        raise NotImplementedError

    def verify_forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, tree=None) -> torch.Tensor:
        """The verification pass: logits (B, g+1, V) of ids (B, g+1) at ``positions`` (the pending token and the
        drafts), writing their K/V into the shared cache; ``tree`` (an ``m2r2.engine.cache.TreeMask``, only for a
        drafter that proposes trees): the drafts are a tree's nodes. Default: the full model, nothing else."""
        return state.model(ids, state.cache, positions, tree=tree)

    def guesses(self, logits: torch.Tensor, q: torch.Tensor | None, vocab: torch.Tensor | None, generator
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tree-proposing drafter's ``branch`` - 1 leaves for the place it just drafted from ``logits``
        (``alternatives`` with this drafter's ``leaf_min_prob``): (candidates (B, k), keep flags (k,) or None)."""
        return alternatives(logits, q, self.branch - 1, vocab, generator, self.leaf_min_prob)

    def moved(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The verifier moved an accepted tree path's cache slots ``src`` to ``dst`` in batch rows ``rows``
        (``KVCache.move``): a drafter that keeps per-slot state moves it too. Default: nothing kept."""

    def stats(self) -> dict:
        """Drafter-specific counters for ``GenerationStats.extra``."""
        return {}

    def draft_bytes(self, model: Transformer) -> float:
        """Weight bytes one draft token reads (the benchmark's cost model). Default: nothing."""
        return 0.0


class FinalStates:
    """The model's final hidden states (before the final norm) by position, for drafters that draft from them
    (EAGLE, the fast stream that sees the slow one): filled from the prompt's prefill (``DecodeState.prefill_states``)
    and from every verification forward (``forward``, a drafter's ``verify_forward``). A slot holds the state of
    whatever was last verified there; the drafter reads only committed positions."""

    def __init__(self, state: DecodeState, hidden: int):
        self.x = torch.zeros(state.batch, state.cache.max_len, hidden)
        x, a = state.prefill_states, state.prefill_start
        if x is None:  # a caller that kept no prefill states: known from the first verification on
            a = int(state.cache.lengths.min())
        else:
            self.x[:, a:a + x.shape[1]] = x
        self.start = a  # states known from this position on

    def forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, tree=None) -> torch.Tensor:
        """The verification forward (``Drafter.verify_forward``), keeping the final states of its rows."""
        x = state.model.hidden(ids, state.cache, positions, tree=tree)
        slots = positions if tree is None else tree.slots
        self.x[torch.arange(state.batch).view(-1, 1), slots] = x
        return state.model.head(x)

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``Drafter.moved``: the states follow the accepted path's K/V."""
        self.x[rows, dst] = self.x[rows, src]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The states at ``positions`` (B, T) -> (B, T, D); zeros where none is known (before ``start``)."""
        pos = positions.clamp_min(0)
        out = self.x[torch.arange(self.x.shape[0]).view(-1, 1), pos]
        return torch.where((positions >= self.start).unsqueeze(-1), out, torch.zeros(()))


def layer_bytes(model: Transformer) -> int:
    """Float32 bytes of one decoder block's weights."""
    return sum(p.numel() for p in model.layers[0].parameters()) * 4


def forward_bytes(model: Transformer) -> int:
    """Float32 weight bytes one full forward reads: every block and the LM head."""
    c = model.cfg
    return layer_bytes(model) * c.num_layers + c.vocab_size * c.hidden_size * 4


def alternatives(logits: torch.Tensor, q: torch.Tensor | None, k: int, vocab: torch.Tensor | None,
                 generator, min_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``k`` more candidates per row (B, k) for the place ``pick_draft`` just drafted from ``logits`` (B, K): under
    greedy decoding the next ``k`` most likely tokens, else ``k`` more independent samples from q (what the
    verifier's multi-candidate rejection sampling needs to stay exact). And which to keep (k,) bool: under greedy
    decoding with ``min_prob`` > 0, those whose draft probability reaches it in some row; else None (all)."""
    keep = None
    if q is None:
        top = logits.topk(k + 1, -1)
        idx = top.indices[:, 1:]
        if min_prob > 0:
            p = torch.softmax(logits, -1).gather(1, idx)  # (B, k)
            keep = (p >= min_prob).any(0)
    else:
        idx = torch.multinomial(q, k, replacement=True, generator=generator)
    return (idx if vocab is None else vocab[idx]), keep


def pick_draft(logits: torch.Tensor, vocab: torch.Tensor | None, sampling, generator
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft token per row from logits (B, K) over a draft vocabulary (``vocab``: K token ids; None: the full
    one): the argmax under greedy decoding, else a sample from the sampling distribution q. Returns (token ids in
    the full vocabulary (B,), q (B, K), or None under greedy)."""
    if sampling.greedy:
        idx, q = logits.argmax(-1), None
    else:
        q = sampling.probs(logits)
        idx = torch.multinomial(q, 1, generator=generator)[:, 0]
    return (idx if vocab is None else vocab[idx]), q


def scatter_full(q: torch.Tensor, vocab: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """A distribution over a draft vocabulary (B, K) as one over the full vocabulary (B, ``vocab_size``)."""
    if vocab is None:
        return q
    out = q.new_zeros(q.shape[0], vocab_size)
    out[:, vocab] = q
    return out


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
        """``pick_draft`` over this head's vocabulary."""
        return pick_draft(logits, self.vocab, sampling, generator)

    def scatter_full(self, q: torch.Tensor) -> torch.Tensor:
        """``scatter_full`` of this head's vocabulary."""
        return scatter_full(q, self.vocab, self.model.cfg.vocab_size)

    def read_bytes(self) -> int:
        """Float32 bytes one read-out reads (its rows of the LM head)."""
        return self.size * self.model.cfg.hidden_size * 4
