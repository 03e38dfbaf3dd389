"""The memory hierarchy: experts live in slow memory, a budget of B expert slots fits in fast memory.

``ExpertCache`` is the ``ExpertProvider`` the MoE FFN asks for expert buffers. It owns B slots of fast memory
(one page-aligned anonymous mapping, so storage reads can land in a slot directly with O_DIRECT), the
map of which expert sits in which slot, the eviction rule, and a background ``Loader`` thread that moves
experts from slow memory into slots. Two kinds of slow memory (``m2r2.moe.stores``): ``LinkStore``, experts
in host RAM behind a modelled link, and ``FileStore``, one file per expert on real storage.

File reads are served one at a time in priority order: demand loads (the compute thread is waiting) first,
then prefetches by the step at which they are predicted to be needed; a prefetch whose step has passed
before it started is cancelled. A slot is reserved (its old expert evicted) when a request is issued, on
the compute thread, so the loader only ever writes into slots nobody reads. The compute thread's waits
are the *stall* time.

Eviction (``victim``): free slots first; then, among experts not pinned by the layer being computed and not
in flight, the one with the farthest known next use (a prefetcher's prediction, or for the oracle the
true trace), ties and unknowns broken by least recently used (``lru``) or least frequently used (``lfu``).
A prefetch never evicts an expert that is needed no later than the one it brings in. With ``reuse`` (the
prefetching policies), every expert used also gets an expected next use one token later at the same layer: the
reuse plain LRU lives on (about half of a token's experts were used by the token before) is then not evicted
by prefetches for later layers, which take the slots of experts whose expected use has passed.
"""

from __future__ import annotations

import heapq
import math
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .layers import MoEModel
from .stores import FileStore, padded_bytes


# ---------------------------------------------------------------- the loader

@dataclass(order=True)
class Request:
    priority: float
    seq: int
    key: tuple = field(compare=False)
    slot: int = field(compare=False)
    need: float = field(compare=False)  # the step at which it is (predicted to be) needed
    demand: bool = field(compare=False, default=False)
    issued: float = field(compare=False, default_factory=time.perf_counter)
    ready_at: float = field(compare=False, default=0.0)  # modelled completion (link); 0 = when the copy is done

    def ready(self) -> bool:
        return self.done.is_set() and time.perf_counter() >= self.ready_at

    def wait(self) -> None:
        """Until the data is in its slot and (modelled link) the transfer's completion time has passed."""
        self.done.wait()
        left = self.ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
    started: bool = field(compare=False, default=False)
    cancelled: bool = field(compare=False, default=False)
    done: threading.Event = field(compare=False, default_factory=threading.Event)


class Loader(threading.Thread):
    """One background thread serving load requests in priority order (a heap); with ``batch`` it takes every
    queued request at once (the modelled link, whose timing is already fixed at issue)."""

    def __init__(self, do_load, batch: bool = False, cpu: int | None = None):
        super().__init__(daemon=True, name="m2r2-expert-loader")
        self.do_load, self.batch, self.cpu = do_load, batch, cpu
        self.heap: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.busy_seconds = 0.0

    def submit(self, req: Request, notify: bool = True) -> None:
        with self.cv:
            heapq.heappush(self.heap, req)
            if notify:
                self.cv.notify()

    def kick(self) -> None:
        """Wake the loader for everything submitted without ``notify`` (one wake-up per batch of requests:
        every wake-up of a second Python thread costs the compute thread a GIL hand-off)."""
        with self.cv:
            if self.heap:
                self.cv.notify()

    def promote(self, req: Request) -> None:
        """Make a queued prefetch a demand load (the compute thread now waits for it)."""
        with self.cv:
            if not req.started and not req.cancelled:
                req.priority, req.demand = -1.0, True
                heapq.heapify(self.heap)

    def cancel_if_queued(self, req: Request) -> bool:
        with self.cv:
            if req.started:
                return False
            req.cancelled = True
            return True

    def run(self) -> None:
        if self.cpu is not None:  # this thread only (Linux: pid 0 = the calling thread)
            os.sched_setaffinity(0, {self.cpu})
        while True:
            with self.cv:
                while not self.heap and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                if self.batch:  # everything queued, in priority order, as one batch
                    reqs = [heapq.heappop(self.heap) for _ in range(len(self.heap))]
                else:
                    reqs = [heapq.heappop(self.heap)]
                reqs = [r for r in reqs if not r.cancelled]
                for r in reqs:
                    r.started = True
            if not reqs:
                continue
            t0 = time.perf_counter()
            try:
                self.do_load(reqs)
            except BaseException as e:  # surfaced on the compute thread
                self.error = e
            self.busy_seconds += time.perf_counter() - t0
            for r in reqs:
                r.done.set()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()


