"""Continuous batching over slots: the engine under ``m2r2 serve``.

``Batcher`` owns one pre-allocated KV cache of ``parallel`` rows (slots) and one thread that loops:

1. admit queued requests into free slots (a request waits in a bounded queue; ``QueueFull`` when it is full);
2. prefill one chunk (``prefill_chunk`` tokens) of one admitted prompt, so a long prompt never stalls the
   running streams for more than one chunk;
3. step every request that decodes with a lossless speculative strategy once (its own ``Strategy`` on its own
   slot, a batch-1 view of the shared cache), and
4. step every plain request together: one forward over the slots' rows (their K/V written in place), one
   token per row, each row sampled with its request's own settings and seeded generator.

A finished or cancelled request frees its slot at once; its events (new tokens, text deltas, the finish) go to
the callback given at ``submit``. Each request's greedy output equals ``lm.generate`` on it alone: its prompt is
prefilled exactly as ``decode`` prefills a batch-1 prompt (one forward when it fits in a chunk), and a decode
row's product does not depend on how many rows share the call (the native block kernel; the LM head through
the native row-independent product, ``head_rows``); seeded sampling draws from the request's own generator in
the same order as alone.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..decoding import registry
from ..decoding.plain import PlainStrategy
from ..decoding.state import DecodeState, Strategy, commit
from ..engine import native
from ..engine.sampling import SamplingConfig
from ..errors import ContextLengthError, M2R2Error, PromptError, StrategyError


class QueueFull(M2R2Error):
    """The server's queue is full: try again later."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()  # stop strings (the text ends before the first one produced)
    strategy: str = "plain"
    strategy_options: dict = field(default_factory=dict)


@dataclass
class Event:
    """What a request produced since the last event. ``finish_reason`` is set on the last one: "stop" (EOS or a
    stop string), "length" (token budget or context end) or "cancelled"."""

    token_ids: list[int]
    text: str  # the text these tokens add (held back while it could be the start of a stop string)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time: float = 0.0


class Handle:
    """A submitted request: ``cancel()`` frees its slot at the next step."""

    def __init__(self, rid: int, request: Request, on_event: Callable[[Event], None]):
        self.id, self.request, self.on_event = rid, request, on_event
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.finished: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class _Slot:
    """A request occupying one row of the shared cache."""

    def __init__(self, index: int, handle: Handle, state: DecodeState, strategy: Strategy | None, eos: set[int],
                 budget: int, tokenizer):
        self.index, self.handle, self.state, self.strategy = index, handle, state, strategy
        self.eos, self.budget, self.tokenizer = eos, budget, tokenizer
        self.prefilled = 0  # prompt tokens written so far
        self.decoding = False
        self.text = ""  # text emitted so far
        self.finish: str | None = None

    @property
    def prompt(self) -> list[int]:
        return self.state.prompts[0]


