"""One decode loop with pluggable strategies.

The loop owns what every method shares: prefill of a ragged batch, the cache and per-row lengths, the
pending token of each row, stopping (EOS, token budget, context end), streaming and statistics. A
strategy owns only how the next tokens of each row are produced: plain decoding feeds the pending token
through the full model; speculative strategies draft, verify and crop; early-exit strategies leave the
model early. Every strategy works on token ids; tokenizers stay outside the engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import ContextLengthError, SamplingError
from ..engine.model import Transformer
from ..engine.sampling import SamplingConfig
from ..engine.threads import ThreadGovernor


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0  # wall time of the whole call (prefill + decode)
    prefill_seconds: float = 0.0
    tokens_per_s: float = 0.0  # new tokens / seconds
    decode_tokens_per_s: float = 0.0  # tokens after the first / decode time
    forward_passes: int = 0  # full-depth model calls (prefill included)
    layer_calls: int = 0  # token rows x layers executed (compute accounting)
    steps: int = 0  # decode-loop iterations after prefill
    strategy: str = "plain"
    thread_changes: int = 0  # times the thread governor (m2r2.engine.threads) moved the thread count
    extra: dict = field(default_factory=dict)  # strategy-specific counters (drafts, acceptance, ...)

    def to_dict(self) -> dict:
        return asdict(self)


class DecodeState:
    """The per-call state every strategy reads and advances: model, cache, sampling, pending tokens."""

    def __init__(self, model: Transformer, prompts: list[list[int]], max_new_tokens: list[int],
                 sampling: SamplingConfig, cache_slack: int = 0):
        self.model = model
        self.sampling = sampling
        self.generator = sampling.generator()
        self.batch = len(prompts)
        self.prompts = prompts
        self.prompt_lens = torch.tensor([len(p) for p in prompts])
        self.max_new = max_new_tokens
        need = max(len(p) + m for p, m in zip(prompts, max_new_tokens)) + cache_slack
        self.cache = model.new_cache(self.batch, min(need, model.rope_cos.shape[0]))
        self.pending = torch.zeros(self.batch, dtype=torch.long)  # last sampled token, not yet in the cache
        self.out: list[list[int]] = [[] for _ in prompts]
        self.done = [m <= 0 for m in max_new_tokens]

    @property
    def active(self) -> list[bool]:
        return [not d for d in self.done]

    def prefill(self) -> torch.Tensor:
        """Run the prompts (right-padded) through the model; return the last-position logits (B, V)."""
        lens = self.prompt_lens
        T = int(lens.max())
        ids = torch.zeros(self.batch, T, dtype=torch.long)
        for b, p in enumerate(self.prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        positions = torch.arange(T).expand(self.batch, T)
        m = self.model
        x = m.hidden(ids, self.cache, positions)
        last = x[torch.arange(self.batch), lens - 1].unsqueeze(1)  # (B, 1, D): only these need the head
        self.cache.crop(0)
        self.cache.advance(lens)
        return m.head(last)[:, 0]


class Strategy(Protocol):
    """How a strategy plugs into the loop. ``step`` must return at least one token for every active
    row, leave the cache holding exactly the committed tokens (all but each row's new last token),
    and set ``state.pending`` to each row's new last token."""

    name: str
    cache_slack: int  # extra cache slots the strategy writes past the budget (drafts, verification)

    def setup(self, state: DecodeState) -> None: ...

    def step(self, state: DecodeState) -> list[list[int]]: ...


class PlainStrategy:
    """Ordinary autoregressive decoding: one full-depth forward per token."""

    name = "plain"
    cache_slack = 0

    def setup(self, state: DecodeState) -> None:
        pass

    def step(self, state: DecodeState) -> list[list[int]]:
        ids = state.pending.view(-1, 1)
        positions = state.cache.lengths.view(-1, 1)
        logits = state.model(ids, state.cache, positions)[:, 0]  # (B, V)
        # finished rows stand still: near the context end their cache must not outgrow its slots while others go on
        state.cache.advance(torch.tensor([0 if d else 1 for d in state.done]) if any(state.done) else 1)
        nxt = state.sampling.sample(logits, state.generator)
        state.pending = nxt
        return [[t] for t in nxt.tolist()]


STRATEGIES: dict[str, Callable[..., Strategy]] = {"plain": PlainStrategy}


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    STRATEGIES[name] = factory


def make_strategy(strategy: str | Strategy, **kwargs) -> Strategy:
    if not isinstance(strategy, str):
        return strategy
    if strategy not in STRATEGIES:
        raise SamplingError(f"unknown strategy {strategy!r} (available: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[strategy](**kwargs)


TokenCallback = Callable[[int, list[int]], None]


@torch.inference_mode()
def decode(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int = 128,
           sampling: SamplingConfig = SamplingConfig(), strategy: str | Strategy = "plain",
           eos_token_ids: tuple[int, ...] | None = None, on_tokens: TokenCallback | None = None,
           ) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids, ragged). Returns the new
    tokens of each row (EOS included when produced) and the call's statistics."""
    if not prompts:
        raise SamplingError("no prompts given")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ctx_len = model.rope_cos.shape[0]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SamplingError(f"prompt {i} is empty")
        if len(p) >= ctx_len:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens; the model's context window is {ctx_len} "
                f"(at most {ctx_len - 1} prompt tokens leave room for one new token)")
        if max(p) >= model.cfg.vocab_size or min(p) < 0:
            raise SamplingError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size})")
    strat = make_strategy(strategy)
    eos = set(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    # the context window caps each row's budget. A strategy that writes past a token's slot (``cache_slack``)
    # stops that many tokens early unless it fits its writes to the room left itself (``context_reserve`` 0,
    # e.g. speculative decoding shrinking its drafts); the prefill's token always fits
    reserve = getattr(strat, "context_reserve", strat.cache_slack)
    budgets = [min(max_new_tokens, max(1, ctx_len - len(p) - reserve)) for p in prompts]
    passes0, calls0 = model.forward_passes, model.layer_calls
    t0 = time.perf_counter()
    state = DecodeState(model, prompts, budgets, sampling, cache_slack=strat.cache_slack)
    stats = GenerationStats(strategy=strat.name)
    if all(state.done):
        return state.out, stats

    def emit(new: list[list[int]]) -> None:
        for b, toks in enumerate(new):
            if state.done[b] or not toks:
                continue
            room = state.max_new[b] - len(state.out[b])
            toks = toks[:room]
            for j, t in enumerate(toks):
                if t in eos:
                    toks = toks[: j + 1]
                    break
            state.out[b].extend(toks)
            if on_tokens is not None and toks:
                on_tokens(b, toks)
            if len(state.out[b]) >= state.max_new[b] or (toks and toks[-1] in eos):
                state.done[b] = True

    logits = state.prefill()
    first = sampling.sample(logits, state.generator)
    state.pending = first
    t_prefill = time.perf_counter()
    stats.prefill_seconds = t_prefill - t0
    emit([[t] for t in first.tolist()])
    strat.setup(state)
    governor = ThreadGovernor()  # fewer threads while another process holds the cores
    try:
        while not all(state.done):
            emit(strat.step(state))
            stats.steps += 1
            governor.step()
    finally:
        governor.close()
    stats.thread_changes = governor.changes
    t1 = time.perf_counter()
    stats.new_tokens = sum(len(o) for o in state.out)
    stats.seconds = t1 - t0
    stats.tokens_per_s = stats.new_tokens / stats.seconds if stats.seconds > 0 else 0.0
    decode_tokens = stats.new_tokens - sum(1 for o in state.out if o)
    stats.decode_tokens_per_s = decode_tokens / (t1 - t_prefill) if t1 > t_prefill and decode_tokens else 0.0
    stats.forward_passes = model.forward_passes - passes0
    stats.layer_calls = model.layer_calls - calls0
    extra = getattr(strat, "stats", None)
    if callable(extra):
        stats.extra = extra()
    return state.out, stats
