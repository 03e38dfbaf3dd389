"""Early-exit decoding: a token leaves the model at the first allowed depth where an exit rule clears it.

One strategy, ``EarlyExit``, covers every method that decides per token how deep to go:

* the stream the token runs on: the model's own (``slow``: CALM-style confidence exit) or the M2R2 fast
  stream (``fast``: blocks plus accelerator adapters; depth d of the fast stream stands for R*d slow
  layers). A token that no rule lets out goes the full depth of the slow stream, so with a rule that
  never fires the output equals plain decoding;
* the exit rule (``ExitRule``): read-out confidence (CALM), a router over the stream's states (ARLA), or
  a fixed depth;
* what happens to the K/V that a token owes later tokens in the layers it skipped. ``kv="propagate"``
  (CALM): compute them from the exit state, once, at exit (the slow stream's K/V are approximated by
  the exit state's). ``kv="recompute"`` (DEED-style, exact): the token becomes *lazy*; its missing slow
  layers run later as extra rows batched with the next tokens' own rows, one layer at a time, exactly
  when a later token needs that layer (a lazy token from the slow stream resumes from its exit state; one
  from the fast stream restarts the slow stream from its embedding). Every K/V a later token attends to
  is then the slow stream's, bit for bit up to float summation order, and a token that goes full depth
  completes every lazy token in the same pass.

Batch 1 only: exits are per token, and rows of a batch would leave at different depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stream.accelerator import Accelerator
from ..stream.router import ARLARouter
from .loop import DecodeState, Strategy
from ..errors import StrategyError


class ExitRule:
    """Base class of exit rules: where they are consulted and whether the token leaves. ``needs_logits``:
    whether ``exit`` reads the read-out's logits (False: the LM head runs only once, at the exit)."""

    name: str = "rule"
    needs_logits: bool = True

    def depths(self, max_depth: int) -> tuple[int, ...]:
        """Depths (blocks run, 1-based) at which the rule is consulted."""
        raise NotImplementedError

    def exit(self, depth: int, trajectory: list[torch.Tensor], logits: torch.Tensor | None) -> bool:
        """``trajectory``: the token's states after 0..depth blocks; ``logits``: the read-out at ``depth``
        (None for rules with ``needs_logits = False``, which save the LM head at every check)."""
        raise NotImplementedError


@dataclass
class ConfidenceRule(ExitRule):
    """Exit when the read-out's top probability reaches ``threshold`` (CALM's softmax criterion); ``every``
    spaces the checks (each check costs an LM-head read), starting at ``first``."""

    threshold: float
    first: int = 4
    every: int = 2
    name: str = "confidence"
    needs_logits: bool = True
    last: bool = True  # also check at the deepest allowed depth

    def depths(self, max_depth: int) -> tuple[int, ...]:
        tail = (max_depth,) if self.last and (max_depth - self.first) % self.every else ()
        return tuple(range(self.first, max_depth + 1, self.every)) + tail

    def exit(self, depth: int, trajectory: list[torch.Tensor], logits: torch.Tensor | None) -> bool:
        return bool(torch.softmax(logits.float(), -1).max() >= self.threshold)


@dataclass
class FixedDepthRule(ExitRule):
    """Always exit at ``depth`` (a fixed-depth model; also the test rule for "every token exits")."""

    depth: int
    name: str = "fixed"
    needs_logits: bool = False

    def depths(self, max_depth: int) -> tuple[int, ...]:
        return (min(self.depth, max_depth),)

    def exit(self, depth: int, trajectory: list[torch.Tensor], logits: torch.Tensor | None) -> bool:
        return True


@dataclass
class ARLARule(ExitRule):
    """Exit at the first checked fast layer where ARLA's probability (``m2r2.stream.router.ARLARouter``, trained
    for the adapter) reaches ``threshold``."""

    router: ARLARouter
    threshold: float
    first: int = 2
    name: str = "arla"
    needs_logits: bool = False  # the decision reads the states only; the head runs once, at the exit

    def depths(self, max_depth: int) -> tuple[int, ...]:
        return tuple(range(min(self.first, max_depth), max_depth + 1))

    def exit(self, depth: int, trajectory: list[torch.Tensor], logits: torch.Tensor | None) -> bool:
        return self.router.prob(trajectory[1: depth + 1]) >= self.threshold


@dataclass
class _Lazy:
    pos: int
    next: int  # first slow layer whose K/V this token still owes
    h: torch.Tensor  # (D,) its slow state entering layer ``next``