def head_rows(model, x: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head for rows x (N, 1, D) -> float32 logits (N, V), each row computed as it is alone (the
    native product's rows are independent of how many share the call; the oneDNN few-row product is not)."""
    lin = model.lm_head
    if lin.mode == "gguf":  # the block kernels' rows are independent too
        return model.head(x)[:, 0]
    h = model.norm(x).reshape(x.shape[0], -1)
    if native.available() and lin.weight.dtype == torch.float32 and lin.mode is None and x.shape[0] <= 16:
        return native.gemv(h.contiguous(), lin.float_weight(), lin.bias, lin.out_features).float()
    return torch.cat([model.head(h[i:i + 1].unsqueeze(1))[:, 0] for i in range(h.shape[0])])


class Batcher:
    def __init__(self, lm, parallel: int = 4, max_queue: int = 64, ctx_size: int | None = None,
                 prefill_chunk: int = 512):
        if parallel < 1:
            raise M2R2Error(f"parallel must be >= 1, got {parallel}")
        self.lm, self.model = lm, lm.model
        self.parallel, self.max_queue, self.prefill_chunk = parallel, max_queue, prefill_chunk
        model_ctx = int(self.model.rope_cos.shape[0])
        self.ctx = min(model_ctx, ctx_size or 4096)
        self.cache = self.model.new_cache(parallel, self.ctx)
        self.slots: list[_Slot | None] = [None] * parallel
        self.queue: deque[Handle] = deque()
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.eos = set(lm.config.eos_token_ids)
        self.plain = PlainStrategy()  # plain rows are stepped together here; this gives their budget rule
        self.running = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # counters: generated tokens (the metrics' tokens/s) and engine steps
        self.steps = self.tokens_out = 0

    # ---------------------------------------------------------------- the client side
    def validate(self, req: Request) -> None:
        """Raise the user's error for a request that cannot run (before it is queued)."""
        if not req.prompt_ids:
            raise PromptError("the prompt is empty")
        V = self.lm.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= V:
            raise PromptError(f"the prompt has token ids outside [0, {V})")
        if len(req.prompt_ids) >= self.ctx:
            raise ContextLengthError(f"the prompt has {len(req.prompt_ids)} tokens; this server's context window is "
                                     f"{self.ctx} (at most {self.ctx - 1} prompt tokens leave room for one new token)")
        if req.max_tokens < 1:
            raise PromptError(f"max_tokens must be >= 1, got {req.max_tokens}")
        spec = registry.get(req.strategy)  # StrategyError for an unknown one
        if req.strategy != "plain" and not spec.lossless:
            raise StrategyError(f"strategy {req.strategy} changes the output; the server runs lossless strategies "
                                "only (plain, or a speculative one)")
        registry.make_options(req.strategy, req.strategy_options)

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> Handle:
        self.validate(req)
        with self.cond:
            if self.error is not None:
                raise M2R2Error(f"the engine stopped: {self.error}")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            h = Handle(next(self.ids), req, on_event)
            self.queue.append(h)
            self.cond.notify()
        return h

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def queued(self) -> int:
        return len(self.queue)

    def start(self) -> "Batcher":
        """Run the engine loop in a thread of its own (tests, embedding). ``m2r2 serve`` runs it in the main
        thread instead (``run``): libgomp throttles its workers' spinning once it manages more threads than
        there are CPUs, so a second OpenMP pool (one per thread that computes) slows the kernels markedly here
        (about half speed for a one-token step of the embedded model in an ad-hoc check on this 2-core machine;
        no benchmark file records it)."""
        self.running = True
        self.thread = threading.Thread(target=self._run, name="m2r2-batcher", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        """Run the engine loop in this thread until ``stop`` (from another thread) or Ctrl-C."""
        self.running = True
        self._run()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while self.running and not self.queue and not any(self.slots):
                            self.cond.wait(0.5)
                        if not self.running:
                            break
                    self._step()
        except BaseException as e:  # a bug: fail every request in flight with its message, keep the reason
            self.error = e
            for s in self.slots:
                if s is not None:
                    self._finish(s, "error")
            raise

    def _step(self) -> None:
        self._admit()
        for s in self.slots:
            if s is not None and s.handle.cancelled:
                self._finish(s, "cancelled")
        pre = [s for s in self.slots if s is not None and not s.decoding]
        if pre:  # one chunk of one prompt per step: running streams keep going between chunks
            self._prefill_chunk(min(pre, key=lambda s: s.handle.id))
        spec = [s for s in self.slots if s is not None and s.decoding and s.strategy is not None]
        for s in spec:
            self._emit(s, s.strategy.step(s.state))
        plain = [s for s in self.slots if s is not None and s.decoding and s.strategy is None]
        if plain:
            self._plain_step(plain)
        self.steps += 1

    def _admit(self) -> None:
        with self.cond:
            while self.queue and None in self.slots:
                h = self.queue.popleft()
                if h.cancelled:
                    continue
                i = self.slots.index(None)
                try:
                    self.slots[i] = self._slot(i, h)
                except M2R2Error as e:  # e.g. an adapter the strategy needs is missing
                    h.on_event(Event([], "", finish_reason="error:" + str(e)))

    def _slot(self, i: int, h: Handle) -> _Slot:
        req = h.request
        strategy = None if req.strategy == "plain" else self.lm.strategy(req.strategy, **req.strategy_options)
        budget = (strategy or self.plain).budget(req.max_tokens, len(req.prompt_ids), self.ctx)
        state = DecodeState(self.model, [list(req.prompt_ids)], [budget], req.sampling, cache=self.cache.rows(i, i + 1))
        return _Slot(i, h, state, strategy, self.eos, budget, self.lm.tokenizer)

    def _prefill_chunk(self, s: _Slot) -> None:
        st, p = s.state, s.prompt
        a, b = s.prefilled, min(len(p), s.prefilled + self.prefill_chunk)
        ids = torch.tensor([p[a:b]], dtype=torch.long)
        x = self.model.hidden(ids, st.cache, torch.arange(a, b).view(1, -1), prompt=True)
        st.cache.advance(b - a)
        st.prefill_states, st.prefill_start = x, a  # (drafters that read the prompt's states)
        s.prefilled = b
        if b < len(p):
            return
        logits = self.model.head(x[:, -1:])[:, 0]
        first = st.sampling.sample(logits, st.generator)
        st.pending = first
        s.decoding = True
        self._emit(s, [[int(first[0])]])
        if s.strategy is not None and s.finish is None:
            s.strategy.setup(st)

    def _plain_step(self, rows: list[_Slot]) -> None:
        """One token for every plain row: one forward over the contiguous range of slots holding them (other
        slots in the range write a throwaway K/V at their next free slot, which their own next write replaces)."""
        lo, hi = min(s.index for s in rows), max(s.index for s in rows) + 1
        lengths = torch.zeros(hi - lo, dtype=torch.long)
        ids = torch.zeros(hi - lo, 1, dtype=torch.long)
        for j in range(lo, hi):
            s = self.slots[j]
            if s is not None:
                lengths[j - lo] = s.state.cache.lengths[0]
                ids[j - lo, 0] = s.state.pending[0] if s.decoding else 0
        view = self.cache.rows(lo, hi, lengths)
        x = self.model.hidden(ids, view, lengths.view(-1, 1))
        logits = head_rows(self.model, x)
        for s in rows:
            st = s.state
            st.cache.advance(1)
            nxt = st.sampling.sample(logits[s.index - lo: s.index - lo + 1], st.generator)
            st.pending = nxt
            self._emit(s, [[int(nxt[0])]])

    def _emit(self, s: _Slot, new: list[list[int]]) -> None:
        st, h = s.state, s.handle
        toks, finish = commit(st.out[0], new[0], s.budget, s.eos)
        # text: the decoded answer so far, held back while its end could start a stop string
        text_ids = [t for t in st.out[0] if t not in s.eos]
        full = self.lm.decode_text(text_ids) or "" if s.tokenizer is not None else ""
        stops = h.request.stop
        cut = min((full.find(x) for x in stops if x and x in full), default=-1)
        if cut >= 0:
            full, finish = full[:cut], "stop"
        hold = 0 if finish else max((k for x in stops for k in range(len(x), 0, -1) if full.endswith(x[:k])),
                                    default=0)
        if full.endswith("\ufffd") and not finish:  # a multi-byte character still incomplete
            hold = max(hold, 1)
        visible = full[: len(full) - hold]
        delta = visible[len(s.text):] if visible.startswith(s.text) else ""
        s.text = visible if visible.startswith(s.text) else s.text
        self.tokens_out += len(toks)
        if h.first_token is None and toks:
            h.first_token = time.perf_counter()
        s.finish = finish
        h.on_event(Event(toks, delta, finish, len(s.prompt), len(st.out[0]), time.perf_counter()))
        if finish is not None:
            self._release(s)

    def _finish(self, s: _Slot, reason: str) -> None:
        s.finish = reason
        s.handle.on_event(Event([], "", reason, len(s.prompt), len(s.state.out[0]), time.perf_counter()))
        self._release(s)

    def _release(self, s: _Slot) -> None:
        s.handle.finished = time.perf_counter()
        if self.slots[s.index] is s:
            self.slots[s.index] = None
