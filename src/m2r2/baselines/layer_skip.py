"""Post-hoc layer skipping on the unchanged model, the adaptive-depth baselines M2R2 is compared with:
SkipDecode's position-dependent depth and Mixture-of-Depths routing (routers: ``m2r2.baselines.mod``).
CALM, the third, is ``EarlyExit`` with a confidence rule on the slow stream (``m2r2.decoding.early_exit``)."""

from __future__ import annotations

from ..decoding.state import DecodeState, Strategy
from ..errors import StrategyError


class SkipDecode(Strategy):
    """SkipDecode (Del Corro et al., 2023), applied post hoc: a data-independent schedule gives the token at
    generated position t ``depth(t)`` layers, decaying linearly from ``max_layers`` to ``min_layers`` over
    ``span`` tokens; a token runs the *top* ``depth(t)`` layers (its embedding enters layer L - depth). The
    active layers of a token contain those of every later one, so no later token ever attends to a K/V
    that was skipped: nothing to propagate or recompute. The paper fine-tunes the model for the schedule;
    here it runs on the unchanged model (the point is the K/V-free mechanism and its cost)."""

    cache_slack = 0

    def __init__(self, min_layers: int, max_layers: int | None = None, span: int = 128, name: str = "skipdecode"):
        if min_layers < 1:
            raise StrategyError(f"min_layers must be >= 1, got {min_layers}")
        self.min_layers, self.max_layers, self.span, self.name = min_layers, max_layers, span, name

    def depth(self, t: int, L: int) -> int:
        hi = min(L, self.max_layers or L)
        lo = min(self.min_layers, hi)
        return round(hi - (hi - lo) * min(1.0, t / max(1, self.span)))

    def setup(self, state: DecodeState) -> None:
        if state.batch != 1:
            raise StrategyError("skipdecode here decodes one sequence at a time (batch 1)")
        self.t = 0
        self.layers_sum = 0

    def stats(self) -> dict:
        return {"tokens": self.t, "mean_slow_layers": self.layers_sum / max(1, self.t), "exited": self.t}

    def step(self, state: DecodeState) -> list[list[int]]:
        model, L = state.model, state.model.cfg.num_layers
        d = self.depth(self.t, L)
        n = state.cache.lengths.view(-1, 1)
        ctx = model.context(state.cache, n)
        h = model.embed(state.pending.view(1, 1))
        for i in range(L - d, L):
            h = model.layer(i, h, ctx)
        state.cache.advance(1)
        nxt = state.sampling.sample(model.head(h)[:, 0], state.generator)
        state.pending = nxt
        self.t += 1
        self.layers_sum += d
        return [[int(nxt[0])]]


class MoDSkip(Strategy):
    """Mixture-of-Depths routing applied post hoc (``m2r2.baselines.mod``): at every routed block a token whose
    router score is below the block's threshold (set by the capacity ``skip``, the fraction of tokens to
    skip each block) rides the residual connection past it. The skipped block still writes the token's
    K/V from the state entering it, which is what that block computes from the state, so no K/V is ever
    missing and nothing is recomputed; a token whose scores never fall below threshold runs every block
    (``skip=0`` is plain decoding).

    Only blocks from ``first`` on are routed (default: the last two thirds, first and last block
    excluded): on SmolLM2-135M skipping 10% of tokens at every block from block 1 derails the text (Rouge-L
    0.28 against the full model's output over 3 prompts x 48 tokens) while routing from block 10 keeps it
    coherent (0.39; from block 20: 0.40 at a quarter of the saving)."""

    cache_slack = 0

    def __init__(self, routers, skip: float, first: int | None = None, name: str = "mod"):
        self.routers, self.skip, self.name = routers, skip, name
        self.first = routers.cfg.num_layers // 3 if first is None else first
        self.threshold = {i: t for i, t in routers.thresholds(skip).items() if i >= self.first}

    def setup(self, state: DecodeState) -> None:
        if state.batch != 1:
            raise StrategyError("mod decodes one sequence at a time (batch 1): rows would skip different blocks")
        if self.routers.cfg.num_layers != state.model.cfg.num_layers:
            raise StrategyError("these MoD routers were fitted for a model with another number of layers")
        self.t = self.skipped = 0
        self.hist: dict[int, int] = {}

    def stats(self) -> dict:
        L = self.routers.cfg.num_layers
        t = max(1, self.t)
        return {"tokens": self.t, "mean_slow_layers": L - self.skipped / t, "skipped_blocks": self.skipped,
                "skip_by_layer": dict(sorted(self.hist.items()))}

    def step(self, state: DecodeState) -> list[list[int]]:
        model = state.model
        ctx = model.context(state.cache, state.cache.lengths.view(-1, 1))
        h = model.embed(state.pending.view(1, 1))
        for i in range(model.cfg.num_layers):
            thr = self.threshold.get(i)
            if thr is not None and float(self.routers.score(i, h.view(-1))) < thr:
                model.layers[i].write_kv(h, ctx)
                self.skipped += 1
                self.hist[i] = self.hist.get(i, 0) + 1
            else:
                h = model.layer(i, h, ctx)
        state.cache.advance(1)
        nxt = state.sampling.sample(model.head(h)[:, 0], state.generator)
        state.pending = nxt
        self.t += 1
        return [[int(nxt[0])]]
