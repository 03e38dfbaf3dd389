"""The types every strategy shares with the loop: the per-call ``DecodeState``, the ``Strategy`` base class and
the call's ``GenerationStats``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..engine.cache import KVCache
from ..engine.model import Transformer
from ..engine.sampling import SamplingConfig


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


def commit(out: list[int], toks: list[int], budget: int, eos) -> tuple[list[int], str | None]:
    """Append to a row's output ``out`` the new tokens that fit its ``budget``, up to and including an EOS.
    Returns the tokens kept and why the row is now finished: "stop" (EOS), "length" (budget), or None."""
    toks = toks[: budget - len(out)]
    for j, t in enumerate(toks):
        if t in eos:
            toks = toks[: j + 1]
            break
    out.extend(toks)
    if toks and toks[-1] in eos:
        return toks, "stop"
    return toks, "length" if len(out) >= budget else None


class DecodeState:
    """The per-call state every strategy reads and advances: model, cache, sampling, pending tokens."""

    def __init__(self, model: Transformer, prompts: list[list[int]], max_new_tokens: list[int],
                 sampling: SamplingConfig, cache_slack: int = 0, cache: KVCache | None = None):
        self.model = model
        self.sampling = sampling
        self.generator = sampling.generator()
        self.batch = len(prompts)
        self.prompts = prompts
        self.prompt_lens = torch.tensor([len(p) for p in prompts])
        self.max_new = max_new_tokens
        need = max(len(p) + m for p, m in zip(prompts, max_new_tokens)) + cache_slack
        # a cache of its own, or one given (a server's row of a shared cache: it must have the room)
        self.cache = model.new_cache(self.batch, min(need, model.rope_cos.shape[0])) if cache is None else cache
        self.pending = torch.zeros(self.batch, dtype=torch.long)  # last sampled token, not yet in the cache
        self.out: list[list[int]] = [[] for _ in prompts]
        self.done = [m <= 0 for m in max_new_tokens]
        # the final hidden states (B, T, D) of the last prompt forward and the position of its first column
        self.prefill_states: torch.Tensor | None = None
        self.prefill_start = 0

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
        x = m.hidden(ids, self.cache, positions, prompt=True)
        self.prefill_states, self.prefill_start = x, 0  # the prompt's final hidden states (drafters read them)
        last = x[torch.arange(self.batch), lens - 1].unsqueeze(1)  # (B, 1, D): only these need the head
        self.cache.crop(0)
        self.cache.advance(lens)
        return m.head(last)[:, 0]


class Strategy:
    """Base class of every strategy: how it plugs into the loop. ``step`` must return at least one token for
    every active row, leave the cache holding exactly the committed tokens (all but each row's new last
    token), and set ``state.pending`` to each row's new last token. A strategy object serves one decode call
    at a time (``setup`` resets what it counts); ``lm.generate(strategy="name")`` builds a fresh one per call."""

    name: str = "strategy"
    cache_slack: int = 0  # extra cache slots the strategy writes past the budget (drafts, verification)
    # slots kept free before the context end; None: ``cache_slack`` (0 for strategies that fit their writes to
    # the room left themselves, as speculative decoding shrinks its drafts)
    context_reserve: int | None = None

    def setup(self, state: DecodeState) -> None:
        """Called once per decode call, after prefill."""

    def step(self, state: DecodeState) -> list[list[int]]:
        raise NotImplementedError

    def stats(self) -> dict:
        """Strategy-specific counters for ``GenerationStats.extra``."""
        return {}

    def budget(self, max_new_tokens: int, prompt_len: int, ctx_len: int) -> int:
        """New tokens a row may get: the context window caps the budget. A strategy that writes past a token's
        slot (``cache_slack``) stops that many tokens early unless it fits its writes to the room left itself
        (``context_reserve`` 0, e.g. speculative decoding shrinking its drafts); the prefill's token always fits."""
        reserve = self.cache_slack if self.context_reserve is None else self.context_reserve
        return min(max_new_tokens, max(1, ctx_len - prompt_len - reserve))