class EarlyExit(Strategy):
    """Early-exit decoding over one exit rule, one stream and one K/V policy (see the module doc)."""

    cache_slack = 0

    def __init__(self, rule: ExitRule, stream: str = "slow", accelerator: Accelerator | None = None,
                 kv: str = "recompute", name: str | None = None, ride: bool = False,
                 exit_adapter: Accelerator | None = None):
        if stream not in ("slow", "fast"):
            raise StrategyError(f"stream must be 'slow' or 'fast', got {stream!r}")
        if stream == "fast" and accelerator is None:
            raise StrategyError("the fast stream needs an accelerator (M2R2 adapters)")
        if kv not in ("propagate", "recompute"):
            raise StrategyError(f"kv must be 'propagate' or 'recompute', got {kv!r}")
        if exit_adapter is not None and (stream != "slow" or not exit_adapter.is_exit):
            raise StrategyError("exit_adapter takes a kind='exit' adapter, on the slow stream")
        self.exit_adapter = exit_adapter  # CALM with one trained exit adapter: read-outs at its depth use it
        if ride and stream != "fast":
            raise StrategyError("ride (the slow row riding with the fast one) needs stream='fast'")
        self.rule, self.stream, self.acc, self.kv, self.ride = rule, stream, accelerator, kv, ride
        self.cache_slack = 1 if ride else 0  # the fast row's K/V go to a scratch slot past the token's
        self.name = name or f"exit-{stream}-{rule.name}-{kv}" + ("-ride" if ride else "")

    def setup(self, state: DecodeState) -> None:
        if state.batch != 1:
            raise StrategyError("early-exit strategies decode one sequence at a time (batch 1)")
        L = state.model.cfg.num_layers
        self.max_depth = self.acc.fast_layers if self.stream == "fast" else L - 1
        if self.stream == "fast" and self.acc.is_exit:
            raise StrategyError("early exit on the fast stream needs M2R2 adapters, not an exit adapter")
        self.check = set(self.rule.depths(self.max_depth))
        self.lazy: list[_Lazy] = []
        self.tokens = self.exited = 0
        self.depth_sum = 0  # blocks the current token ran (fast: fast blocks), summed
        self.slow_equiv_sum = 0.0  # the same in slow-layer equivalents (fast depth d = R*d)
        self.head_calls = self.extra_rows = self.full_passes = 0
        self.exit_hist: dict[int, int] = {}

    def stats(self) -> dict:
        t = max(1, self.tokens)
        return {"tokens": self.tokens, "exited": self.exited, "exit_rate": self.exited / t,
                "mean_depth": self.depth_sum / t, "mean_slow_layers": self.slow_equiv_sum / t,
                "head_calls": self.head_calls, "recomputed_rows": self.extra_rows, "full_passes": self.full_passes,
                "exit_depths": dict(sorted(self.exit_hist.items())), "lazy_pending": len(self.lazy)}

    # ---- one layer over [lazy rows due at this layer] + the current token ----
    def _layer(self, state: DecodeState, i: int, h: torch.Tensor | None, n: int, fast: bool) -> torch.Tensor | None:
        model = state.model
        due = [z for z in self.lazy if z.next == i] if self.kv == "recompute" else []
        rows = [z.h for z in due] + ([h.view(-1)] if h is not None else [])
        if not rows:
            return None
        if due:
            x = torch.stack(rows).unsqueeze(0)  # (1, T, D)
            ctx = model.context(state.cache, torch.tensor([[z.pos for z in due] + ([n] if h is not None else [])]))
        else:  # the current token alone: the step's one context (RoPE rows, write slot), built once
            x, ctx = h, self._ctx
        out = model.layer(i, x, ctx)
        if fast and h is not None:  # the adapter acts on the current token's row only
            out[:, -1] = out[:, -1] + self.acc.adapters[i](x[:, -1])
        self.extra_rows += len(due)
        for j, z in enumerate(due):
            z.h, z.next = out[0, j], i + 1
        return out[:, -1:] if h is not None else None

    def _dual_context(self, state: DecodeState, due: list[_Lazy], n: int):
        """One call's rows: lazy rows due at this layer, the token's slow row at slot n and its fast row.
        Both token rows are rotated for position n; the fast row's K/V go to the scratch slot n+1, and it
        attends to the slow stream's keys before n and to its own (the shared-cache rule), the slow row
        to keys up to n: so the fast row computes exactly what it computes alone."""
        model = state.model
        slots = torch.tensor([[z.pos for z in due] + [n, n + 1]])
        keys = torch.arange(n + 2)
        rows = [keys <= z.pos for z in due] + [keys <= n, (keys < n) | (keys == n + 1)]
        return model.context(state.cache, slots, rope_positions=torch.tensor([[z.pos for z in due] + [n, n]]),
                             mask=torch.stack(rows).view(1, 1, len(rows), n + 2))

    def _dual_layer(self, state: DecodeState, i: int, slow: torch.Tensor, fast: torch.Tensor, n: int):
        """Layer i over [lazy rows due at i] + the slow row + the fast row (+ its adapter), in one call: decode
        is memory-bound, so the extra rows ride on the same weight reads."""
        due = [z for z in self.lazy if z.next == i] if self.kv == "recompute" else []
        if due:
            ctx = self._dual_context(state, due, n)
        else:  # without lazy rows every layer of the step shares one context
            if self._dual_ctx is None:
                self._dual_ctx = self._dual_context(state, [], n)
            ctx = self._dual_ctx
        x = torch.cat([torch.stack([z.h for z in due]).unsqueeze(0), slow, fast], 1) if due else torch.cat([slow, fast], 1)
        out = state.model.layer(i, x, ctx)
        self.extra_rows += len(due) + 1
        for j, z in enumerate(due):
            z.h, z.next = out[0, j], i + 1
        return out[:, -2:-1], out[:, -1:] + self.acc.adapters[i](fast)

    def _finish_lazy(self, state: DecodeState, start: int) -> None:
        """Run every lazy token to full depth (layers from ``start``), e.g. to leave an exact cache."""
        for i in range(start, state.model.cfg.num_layers):
            self._layer(state, i, None, 0, False)
        self.lazy = [z for z in self.lazy if z.next < state.model.cfg.num_layers]

    def flush(self, state: DecodeState) -> None:
        """Complete every lazy token's slow layers now (the cache then holds the slow stream's K/V)."""
        if self.lazy:
            self._finish_lazy(state, min(z.next for z in self.lazy))

    def step(self, state: DecodeState) -> list[list[int]]:
        model, L = state.model, state.model.cfg.num_layers
        n = int(state.cache.lengths[0])
        tok = state.pending.view(1, 1)
        fast = self.stream == "fast"
        self._ctx = model.context(state.cache, torch.tensor([[n]]))
        h = model.embed(tok)
        slow = h if self.ride else None  # riding: the slow row advances with the fast one
        self._dual_ctx = None
        trajectory = [h]
        exit_depth, logits = None, None
        needs_logits = self.rule.needs_logits
        for i in range(self.max_depth):
            if self.ride:
                slow, h = self._dual_layer(state, i, slow, h, n)
            else:
                h = self._layer(state, i, h, n, fast)
            trajectory.append(h)
            d = i + 1
            if d in self.check:
                ex = self.exit_adapter
                hr = h + ex.adapters[0](h) if ex is not None and d == ex.fast_layers else h  # the read-out state
                logits = None
                if needs_logits:
                    logits = model.head(hr)[0, 0]
                    self.head_calls += 1
                if self.rule.exit(d, trajectory, logits):
                    exit_depth = d
                    if logits is None:
                        logits = model.head(hr)[0, 0]
                        self.head_calls += 1
                    break
        if exit_depth is None:  # no exit: the full slow stream (fast: restart it from the embedding,
            #                     or, riding, continue the slow row from where the fast stream stopped)
            start = 0 if fast and not self.ride else self.max_depth
            if self.ride:
                h = slow
            elif fast:
                h = model.embed(tok)
            for i in range(start, L):
                h = self._layer(state, i, h, n, False)
            logits = model.head(h)[0, 0]
            self.full_passes += 1
            self.depth_sum += L + (self.max_depth if fast and not self.ride else 0)
            self.slow_equiv_sum += L
        else:
            self.exited += 1
            self.exit_hist[exit_depth] = self.exit_hist.get(exit_depth, 0) + 1
            self.depth_sum += exit_depth
            self.slow_equiv_sum += min(L, exit_depth * (self.acc.cfg.rate if fast else 1))
            start = exit_depth if self.ride or not fast else 0  # first slow layer without the token's K/V
            if self.kv == "propagate":  # K/V of the skipped layers from the exit state
                for i in range(exit_depth, L):
                    model.layers[i].write_kv(hr, self._ctx)
            else:
                self.lazy.append(_Lazy(n, start, (slow if self.ride else model.embed(tok) if fast else h)[0, 0]))
        self.lazy = [z for z in self.lazy if z.next < L]
        self.tokens += 1
        state.cache.advance(1)
        nxt = state.sampling.sample(logits.view(1, -1), state.generator)
        state.pending = nxt
        return [[int(nxt[0])]]