# ---------------------------------------------------------------- fast memory

@dataclass
class Entry:
    slot: int
    req: Request | None = None  # the load that fills it (None once consumed)
    last_use: float = -1.0
    freq: int = 0
    prefetched: bool = False  # loaded by a prefetch and not used since


@dataclass
class CacheStats:
    lookups: int = 0  # (token, layer, expert) needs in decode
    hits: int = 0  # resident and loaded when needed
    late: int = 0  # a prefetch was in flight or queued when needed (partial stall)
    misses: int = 0  # not requested before it was needed: an on-demand load
    loads: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    prefetch_cancelled: int = 0
    stall_seconds: float = 0.0
    bytes_loaded: int = 0
    tokens: int = 0
    pred_tp: int = 0  # predicted-and-needed experts, over (token, layer) steps with a prediction
    pred_fp: int = 0
    pred_fn: int = 0
    pred_steps: int = 0
    by_lookahead: dict = field(default_factory=dict)  # layers ahead -> [tp, fp, fn]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["by_lookahead_counts"] = {a: list(v) for a, v in sorted(self.by_lookahead.items())}
        d["by_lookahead"] = {a: {"precision": tp / (tp + fp) if tp + fp else None,
                                 "recall": tp / (tp + fn) if tp + fn else None, "n": tp + fn}
                             for a, (tp, fp, fn) in sorted(self.by_lookahead.items())}
        d["hit_rate"] = self.hits / self.lookups if self.lookups else None
        d["stall_ms_per_token"] = 1e3 * self.stall_seconds / self.tokens if self.tokens else None
        d["loads_per_token"] = self.loads / self.tokens if self.tokens else None
        d["precision"] = self.pred_tp / (self.pred_tp + self.pred_fp) if self.pred_tp + self.pred_fp else None
        d["recall"] = self.pred_tp / (self.pred_tp + self.pred_fn) if self.pred_tp + self.pred_fn else None
        return d


