"""Expert-loading strategies on one engine: the decode strategy and the prefetch policies.

``MoEDecode`` is a decode-loop strategy (``m2r2.decoding.loop``) for an ``MoEModel``: one token per step through
the model's own layers, exactly like plain decoding, so every policy computes the same thing (the
provider only decides *when* an expert's weights arrive). With an M2R2 accelerator it also runs the fast
stream in lockstep, one fast layer after each of the first F slow layers:

* the fast row attends to the slow stream's K/V before its position and to its own K/V, without
  writing the shared cache (the slow token owns that slot);
* it rides through the slow row's experts of that layer (already in fast memory: no extra loads);
* its state after fast layer i approximates the slow state at layer R*(i+1), so the routers of slow
  layers R*i+1 .. R*(i+1) applied to it predict their experts while the slow stream is still at layer i:
  the look-ahead grows with depth, and once the fast stream is done every later layer has a prediction.

Policies (``policy.on_fetch`` runs inside each layer's fetch, after that layer's demand loads are queued):

* ``OnDemand``: nothing ahead of time; the cache's LRU or LFU eviction is the whole strategy;
* ``SlowPrefetch``: Pre-gated-MoE/AdapMoE-style: the current slow state through the *next* layer's norm and
  router predicts its top-k' experts, prefetched while this layer computes;
* ``M2R2Prefetch``: the fast stream's predictions (made by ``MoEDecode``); top-k' >= k for recall;
* ``Oracle``: the true expert trace of the sequence (recorded from the all-resident run, which every
  policy reproduces token for token): prefetch in order of need and evict by true next use (Belady).
"""

from __future__ import annotations

import torch

from ..decoding.loop import Strategy
from ..errors import StrategyError
from .layers import MoEModel, Resident


def predict_and_prefetch(cache, moe: MoEModel, j: int, x: torch.Tensor, top_k: int, lookahead: int,
                         merge: bool = False) -> None:
    """Layer j's norm and router on a residual state x (1, D): its top-k experts are the prediction for layer j
    of the current token (made ``lookahead`` layers ahead of the slow stream), prefetched with that step as
    their need. ``merge``: add to an earlier prediction of the same step instead of replacing it."""
    blk = moe.model.layers[j]
    ids = blk.ffn.route(blk.post_norm(x), top_k)[0][0].tolist()
    step = cache.step_of(j)
    cache.predict(step, set(ids) | (cache.predictions.get(step, (set(), 0))[0] if merge else set()), lookahead)
    for e in ids:
        cache.prefetch((j, e), step)
    cache.kick()


class OnDemand:
    name = "on-demand"

    def on_fetch(self, cache, layer, experts, state) -> None:
        pass


class Pinned(OnDemand):
    """On-demand loading around a static core: the experts used most often (``counts``, from routing traces of
    *other* prompts: a calibration, never the prompt being decoded) fill half the budget before decoding and are
    never evicted; the other half is LRU. The fairer baseline for skewed expert use, which LRU alone serves
    badly when a token's working set is the size of the budget."""

    name = "pinned-lfu"

    def __init__(self, counts: dict[tuple[int, int], int], fraction: float = 0.5):
        self.counts, self.fraction = counts, fraction

    def prepare(self, cache) -> None:
        n = int(cache.budget * self.fraction)
        ranked = sorted(self.counts, key=lambda k: (-self.counts[k], k))
        cache.hold(ranked[:n])


def usage_counts(traces: list[list[list[list[int]]]]) -> dict[tuple[int, int], int]:
    """How often each (layer, expert) was used in routing traces (token -> layer -> experts)."""
    counts: dict[tuple[int, int], int] = {}
    for trace in traces:
        for token in trace:
            for layer, experts in enumerate(token):
                for e in experts:
                    counts[(layer, e)] = counts.get((layer, e), 0) + 1
    return counts


class SlowPrefetch:
    """Predict layer i+1's experts from the slow state at layer i (through layer i+1's norm and router)."""

    name = "slow-prefetch"

    def __init__(self, moe: MoEModel, top_k: int):
        self.moe, self.top_k = moe, top_k

    def on_fetch(self, cache, layer, experts, state) -> None:
        j = layer + 1
        if not cache.recording or state is None or j >= self.moe.num_layers:
            return
        predict_and_prefetch(cache, self.moe, j, state, self.top_k, 1)


