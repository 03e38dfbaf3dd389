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

Draft trees: a drafter may propose a tree instead of a chain (``Draft.parents``; EAGLE and the stream drafters with
``branch`` > 1: the main chain plus the drafter's next guesses at each depth as leaves). The tree's nodes occupy the
slots after the pending token, each at the RoPE position of its depth and attending to the committed cache and its
own ancestors (``m2r2.engine.cache.TreeMask``, which the native block kernel takes as per-row ancestor bits), so one
forward verifies every branch; ``verify_tree`` walks the longest path the model agrees with (greedy) or accepts by
multi-candidate rejection sampling (sampling), and ``_compact`` moves the accepted path's K/V (and whatever the
drafter keeps per slot) down to consecutive slots. ``gamma`` then counts the tree's depth.

Drafters (``m2r2.decoding.drafters``, one file each, all subclasses of ``drafters.base.Drafter``):

* ``StreamDrafter`` (``drafters/stream.py``): runs the first layers of the model itself for each draft token, either the M2R2 fast
  stream (blocks + accelerator adapters, ``m2r2``) or the plain slow stream cut at a layer (LayerSkip-style
  early-exit drafting, ``early-exit``), read out by the frozen final norm and LM head, optionally over a
  reduced draft vocabulary. Draft j runs at position n+j and writes its K/V into the cache slots n+j of
  the layers it runs (temporarily), so later drafts attend to the slow K/V before n and to the drafts' own
  K/V after it, exactly as in training.
* ``PromptLookupDrafter`` (``drafters/prompt_lookup.py``): copies the continuation of the latest earlier occurrence of the context's last
  n-gram (prompt-lookup decoding); free to draft, good on inputs that get quoted back.
"""

from __future__ import annotations

import time

import torch

from ..engine.sampling import SamplingConfig
from ..engine.cache import TreeMask
from ..stream.accelerator import Accelerator
from .drafters.base import Draft, Drafter, DraftHead  # noqa: F401  (DraftHead: re-exported)
from .drafters.prompt_lookup import PromptLookupDrafter  # noqa: F401  (re-exported)
from .drafters.stream import StreamDrafter
from .loop import DecodeState, Strategy


# ---------------------------------------------------------------------------------------------------
# the verifier


def verify(logits: torch.Tensor, draft: Draft, sampling: SamplingConfig,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts against the full model's ``logits`` (B, g+1, V) at the pending position and the g
    draft positions. Returns (accepted (B,) number of drafts kept, nxt (B,) the model's next token after
    them). Greedy: longest prefix equal to the argmax. Sampling: speculative rejection sampling; without
    proposal distributions the draft is a point mass (accept d with probability p(d), else sample p with d
    removed, renormalised). A tree (``draft.parents``): ``verify_tree``; accepted counts its path's drafts."""
    if draft.parents is None and sampling.greedy:  # a chain's matching prefix, for every row at once
        drafts = draft.tokens
        B, g = drafts.shape
        target = logits.argmax(-1)  # (B, g+1)
        accepted = (drafts == target[:, :g]).long().cumprod(1).sum(1)
        return accepted, target[torch.arange(B), accepted]
    accepted, nxt, _ = verify_tree(logits, draft, sampling, generator)  # (a chain when draft.parents is None)
    return accepted, nxt


