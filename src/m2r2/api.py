"""The Python API: ``m2r2.load()`` returns an ``LM`` whose ``generate`` feels like Hugging Face's."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .decoding import registry
from .decoding.loop import GenerationStats, Strategy, decode
from .engine import weights as weight_formats
from .engine.loading import ModelSource, load_model, resolve
from .engine.sampling import SamplingConfig
from .engine.threads import available_cpus
from .errors import M2R2Error, OptionError, PromptError, WeightFormatError
from .strategies import accelerator

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class GenerationOutput:
    text: str | None  # None when the model has no tokenizer
    token_ids: list[int]  # new tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    stats: GenerationStats  # shared by every row of a batch call

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


Prompt = str | Sequence[int]


class LM:
    """A loaded model, its tokenizer and where it came from."""

    def __init__(self, model, tokenizer, source: ModelSource, load_seconds: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.load_seconds = load_seconds
        self.artifacts: dict = {}  # what strategies loaded for this model (adapters, heads, routers), by key

    @property
    def config(self):
        return self.model.cfg

    def __repr__(self) -> str:
        c = self.config
        return (f"LM({self.source.name!r}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"vocab {c.vocab_size}, {self.model.embed_tokens.weight.dtype})")

    def load_accelerator(self, path: str | os.PathLike | None = None, rate: int = 2, kind: str = "m2r2"):
        """M2R2 accelerator adapters for this model: from ``path``, or the ones shipped in the package for
        this exact base model, ``rate`` and ``kind`` ("m2r2", or "exit" for the single exit adapter of the
        early-exit peer). Refuses adapters trained for another model. Loaded once per model."""
        return accelerator(self, kind, rate, path)

    def strategy(self, name: str = "plain", **options) -> Strategy:
        """A fresh decoding strategy ``name`` for this model, for ``generate(strategy=...)``. ``options`` are
        that strategy's (checked; an option it does not take is an error naming those it does):
        ``m2r2 strategies`` or ``m2r2.decoding.registry.describe(name)`` lists them. The built-ins
        (``m2r2.strategies``):

        * ``plain``: one full forward per token;
        * ``m2r2``: lossless self-speculative decoding, drafts from the M2R2 fast stream (the shipped
          adapter for ``rate``, 4 by default, or ``adapter``), over its frequent-token draft vocabulary when it has
          one and ``draft_vocab``; ``draft_weights`` runs the drafts from another weight format; ``branch`` > 1
          verifies draft trees (also for ``eagle`` and ``m2r2-eagle``);
        * ``m2r2-eagle``: the same, from the R=2 fast stream that also reads the slow stream's final state of the
          position before;
        * ``early-exit``: the same, drafting with the model's own first ``depth`` layers and no adapters
          (default: as deep as the R=2 fast stream);
        * ``early-exit-adapter``: early-exit drafting through one trained exit adapter (the shipped
          ``kind="exit"`` adapter for ``rate``, or ``adapter``);
        * ``quant-draft``: the same, drafting with the whole model run from reduced-precision copies of its
          weights (``draft_weights``: "int8", the default, or "fp16"; see ``load(weights=...)``);
        * ``prompt-lookup``: the same, drafting by n-gram lookup in the context (up to ``max_ngram``);
        * ``lookahead``: Lookahead decoding, drafting from an n-gram pool filled by Jacobi iterations over a
          ``window`` x (``ngram`` - 1) window of guesses that rides in the verification forward;
        * ``medusa``: Medusa heads on the model's final hidden state (the shipped ones, or ``adapter``);
        * ``draft-model``: 2-model speculative decoding with a small draft model distilled from this one
          (the shipped one, or ``adapter``), run with its own KV cache.

        Every speculative strategy verifies with the full model (``gamma``, ``max_gamma``, ``adaptive``), so
        greedy output equals ``plain``.

        Early exit (lossy; batch 1; ``m2r2.decoding.early_exit``): a token leaves at the first checked depth
        whose read-out confidence reaches ``threshold``; ``kv="recompute"`` recomputes the skipped layers' K/V
        exactly and lazily, ``"propagate"`` derives them from the exit state (CALM):

        * ``calm``: on the model's own layers (no adapters);
        * ``m2r2-exit``: on the M2R2 fast stream (the shipped adapter for ``rate``, or ``adapter``), exits
          decided by ARLA, the router trained for that adapter (``threshold`` on its probability);
        * ``calm-adapter``: confidence exit at one depth through one trained exit adapter (the shipped
          ``kind="exit"`` adapter for ``rate``, or ``adapter``), else the full depth;
        * ``m2r2-exit-conf``: the same stream with the read-out-confidence rule instead of ARLA;
          with ``ride`` (default) the token's slow row advances in the same layer calls as its fast row, so
          a token that does not exit continues from there instead of restarting, and a lazy one resumes;
        * ``skipdecode``: a position-dependent depth decaying from all layers to ``min_layers`` over ``span``
          tokens, top-aligned, so no K/V is ever missing (post hoc: the model is not fine-tuned for it);
        * ``mod``: Mixture-of-Depths routing post hoc (``m2r2.baselines``): per-block routers fitted on the
          frozen model skip a fraction ``skip`` of tokens at each routed block (the shipped routers, or
          ``routers``)."""
        return registry.create(name, self, **options)

    # ---- text <-> ids, at the boundary ----
    def encode(self, prompt: Prompt, chat: bool = True, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise PromptError("a prompt is text or a sequence of integer token ids") from None
            if not ids:
                raise PromptError("the prompt is empty")
            return ids
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        if self.tokenizer is None:
            raise M2R2Error(f"{self.source.name} has no tokenizer: pass token ids instead of text")
        if chat and self.has_chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_messages(msgs)
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation ([{"role", "content"}, ...]) through the model's chat template, ready for the
        assistant's turn."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def decode_text(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- generation ----
    def generate(self, prompt: Prompt | None = None, *, prompts: Sequence[Prompt] | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, strategy: str | Strategy = "plain", chat: bool = True,
                 system: str | None = None, stream: Callable[[int, list[int]], None] | None = None,
                 ) -> GenerationOutput | list[GenerationOutput]:
        """Generate from one prompt (returns one output) or from ``prompts`` (returns a list).

        A prompt is text (the chat template is applied when ``chat`` and the model has one) or a
        sequence of token ids (used as is). ``temperature=0`` is greedy. ``stream(row, new_ids)`` is
        called as tokens are produced.
        """
        if (prompt is None) == (prompts is None):
            raise PromptError("pass exactly one of prompt or prompts=[...]")
        single = prompts is None
        batch = [prompt] if single else list(prompts)
        if not batch:
            raise PromptError("prompts is empty")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if isinstance(strategy, str):
            strategy = self.strategy(strategy)
        ids = [self.encode(p, chat=chat, system=system) for p in batch]
        new, stats = decode(self.model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                            strategy=strategy, on_tokens=stream)
        eos = set(self.config.eos_token_ids)
        outs = [GenerationOutput(text=self.decode_text(n), token_ids=n, prompt_token_ids=p,
                                 finish_reason="eos" if n and n[-1] in eos else "length", stats=stats)
                for n, p in zip(new, ids)]
        return outs[0] if single else outs


def load(model: str | os.PathLike | None = None, *, dtype: str = "float32", weights: str | None = None,
         threads: int | None = None) -> LM:
    """Load a model: the embedded SmolLM2-135M-Instruct by default, or a local Hugging Face directory,
    a GGUF file, or a hub id (where a hub is reachable). ``dtype``: float32 (exact) or bfloat16.
    ``weights``: how the linear layers are stored and run. "gguf": a GGUF file's own blocks, dequantised
    exactly to the float32 weights inside the native kernels (exact, ~1/5 of the bytes: the default for a GGUF
    in float32 where the kernels build); "fp32": float32 weights (exact; the default otherwise); "fp16" / "int8":
    reduced-precision copies with float32 activations on CPU (fewer bytes per token, output close to but not
    always equal to fp32's). ``lm.model.use_weights(kind)`` selects another one inside a block, in that thread
    only."""
    if dtype not in DTYPES:
        raise OptionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = None
    if weights is None:  # the exact format that reads the fewest bytes
        source = resolve(model)
        weights = "fp32"
        if source.gguf is not None and DTYPES[dtype] == torch.float32 and weight_formats.get("gguf").available():
            from .engine.gguf_weights import unsupported
            weights = "fp32" if unsupported(source.gguf) else "gguf"
    fmt = weight_formats.get(weights)  # WeightFormatError for an unknown or unusable format
    if fmt is not weight_formats.FP32 and DTYPES[dtype] != torch.float32:
        raise WeightFormatError(f"weights={weights} needs dtype float32")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise OptionError(f"threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    elif torch.get_num_threads() > available_cpus():  # a container's CPU quota, a narrower affinity mask
        torch.set_num_threads(available_cpus())
    t0 = time.perf_counter()
    source = source or resolve(model)
    gguf = fmt.name == "gguf"
    if gguf and source.gguf is None:
        raise WeightFormatError("weights='gguf' needs a model loaded from a GGUF file (the embedded one is)")
    # the file's own blocks instead of float32 linear weights (each layer's float32 weight is dequantised from
    # its blocks only if something needs it: training, the PyTorch path)
    m, tok = load_model(source, dtype=DTYPES[dtype], threads=threads, linear_weights=not gguf)
    if gguf:
        from .engine.blocks import release_gguf_maps
        from .engine.gguf_weights import attach_gguf_blocks
        attach_gguf_blocks(m, source.gguf)
        release_gguf_maps()  # every block is copied into the model by now
    m.set_weights(weights)
    return LM(m, tok, source, time.perf_counter() - t0)