class ExpertCache:
    """B slots of fast memory, fed by a background loader; the ``ExpertProvider`` of a budgeted run.

    Time is counted in *steps*: step = token * L + layer (decode tokens only; prefill is step -1). A
    strategy's policy (``m2r2.moe.prefetch``) sees every fetch and may issue prefetches with
    ``prefetch(key, need_step)``; ``next_use`` holds the earliest predicted future step of each expert, used
    by eviction."""

    def __init__(self, moe: MoEModel, budget: int, store, evict: str = "lru", loader_cpu: int | None = None):
        if budget < moe.spec.top_k:
            raise ValueError(f"the budget ({budget} experts) must hold at least one layer's top-k "
                             f"({moe.spec.top_k})")
        if evict not in ("lru", "lfu"):
            raise ValueError(f"evict must be 'lru' or 'lfu', got {evict!r}")
        self.moe, self.budget, self.store, self.evict = moe, budget, store, evict
        self.L = moe.num_layers
        self.numel = moe.spec.buffer_numel
        dtype = next(iter(moe.bank.values())).dtype
        self.item_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = padded_bytes(self.item_bytes)
        self.mem = mmap.mmap(-1, self.slot_bytes * budget)  # page-aligned: O_DIRECT reads land in place
        flat = torch.frombuffer(self.mem, dtype=torch.uint8)
        self.slots = [flat[i * self.slot_bytes:(i + 1) * self.slot_bytes].view(dtype)[: self.numel]
                      for i in range(budget)]
        self.free = list(range(budget - 1, -1, -1))
        self.map: dict[tuple[int, int], Entry] = {}
        self.pinned: set = set()
        self.next_use: dict[tuple[int, int], float] = {}
        self.policy = None
        self.loader = Loader(self._do_load, batch=hasattr(store, "schedule"), cpu=loader_cpu)
        self.loader.start()
        self.seq = 0
        self.token = -1  # decode token index (-1: prefill)
        self.now = -1.0
        self.recording = False
        self.stats = CacheStats()
        self.predictions: dict[int, set] = {}  # step -> predicted experts of that step's layer
        self.stale: list = []  # (need, seq, key, request) of every prefetch issued (``_drop_stale``)
        self.fixed: set = set()  # experts held for the whole run (``hold``), never evicted
        # reuse-aware eviction (prefetching policies set it): an expert just used is expected again at the same layer
        # of the next token, so prefetches evict first what was used at layers already passed and not used again
        self.reuse = False

    # ---- the loader's side
    def _do_load(self, reqs: list[Request]) -> None:
        if isinstance(self.store, FileStore):
            for req in reqs:
                s = req.slot
                mv = memoryview(self.mem)[s * self.slot_bytes:(s + 1) * self.slot_bytes]
                try:
                    self.store.load(req.key, mv)
                finally:
                    mv.release()
        else:
            self.store.copy_many([r.key for r in reqs], [self.slots[r.slot] for r in reqs])

    # ---- bookkeeping
    def begin_token(self) -> None:
        """Called by the decode strategy before each decode token (after prefill)."""
        self.token += 1
        self.recording = True
        self.stats.tokens += 1

    def step_of(self, layer: int, token: int | None = None) -> int:
        return (self.token if token is None else token) * self.L + layer

    def _key_rank(self, key, e: Entry) -> tuple:
        """Eviction order: larger = evicted first."""
        nu = self.next_use.get(key, math.inf)
        if nu < self.now:
            nu = math.inf
        if self.evict == "lfu":
            return (nu, -e.freq, -e.last_use)
        return (nu, -e.last_use)

    def victim(self, need: float | None = None) -> int | None:
        """A slot for a new expert; None if a prefetch (``need`` given) would evict something needed no later."""
        if self.free:
            return self.free.pop()
        best, best_rank = None, None
        for key, e in self.map.items():
            if key in self.pinned or key in self.fixed or (e.req is not None and not e.req.ready()):
                continue
            r = self._key_rank(key, e)
            if best_rank is None or r > best_rank:
                best, best_rank = key, r
        if best is None:
            return None
        if need is not None and best_rank[0] <= need:
            return None
        e = self.map.pop(best)
        return e.slot

    def _request(self, key, need: float, demand: bool) -> Request | None:
        slot = self.victim(None if demand else need)
        while slot is None and demand:
            slot = self._reclaim()
        if slot is None:
            return None
        self.seq += 1
        req = Request(-1.0 if demand else need, self.seq, key, slot, need, demand)
        if hasattr(self.store, "schedule"):
            req.ready_at = self.store.schedule(self.item_bytes, req.issued)
        self.map[key] = Entry(slot, req, last_use=self.now, prefetched=not demand)
        if not demand:
            heapq.heappush(self.stale, (need, self.seq, key, req))
        if self.recording:
            self.stats.loads += 1
            self.stats.bytes_loaded += self.item_bytes
            if not demand:
                self.stats.prefetch_loads += 1
        self.loader.submit(req, notify=False)  # the fetch (or the prefetcher) kicks the loader once for all
        return req

    def _reclaim(self) -> int | None:
        """Every unpinned slot holds a prefetch in flight: cancel the queued one needed last, or wait for the
        running one to land (then it can be evicted)."""
        queued = [(e.req.need, k) for k, e in self.map.items()
                  if k not in self.pinned and e.req is not None and not e.req.done.is_set() and not e.req.started]
        for _, k in sorted(queued, reverse=True):
            e = self.map[k]
            if self.loader.cancel_if_queued(e.req):
                del self.map[k]
                if self.recording:
                    self.stats.prefetch_cancelled += 1
                return e.slot
        running = [e.req for k, e in self.map.items() if k not in self.pinned and e.req is not None
                   and not e.req.ready()]
        if not running:
            raise RuntimeError("no evictable slot: the budget cannot hold one layer's experts")
        self.loader.kick()
        running[0].wait()
        return self.victim(None)

    def hold(self, keys: list[tuple[int, int]]) -> None:
        """Load ``keys`` now (before decoding; not counted) and keep them for the whole run: the static part of a
        pinning policy (``prefetch.Pinned``). At most the budget minus one layer's top-k."""
        keys = list(keys)[: max(0, self.budget - self.moe.spec.top_k)]
        reqs = [self._request(k, -1.0, demand=True) for k in keys if k not in self.map]
        self.loader.kick()
        for r in reqs:
            r.wait()
        for k in keys:
            self.map[k].req = None
        self.fixed = set(keys)

    def prefetch(self, key: tuple[int, int], need: float) -> bool:
        """Ask for ``key`` to be loaded before step ``need``. Returns whether a load was issued."""
        prev = self.next_use.get(key)
        if prev is None or prev < self.now or need < prev:
            self.next_use[key] = need
        if key in self.map:
            return False
        return self._request(key, need, demand=False) is not None

    def kick(self) -> None:
        self.loader.kick()

    def predict(self, step: int, experts, lookahead: int = 1) -> None:
        """Record a prediction of the experts of ``step``, made ``lookahead`` layers ahead of the slow stream
        (for precision/recall; the latest one counts)."""
        self.predictions[step] = (set(experts), lookahead)

    def _drop_stale(self) -> None:
        """Cancel the queued prefetches whose step has passed (``stale``: a heap of prefetch requests by need, so
        a fetch looks only at those that are due)."""
        while self.stale and self.stale[0][0] < self.now:
            _, _, key, r = heapq.heappop(self.stale)
            e = self.map.get(key)
            if e is None or e.req is not r or r.demand or r.done.is_set():
                continue
            if self.loader.cancel_if_queued(r):
                del self.map[key]
                self.free.append(e.slot)
                if self.recording:
                    self.stats.prefetch_cancelled += 1

    # ---- the provider
    def fetch(self, layer: int, experts: list[int], state: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        if self.loader.error is not None:
            raise self.loader.error
        self.now = float(self.step_of(layer)) if self.recording else -1.0
        rec = self.recording
        st = self.stats
        if rec:
            self._drop_stale()
            pred = self.predictions.pop(int(self.now), None)
            if pred is not None:
                pred, ahead = pred
                need = set(experts)
                st.pred_steps += 1
                tp, fp, fn = len(pred & need), len(pred - need), len(need - pred)
                st.pred_tp += tp
                st.pred_fp += fp
                st.pred_fn += fn
                c = st.by_lookahead.setdefault(ahead, [0, 0, 0])
                c[0] += tp
                c[1] += fp
                c[2] += fn
        keys = [(layer, e) for e in experts]
        self.pinned = set(keys)
        waits = []
        for key in keys:
            e = self.map.get(key)
            if e is None:
                if rec:
                    st.misses += 1
                waits.append(self._request(key, self.now, demand=True))
            else:
                if e.req is not None and not e.req.ready():
                    if rec:
                        st.late += 1
                    self.loader.promote(e.req)
                    waits.append(e.req)
                elif rec:
                    st.hits += 1
                if e.prefetched and rec:
                    st.prefetch_used += 1
            if rec:
                st.lookups += 1
        if self.policy is not None:  # prefetches for later layers queue behind this layer's demand loads
            self.policy.on_fetch(self, layer, experts, state)
        self.loader.kick()
        if waits:
            t0 = time.perf_counter()
            for r in waits:
                r.wait()
            if rec:
                st.stall_seconds += time.perf_counter() - t0
            if self.loader.error is not None:
                raise self.loader.error
        out = {}
        for key in keys:
            e = self.map[key]
            e.req, e.prefetched = None, False
            e.last_use = self.now if rec else e.last_use
            e.freq += 1
            out[key[1]] = self.slots[e.slot]
            if rec and self.reuse:  # expected next use: the same layer of the next token
                self.next_use[key] = self.now + self.L
        return out

    def peek(self, layer: int, experts: list[int]) -> dict[int, torch.Tensor]:
        """Buffers of experts that are resident and loaded (the fast row reuses the slow row's set)."""
        return {e: self.slots[self.map[(layer, e)].slot] for e in experts}

    def close(self) -> None:
        self.loader.stop()
        self.loader.join(timeout=5)
        if hasattr(self.store, "close"):
            self.store.close()
