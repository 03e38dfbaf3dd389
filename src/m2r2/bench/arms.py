"""What a benchmark measures with: prompts, arms (one way of generating, m2r2's or an external engine's,
behind one small protocol), their results, and the checks a prompt set passes before any arm is built.

Every arm counts the same thing: new tokens generated for the prompt (the first one included, an EOS
included when produced) over the wall time of the whole call (prefill + decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class BenchPrompt:
    """One measured prompt. Arms consume ``token_ids`` (already chat-templated), so all see identical input."""
    id: str
    category: str
    token_ids: tuple[int, ...]
    text: str | None = None


@dataclass
class ArmResult:
    new_tokens: int  # generated tokens, first included, EOS included when produced
    seconds: float  # wall time of the call: prefill + decode
    token_ids: list[int] | None = None  # the new tokens, where the arm can report them
    forward_passes: int | None = None  # full-model forward calls (prefill included), where known
    extra: dict = field(default_factory=dict)  # arm-specific numbers (decode-only timing, ...)


class ArmUnavailable(Exception):
    """Raised by ``Arm.setup`` when the arm cannot run here (missing package, no GGUF, ...): it is skipped."""


@runtime_checkable
class Arm(Protocol):
    name: str
    kind: Literal["m2r2", "external"]

    def setup(self) -> None: ...

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ArmSpec:
    """A picklable description of an arm: ``factory(**kwargs)`` builds it, inside the arm's worker process
    (so a heavy engine is only ever loaded there)."""
    name: str
    kind: Literal["m2r2", "external"]
    factory: Callable[..., Arm]
    kwargs: dict = field(default_factory=dict)
    group: str | None = None  # arms of one group share a worker process (default: a worker of its own)

    def build(self) -> Arm:
        return self.factory(**self.kwargs)


_lms: dict = {}


def worker_lm(model: str | None):
    """``m2r2.load(model)`` in float32, loaded once per process: an arm factory's model (a worker holds one
    arm; in-process runs share one model among arms, as before)."""
    key = str(model) if model is not None else None
    if key not in _lms:
        import m2r2
        _lms[key] = m2r2.load(model, dtype="float32")
    return _lms[key]


def validate_prompts(prompts: Sequence[BenchPrompt], cfg, source: str) -> None:
    """Raise ``PromptFileError`` (one line, naming the prompt) unless every prompt has token ids in the
    model's vocabulary and leaves room in its context window for a new token: checked before any arm is
    built, so a bad input file costs no setup."""
    from ..errors import PromptFileError

    if not prompts:
        raise PromptFileError(f"{source}: no prompts")
    ctx = cfg.max_position_embeddings
    for p in prompts:
        bad = [t for t in p.token_ids if type(t) is not int or not 0 <= t < cfg.vocab_size]
        if bad:
            raise PromptFileError(f"{source}: prompt {p.id} has token id {bad[0]!r} outside the model's vocabulary "
                                  f"[0, {cfg.vocab_size})")
        if not p.token_ids:
            raise PromptFileError(f"{source}: prompt {p.id} is empty")
        if len(p.token_ids) >= ctx:
            raise PromptFileError(f"{source}: prompt {p.id} has {len(p.token_ids)} tokens; the model's context "
                                  f"window is {ctx} (at most {ctx - 1} prompt tokens)")