def verify_tree(logits: torch.Tensor, draft: Draft, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Accept a path of a draft tree (``draft.parents``; a chain when None) against the full model's ``logits``
    (B, g+1, V) at the pending token (node 0) and each draft (node i + 1). From the pending token down: greedy,
    move to the first child whose token is the model's argmax at the current node; sampling, multi-candidate
    speculative rejection sampling (SpecInfer's, as EAGLE uses it): try the children in order, accepting child d with
    probability min(1, p(d) / q(d)) and otherwise replacing p by the normalised residual max(0, p - q) before the
    next (q: the children's shared proposal distribution; a point mass without one), and when none is accepted
    sample the model's next token from what is left of p. The output is distributed exactly as the model's.
    Returns (accepted (B,), nxt (B,), each row's accepted path as draft indices)."""
    drafts, q = draft.tokens, draft.q
    B, g = drafts.shape
    parents = draft.parents if draft.parents is not None else list(range(-1, g - 1))
    children: list[list[int]] = [[] for _ in range(g + 1)]  # by node: 0 the pending token, i + 1 draft i
    for i, p in enumerate(parents):
        children[p + 1].append(i + 1)
    greedy = sampling.greedy
    if greedy:
        target = logits.argmax(-1).tolist()  # (B, g+1)
    else:
        probs = sampling.probs(logits)  # (B, g+1, V)
    toks = drafts.tolist()
    accepted = torch.zeros(B, dtype=torch.long)
    nxt = torch.zeros(B, dtype=torch.long)
    paths: list[list[int]] = []
    for b in range(B):
        u, path = 0, []
        if greedy:
            while True:
                want = target[b][u]
                c = next((c for c in children[u] if toks[b][c - 1] == want), None)
                if c is None:
                    nxt[b] = want
                    break
                path.append(c - 1)
                u = c
        else:
            p = probs[b, 0]
            while True:
                moved = False
                for c in children[u]:
                    d = toks[b][c - 1]
                    qc = None if q is None else q[b, c - 1]
                    qd = 1.0 if qc is None else float(qc[d])
                    if qd > 0 and float(torch.rand((), generator=generator)) < min(1.0, float(p[d]) / qd):
                        path.append(c - 1)
                        u, p, moved = c, probs[b, c], True
                        break
                    if qc is None:
                        p = p.clone()
                        p[d] = 0
                    else:
                        p = (p - qc).clamp_min(0)
                    total = float(p.sum())
                    p = p / total if total > 0 else probs[b, u]
                if not moved:
                    nxt[b] = torch.multinomial(p, 1, generator=generator)[0]
                    break
        accepted[b] = len(path)
        paths.append(path)
    return accepted, nxt, paths


# ---------------------------------------------------------------------------------------------------
# the strategy


class Speculative(Strategy):
    """Draft, verify in one full forward, accept, commit: lossless with any drafter."""

    def __init__(self, drafter: Drafter, gamma: int = 4, max_gamma: int = 8, adaptive: bool = True):
        if not 1 <= gamma <= max_gamma:
            raise ValueError(f"need 1 <= gamma <= max_gamma, got gamma={gamma}, max_gamma={max_gamma}")
        self.drafter = drafter
        self.name = drafter.name
        self.gamma0, self.max_gamma, self.adaptive = gamma, max_gamma, adaptive
        # verification writes the pending token and up to max_gamma drafts (and any rows the drafter adds)
        self.cache_slack = max_gamma + 1 + drafter.extra_slots
        self.context_reserve = 0  # near the context end ``step`` shrinks the drafts to the room left

    def setup(self, state: DecodeState) -> None:
        self.gamma = self.gamma0
        self.steps = self.drafted = self.accepted = self.nodes = 0
        self.tree_steps = self.leaf_accepts = 0  # verifications of a tree; paths that ended in a leaf
        self.draft_seconds = self.verify_seconds = 0.0
        # per draft depth d: live rows whose draft d was checked (every draft before it accepted), and those that kept it
        self.depth_reached = [0] * self.max_gamma
        self.depth_kept = [0] * self.max_gamma
        self.verify_by_rows: dict[int, list] = {}  # rows per sequence in the verification -> [steps, seconds]
        self.drafter.setup(state)

    def stats(self) -> dict:
        s = {"verify_steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
             "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
             "tokens_per_verify": (self.accepted + self.steps) / self.steps if self.steps else 0.0,
             "draft_seconds": self.draft_seconds, "verify_seconds": self.verify_seconds,
             "depth_reached": list(self.depth_reached), "depth_kept": list(self.depth_kept),
             "acceptance_by_depth": [k / r if r else None for k, r in zip(self.depth_kept, self.depth_reached)],
             "verify_by_rows": {str(k): v for k, v in sorted(self.verify_by_rows.items())},
             "draft_nodes": self.nodes, "tree_steps": self.tree_steps, "leaf_accepts": self.leaf_accepts}
        s.update(self.drafter.stats())
        return s

    def step(self, state: DecodeState) -> list[list[int]]:
        t0 = time.perf_counter()
        # slots free after the pending token's in every row (the forward writes all rows), within the cache and
        # the model's positions: near the context end the drafts shrink to fit, so decoding ends exactly where
        # plain decoding would
        cap = min(state.cache.max_len, state.model.rope_cos.shape[0])
        room = cap - 1 - int(state.cache.lengths.max())
        extra = self.drafter.extra_slots  # rows the drafter adds to the verification forward
        gamma = min(self.gamma, room - extra)
        if gamma > 0:
            draft = self.drafter.draft(state, gamma)
            if draft.parents is not None and (draft.tokens.shape[1] > room - extra or draft.depth > gamma):
                draft = draft.chain(gamma)  # no room for the tree's leaves near the context end: its main chain
            if draft.tokens.shape[1] > gamma and draft.parents is None:
                # a drafter may propose more than asked (lookahead's n-grams)
                draft = Draft(draft.tokens[:, :gamma], None if draft.q is None else draft.q[:, :gamma])
        else:  # no room for a draft: verify the pending token alone (a plain step)
            draft = Draft(torch.zeros(state.batch, 0, dtype=torch.long))
        t1 = time.perf_counter()
        drafts = draft.tokens
        B, g = drafts.shape
        depth = draft.depth
        n = state.cache.lengths
        ids = torch.cat([state.pending.view(-1, 1), drafts], 1)  # (B, g+1)
        positions = n.view(-1, 1) + torch.arange(g + 1)
        # (B, g+1, V): slow K/V overwrite the drafts' slots. The drafter runs this forward (``verify_forward``:
        # the model alone by default; Medusa keeps the states it drafts from, Lookahead adds rows of its own)
        if draft.parents is not None:  # a tree: its nodes in slots n .. n+g, each seeing its ancestors
            tree = TreeMask(draft.parents, n)
            logits = self.drafter.verify_forward(state, ids, tree.slots, tree=tree)
        elif room < g + extra:  # no room for the drafter's own rows: the model alone
            logits = state.model(ids, state.cache, positions)
        else:
            logits = self.drafter.verify_forward(state, ids, positions)
        accepted, nxt, paths = verify_tree(logits, draft, state.sampling, state.generator) \
            if draft.parents is not None else (*verify(logits, draft, state.sampling, state.generator), None)
        if paths is not None:
            self._compact(state, paths, n, draft)
        t2 = time.perf_counter()
        self.draft_seconds += t1 - t0
        self.verify_seconds += t2 - t1
        by = self.verify_by_rows.setdefault(g + 1, [0, 0.0])
        by[0], by[1] = by[0] + 1, by[1] + (t2 - t1)
        live = [b for b in range(B) if not state.done[b]]  # never empty: the loop stops when all rows are done
        if paths is None:
            new = [drafts[b, : int(accepted[b])].tolist() + [int(nxt[b])] for b in range(B)]
        else:
            new = [drafts[b, paths[b]].tolist() + [int(nxt[b])] for b in range(B)]
            self.tree_steps += 1
            self.leaf_accepts += sum(1 for b in live if paths[b] and paths[b][-1] != len(paths[b]) - 1)
        # commit the pending token and the accepted drafts; finished rows stand still (their cache must not
        # outgrow its slots while other rows go on)
        grow = torch.where(torch.tensor(state.done), 0, accepted + 1)
        # a row that reaches the last slot has used its whole budget (it is done now): keep its pending slot free
        grow = torch.minimum(grow, cap - 1 - n)
        state.cache.advance(grow)
        state.pending = torch.where(grow > 0, nxt, state.pending)
        self.steps += 1
        self.drafted += depth * len(live)  # a tree counts its depth: the drafts one path could keep
        self.nodes += g * len(live)
        self.accepted += int(accepted[live].sum())
        for b in live:
            a = int(accepted[b])
            for d in range(min(a + 1, depth)):
                self.depth_reached[d] += 1
                self.depth_kept[d] += d < a
        if self.adaptive and depth > 0:
            all_in = bool((accepted[live] == depth).all())
            self.gamma = min(self.max_gamma, self.gamma + 1) if all_in else max(1, self.gamma - 1)
        return new


    def _compact(self, state: DecodeState, paths: list[list[int]], n: torch.Tensor, draft: Draft) -> None:
        """Bring each row's accepted tree path down to the slots after its pending token (slot n + 1 + k for the
        path's k-th draft), in the cache and in whatever the drafter keeps per slot; a path along the tree's first
        chain is already there."""
        rows, src, dst = [], [], []
        for b, path in enumerate(paths):
            for k, i in enumerate(path):
                if i != k:
                    rows.append(b)
                    src.append(int(n[b]) + 1 + i)
                    dst.append(int(n[b]) + 1 + k)
        if rows:
            r, s_, d = torch.tensor(rows), torch.tensor(src), torch.tensor(dst)
            state.cache.move(r, s_, d)
            self.drafter.moved(r, s_, d)


class SelfSpeculative(Speculative):
    """M2R2 self-speculative decoding: ``Speculative`` over the fast stream's drafts."""

    def __init__(self, accelerator: Accelerator, gamma: int = 4, max_gamma: int = 8, stop_below: float = 0.0,
                 adaptive: bool = True, vocab: torch.Tensor | None = None):
        super().__init__(StreamDrafter(accelerator, vocab=vocab, stop_below=stop_below), gamma, max_gamma,
                         adaptive)