class M2R2Prefetch:
    """Prefetch from the fast stream's predictions; the predictions themselves come from ``MoEDecode``."""

    name = "m2r2-prefetch"

    def __init__(self, moe: MoEModel, top_k: int, refine: bool = False, horizon: int | None = None,
                 routers=None):
        """``horizon``: issue a predicted layer's loads only once the slow stream is within this many layers of it
        (None: as soon as it is predicted). On a FIFO link, loads for layers far ahead issued early queue in front
        of the nearer layers' loads (and a miss's demand load) and can be evicted before they are used.
        ``routers``: read the fast state with routers calibrated for it (``fast_routers.FastRouters``) instead of the
        target layers' own norms and routers."""
        self.moe, self.top_k, self.refine, self.horizon, self.routers = moe, top_k, refine, horizon, routers
        self.held: dict[int, tuple[int, list[int]]] = {}  # layer -> (step, experts) predicted, not yet issued
        if refine:
            self.name = "m2r2-hybrid"

    def on_fetch(self, cache, layer, experts, state) -> None:
        """``refine`` (m2r2-hybrid): the slow state also predicts the next layer, added to the fast stream's
        earlier prediction (more recall for the nearest layer, at the price of extra loads). Held predictions
        (``horizon``) that are now near enough are issued."""
        j = layer + 1
        if self.refine and cache.recording and state is not None and j < self.moe.num_layers:
            predict_and_prefetch(cache, self.moe, j, state, self.top_k, 1, merge=True)
        if self.held and cache.recording:
            now = cache.step_of(layer)
            due = [t for t, (step, _) in self.held.items() if step - now <= self.horizon]
            for t in sorted(due):
                step, ids = self.held.pop(t)
                if step > now:
                    for e in ids:
                        cache.prefetch((t, e), step)
            if due:
                cache.kick()

    def _routers(self, targets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``targets``' post-attention norm weights folded into their routers: (D, len * E) and (len * E),
        so that rms(x) @ W + b are all their router logits at once (cached per tuple of layers)."""
        cache = self.__dict__.setdefault("_fused", {})
        got = cache.get(targets)
        if got is None:
            ws, bs = [], []
            for j in targets:
                blk = self.moe.model.layers[j]
                r = blk.ffn.router
                ws.append((r.weight.float() * blk.post_norm.weight.float()).t())
                bs.append(r.bias.float() if r.bias is not None else torch.zeros(r.weight.shape[0]))
            got = cache[targets] = (torch.cat(ws, 1).contiguous(), torch.cat(bs))
        return got

    def after_fast(self, cache, layer: int, targets: list[int], f: torch.Tensor) -> None:
        """f: the fast state (1, 1, D) after fast layer ``layer`` (the slow stream has just finished it),
        approximating the slow state at depth R * (layer + 1): it predicts ``targets`` (their norms and routers
        in one product: predictions only decide what to load, never what is computed)."""
        if not cache.recording or not targets:
            return
        x = f.reshape(1, -1).float()
        eps = self.moe.model.layers[targets[0]].post_norm.eps
        W, b = self.routers.stacked(tuple(targets)) if self.routers is not None else self._routers(tuple(targets))
        logits = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) @ W + b
        picks = logits.view(len(targets), -1).topk(self.top_k, -1).indices.tolist()
        for j, ids in zip(targets, picks):
            step = cache.step_of(j)
            cache.predict(step, set(ids), j - layer)
            if self.horizon is not None and j - layer > self.horizon:
                self.held[j] = (step, ids)
                continue
            for e in ids:
                cache.prefetch((j, e), step)
        cache.kick()


class Oracle:
    """Perfect knowledge: the recorded expert trace of this prompt's decode (token -> layer -> experts)."""

    name = "oracle"

    def __init__(self, trace: list[list[list[int]]], horizon_tokens: int = 1):
        self.trace, self.horizon = trace, horizon_tokens

    def on_fetch(self, cache, layer, experts, state) -> None:
        if not cache.recording:
            return
        L = cache.L
        now = cache.step_of(layer)
        # true next use of everything in the horizon (eviction), then prefetch in order of need
        future = []
        for s in range(now + 1, now + 1 + self.horizon * L):
            t, l = divmod(s, L)
            if t >= len(self.trace):
                break
            for e in self.trace[t][l]:
                future.append(((l, e), s))
        seen = set()
        for key, s in future:
            if key not in seen:
                seen.add(key)
                prev = cache.next_use.get(key)
                if prev is None or prev < now or s < prev:
                    cache.next_use[key] = s
        if cache.token < len(self.trace) and layer + 1 < L:
            cache.predict(now + 1, self.trace[cache.token][layer + 1], 1)
        elif cache.token + 1 < len(self.trace) and layer + 1 == L:
            cache.predict(now + 1, self.trace[cache.token + 1][0], 1)
        done = set()
        for key, s in future:
            if key in done:
                continue
            done.add(key)
            if key in cache.map:
                continue
            if not cache.prefetch(key, s):
                break  # everything resident is needed sooner: later needs cannot be served either


class Tracing(Resident):
    """All experts resident, recording the decode trace (token -> layer -> experts) for the oracle."""

    def __init__(self, bank, num_layers: int):
        super().__init__(bank)
        self.L = num_layers
        self.trace: list[list[list[int]]] = []

    def begin_token(self) -> None:
        self.trace.append([[] for _ in range(self.L)])

    def fetch(self, layer, experts, state=None):
        if self.trace:
            self.trace[-1][layer] = list(experts)
        return super().fetch(layer, experts, state)

    def peek(self, layer, experts):
        return {e: self.bank[(layer, e)] for e in experts}


class MoEDecode(Strategy):
    """Plain one-token-per-step decoding of an ``MoEModel`` through a provider, optionally with the M2R2 fast
    stream in lockstep feeding ``M2R2Prefetch``. Batch 1 (expert sets are per token)."""

    cache_slack = 0

    def __init__(self, moe: MoEModel, provider=None, accelerator=None, policy: M2R2Prefetch | None = None,
                 name: str = "moe"):
        if (accelerator is None) != (policy is None):
            raise StrategyError("the fast stream needs both an accelerator and an M2R2Prefetch policy")
        self.moe, self.provider, self.acc, self.policy, self.name = moe, provider, accelerator, policy, name
        if accelerator is not None and moe.spec.routing != "moefy":
            raise StrategyError("the M2R2 fast row rides through the slow row's experts: moefy routing only")
        if provider is not None:  # now, not in setup: the decode loop prefills before it calls setup
            moe.set_provider(provider)

    def setup(self, state) -> None:
        if state.batch != 1:
            raise StrategyError("MoE expert offloading decodes one sequence at a time (batch 1)")
        if self.provider is not None:
            self.moe.set_provider(self.provider)
        self.fast_seconds = 0.0
        self.riding = self.acc is not None and self._ride_setup(state)

    @staticmethod
    def _targets(i: int, L: int, R: int) -> list[int]:
        """The slow layers fast layer i's state predicts (it approximates the slow state at depth R * (i + 1)): R*i+1
        .. R*(i+1), those still ahead of the slow stream."""
        return [j for j in range(R * i + 1, R * (i + 1) + 1) if i < j < L]

    def _ride_setup(self, state) -> bool:
        """The fast row rides in the slow row's kernel calls where every layer it visits can (``MoEBlock.can_ride``):
        a cache of two batch rows, the slow token's in row 0 and the fast row's in row 1, whose slots before the
        current token hold the slow stream's K/V (copied from the prompt's cache here, and after every step)."""
        m, c = state.model, state.cache
        t = int(c.lengths[0])
        cache2 = m.new_cache(2, c.max_len)
        x = torch.zeros(2, 1, m.cfg.hidden_size)
        ctx2 = m.context(cache2, torch.tensor([[t], [t]]))
        ctx1 = m.context(cache2.rows(0, 1), torch.tensor([[t]]))
        F_ = self.acc.fast_layers
        if not (all(b.can_ride(x, ctx2) for b in m.layers[:F_])
                and all(b.can_ride(x[:1], ctx1) for b in m.layers[F_:])):
            return False
        for dst, src in zip(cache2.k + cache2.v, c.k + c.v):
            dst[:, :, :t] = src[0, :, :t]
        self.cache2, self.cache1 = cache2, cache2.rows(0, 1)
        return True

    def stats(self) -> dict:
        return {"fast_seconds": self.fast_seconds}

    def _fast_layer(self, model, i: int, f: torch.Tensor, ctx, kv, t: int) -> torch.Tensor:
        blk = model.layers[i]
        q, k, v = blk.qkv_proj(blk.input_norm(f), ctx.cos, ctx.sin)
        keys = torch.cat([kv.k[i][:, :, :t], k], 2)
        vals = torch.cat([kv.v[i][:, :, :t], v], 2)
        a = f + blk.attend(q, keys, vals, None)
        experts = blk.ffn.last_experts
        provider = blk.ffn.provider
        y = a + blk.ffn(blk.post_norm(a), experts=experts, bufs=provider.peek(i, experts))
        return y + self.acc.adapters[i](f)

    def _ride_step(self, state, prov) -> torch.Tensor:
        """One token with the fast row riding (``_ride_setup``): fast layer i is slow layer i's kernel calls on a
        second row, plus adapter i; its state then predicts slow layers R*i+1 .. R*(i+1). Returns the slow row's
        final state (1, 1, D)."""
        import time
        m = state.model
        t = int(state.cache.lengths[0])
        ctx2 = m.context(self.cache2, torch.tensor([[t], [t]]))
        ctx1 = m.context(self.cache1, torch.tensor([[t]]))
        x = m.embed(state.pending.view(-1, 1))
        xx = torch.cat([x, x], 0)
        L, F_, R = m.cfg.num_layers, self.acc.fast_layers, self.acc.cfg.rate
        for i in range(F_):
            y = m.layers[i].ride(xx, ctx2)
            t0 = time.perf_counter()
            f = y[1:2] + self.acc.adapters[i](xx[1:2])
            xx = torch.cat([y[:1], f], 0)
            self.policy.after_fast(prov, i, self._targets(i, L, R), f)
            self.fast_seconds += time.perf_counter() - t0
        x = xx[:1]
        for i in range(F_, L):
            x = m.layer(i, x, ctx1)
        for kv in (self.cache2.k, self.cache2.v):  # the fast row's later steps see the slow K/V of this slot
            for i in range(F_):
                kv[i][1, :, t] = kv[i][0, :, t]
        state.cache.counters.layer_calls += L + F_
        return x

    def _layers(self, state, prov) -> torch.Tensor:
        """One token through every layer with the separate PyTorch fast pass (where the fast row cannot ride)."""
        import time
        m = state.model
        n = state.cache.lengths
        t = int(n[0])
        ctx = m.context(state.cache, n.view(-1, 1))
        x = m.embed(state.pending.view(-1, 1))
        f = x
        L = m.cfg.num_layers
        F_ = self.acc.fast_layers if self.acc is not None else 0
        R = self.acc.cfg.rate if self.acc is not None else 1
        for i in range(L):
            x = m.layer(i, x, ctx)
            if i < F_:
                t0 = time.perf_counter()
                f = self._fast_layer(m, i, f, ctx, state.cache, t)
                self.policy.after_fast(prov, i, self._targets(i, L, R), f)
                self.fast_seconds += time.perf_counter() - t0
        return x

    def step(self, state) -> list[list[int]]:
        prov = self.moe.ffns[0].provider
        if hasattr(prov, "begin_token"):
            prov.begin_token()
        x = self._ride_step(state, prov) if self.riding else self._layers(state, prov)
        state.cache.counters.forward_passes += 1
        logits = state.model.head(x)[:, 0]
        state.cache.advance(1)
        nxt = state.sampling.sample(logits, state.generator)
        state.pending = nxt
        return [[tok] for tok in nxt.tolist()]
