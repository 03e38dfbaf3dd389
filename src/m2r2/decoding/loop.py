"""One decode loop with pluggable strategies.

The loop owns what every method shares: prefill of a ragged batch, the cache and per-row lengths, the
pending token of each row, stopping (EOS, token budget, context end), streaming and statistics. A
strategy owns only how the next tokens of each row are produced: plain decoding feeds the pending token
through the full model; speculative strategies draft, verify and crop; early-exit strategies leave the
model early. Every strategy works on token ids; tokenizers stay outside the engine.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import ContextLengthError, PromptError, SamplingError
from ..engine.model import Transformer
from ..engine.sampling import SamplingConfig
from . import registry
from .plain import PlainStrategy  # noqa: F401  (re-exported)
from .state import DecodeState, GenerationStats, Strategy, commit  # noqa: F401  (re-exported: strategies import them here)
from ..engine.threads import ThreadGovernor, decoding


TokenCallback = Callable[[int, list[int]], None]


@torch.inference_mode()
def decode(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int = 128,
           sampling: SamplingConfig = SamplingConfig(), strategy: str | Strategy = "plain",
           eos_token_ids: tuple[int, ...] | None = None, on_tokens: TokenCallback | None = None,
           ) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids, ragged). Returns the new
    tokens of each row (EOS included when produced) and the call's statistics."""
    if not prompts:
        raise PromptError("no prompts given")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ctx_len = model.rope_cos.shape[0]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PromptError(f"prompt {i} is empty")
        if len(p) >= ctx_len:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens; the model's context window is {ctx_len} "
                f"(at most {ctx_len - 1} prompt tokens leave room for one new token)")
        if max(p) >= model.cfg.vocab_size or min(p) < 0:
            raise PromptError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size})")
    if isinstance(strategy, str):  # a name: built from the registry (m2r2.decoding.registry)
        strat = registry.create(strategy, model)
    else:
        strat = strategy
    eos = set(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    budgets = [strat.budget(max_new_tokens, len(p), ctx_len) for p in prompts]
    t0 = time.perf_counter()
    state = DecodeState(model, prompts, budgets, sampling, cache_slack=strat.cache_slack)
    stats = GenerationStats(strategy=strat.name)
    if all(state.done):
        return state.out, stats

    def emit(new: list[list[int]]) -> None:
        for b, toks in enumerate(new):
            if state.done[b] or not toks:
                continue
            kept, finished = commit(state.out[b], toks, state.max_new[b], eos)
            if on_tokens is not None and kept:
                on_tokens(b, kept)
            if finished:
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
        with decoding():  # (another decode in this process: the governors leave the thread count alone)
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
    stats.forward_passes = state.cache.counters.forward_passes
    stats.layer_calls = state.cache.counters.layer_calls
    stats.extra = strat.stats()
    return state.out, stats
