"""The Python API: ``m2r2.load()`` returns an ``LM`` whose ``generate`` feels like Hugging Face's."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import M2R2Error, SamplingError
from .decoding.loop import GenerationStats, Strategy, decode
from .engine.loading import ModelSource, load_model, resolve
from .engine.model import WEIGHT_KINDS, lowp_available
from .engine.sampling import SamplingConfig
from .engine.threads import available_cpus

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
        self._accelerators: dict = {}  # rate -> Accelerator, loaded on first use of strategy="m2r2"

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
        early-exit peer). Refuses adapters trained for another model."""
        from .stream.accelerator import Accelerator, find_shipped
        from .errors import AdapterError
        if path is None:
            path = find_shipped(self.source.identity, rate, kind)
            if path is None:
                raise AdapterError(f"no {kind} adapter with rate {rate} ships for {self.source.name}; train one "
                                   f"with `m2r2 data` and `m2r2 train --kind {kind}`, then pass its directory")
        acc = Accelerator.load(path, self.model, self.source.identity)
        if acc.cfg.kind != kind:
            raise AdapterError(f"{path} holds a {acc.cfg.kind} adapter, not a {kind} one")
        return acc

    STRATEGIES = ("plain", "m2r2", "early-exit", "early-exit-adapter", "quant-draft", "prompt-lookup", "lookahead",
                  "medusa", "draft-model", "calm", "m2r2-exit", "m2r2-exit-conf", "calm-adapter", "skipdecode", "mod")

    def strategy(self, name: str = "plain", *, rate: int = 2, adapter: str | os.PathLike | None = None,
                 gamma: int = 4, max_gamma: int = 8, adaptive: bool = True, draft_vocab: bool = True,
                 depth: int | None = None, stop_below: float = 0.0, max_ngram: int = 3,
                 threshold: float = 0.9, kv: str = "recompute", min_layers: int | None = None,
                 span: int = 128, skip: float = 0.25, routers: str | os.PathLike | None = None,
                 ride: bool = True, window: int = 4, ngram: int = 4, draft_weights: str | None = None) -> Strategy:
        """A decoding strategy by name, for ``generate(strategy=...)``:

        * ``plain``: one full forward per token;
        * ``m2r2``: lossless self-speculative decoding, drafts from the M2R2 fast stream (the shipped
          adapter for ``rate``, or ``adapter``), over its frequent-token draft vocabulary when it has one
          and ``draft_vocab``;
        * ``early-exit``: the same, drafting with the model's own first ``depth`` layers and no adapters
          (default: as deep as the R=2 fast stream);
        * ``early-exit-adapter``: early-exit drafting through one trained exit adapter (the shipped
          ``kind="exit"`` adapter for ``rate``, or ``adapter``);
        * ``quant-draft``: the same, drafting with the whole model run from reduced-precision copies of its
          weights (``draft_weights``: "int8", the default, or "fp16"; see ``load(weights=...)``);
          ``draft_weights`` also runs the ``m2r2`` / ``early-exit*`` drafts from such copies;
        * ``prompt-lookup``: the same, drafting by n-gram lookup in the context (up to ``max_ngram``);
        * ``lookahead``: Lookahead decoding, drafting from an n-gram pool filled by Jacobi iterations over a
          ``window`` x (``ngram`` - 1) window of guesses that rides in the verification forward;
        * ``medusa``: Medusa heads on the model's final hidden state (the shipped ones, or ``adapter``);
        * ``draft-model``: 2-model speculative decoding with a small draft model distilled from this one
          (the shipped one, or ``adapter``), run with its own KV cache.

        Every speculative strategy verifies with the full model, so greedy output equals ``plain``.

        Early exit (lossy; batch 1; ``m2r2.decoding.early_exit``): a token leaves at the first checked depth whose
        read-out confidence reaches ``threshold``; ``kv="recompute"`` recomputes the skipped layers' K/V
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
        * ``mod``: Mixture-of-Depths routing post hoc (``m2r2.baselines.mod``): per-block routers fitted on the frozen
          model skip a fraction ``skip`` of tokens at each routed block (the shipped routers, or ``routers``)."""
        from .decoding.speculative import PromptLookupDrafter, Speculative, StreamDrafter
        if draft_weights is None:  # the model's layers as they run, except for quant-draft (int8 copies)
            draft_weights = "int8" if name == "quant-draft" else "fp32"
        if name == "plain":
            from .decoding.loop import PlainStrategy
            return PlainStrategy()
        if name == "skipdecode":
            from .decoding.early_exit import SkipDecode
            L = self.config.num_layers
            return SkipDecode(min_layers=L // 2 if min_layers is None else min_layers, span=span)
        if name == "mod":
            from .decoding.early_exit import MoDSkip
            from .baselines.mod import MoDRouters, find_shipped as find_mod
            path = routers or find_mod(self.source.identity)
            if path is None:
                from .errors import AdapterError
                raise AdapterError(f"no MoD routers ship for {self.source.name}; fit them with `m2r2 train-mod` "
                                   "and pass the directory as routers=")
            return MoDSkip(MoDRouters.load(path, self.source.identity, self.config.num_layers), skip)
        if name in ("calm", "m2r2-exit", "m2r2-exit-conf", "calm-adapter"):
            from .decoding.early_exit import ConfidenceRule, EarlyExit
            if not threshold >= 0:
                raise SamplingError(f"threshold must be >= 0, got {threshold}")
            if name == "calm":
                return EarlyExit(ConfidenceRule(threshold, first=4, every=2), "slow", None, kv, name=name)
            if name == "calm-adapter":  # one exit point, at the exit adapter's depth (Kangaroo-style)
                ex = self._accelerator_for("exit", rate, adapter)
                return EarlyExit(ConfidenceRule(threshold, first=ex.fast_layers, every=self.config.num_layers,
                                                last=False),
                                 "slow", None, kv, name=name, exit_adapter=ex)
            acc = self._accelerator_for("m2r2", rate, adapter)
            if name == "m2r2-exit-conf":
                return EarlyExit(ConfidenceRule(threshold, first=2, every=1), "fast", acc, kv, name=name, ride=ride)
            if acc.router is None:
                from .errors import AdapterError
                raise AdapterError("this adapter has no ARLA router (router.json); train one with "
                                   "`m2r2 train-router`, or use strategy m2r2-exit-conf")
            from .stream.router import ARLARule
            return EarlyExit(ARLARule(acc.router, threshold), "fast", acc, kv, name=name, ride=ride)
        if draft_weights not in WEIGHT_KINDS:
            raise SamplingError(f"draft weights must be one of {list(WEIGHT_KINDS)}, got {draft_weights!r}")
        self.model.build_weights(draft_weights)  # now, not inside a timed generate
        if name in ("m2r2", "early-exit-adapter"):
            acc = self._accelerator_for("m2r2" if name == "m2r2" else "exit", rate, adapter)
            drafter = StreamDrafter(acc, vocab=acc.draft_vocab if draft_vocab else None, stop_below=stop_below,
                                    name=name, weights=draft_weights)
        elif name == "early-exit":
            L = self.config.num_layers
            depth = -(-L // 2) if depth is None else depth
            if not 1 <= depth < L:
                raise SamplingError(f"early-exit depth must be in [1, {L - 1}], got {depth}")
            drafter = StreamDrafter(None, depth=depth, stop_below=stop_below, weights=draft_weights)
        elif name == "quant-draft":
            if draft_weights not in ("fp16", "int8"):
                raise SamplingError(f"quant-draft: draft weights must be fp16 or int8, got {draft_weights!r}")
            drafter = StreamDrafter(None, depth=self.config.num_layers, name=name, weights=draft_weights)
        elif name == "prompt-lookup":
            try:
                drafter = PromptLookupDrafter(max_ngram=max_ngram)
            except ValueError as e:
                raise SamplingError(str(e)) from None
        elif name == "lookahead":
            from .decoding.drafters.lookahead import LookaheadDrafter
            try:
                drafter = LookaheadDrafter(window=window, ngram=ngram)
            except ValueError as e:
                raise SamplingError(str(e)) from None
            max_gamma = max(max_gamma, ngram - 1)
        elif name in ("medusa", "draft-model"):
            drafter = self._peer_drafter(name, adapter, draft_vocab)
        else:
            raise SamplingError(f"unknown strategy {name!r} (available: {', '.join(self.STRATEGIES)})")
        try:
            return Speculative(drafter, gamma=gamma, max_gamma=max_gamma, adaptive=adaptive)
        except ValueError as e:
            raise SamplingError(str(e)) from None

    def _peer_drafter(self, kind: str, path, draft_vocab: bool):
        """The Medusa or draft-model drafter from ``path`` or the artifact shipped for this model."""
        from .decoding.drafters.draft_model import DraftModel, DraftModelDrafter
        from .errors import AdapterError
        from .decoding.drafters.medusa import MedusaDrafter, MedusaHeads, find_shipped as find_peer, read_draft_vocab
        key = (kind, None if path is None else str(path))
        if key not in self._accelerators:
            where = path or find_peer(self.source.identity, kind)
            if where is None:
                raise AdapterError(f"no {kind} artifact ships for {self.source.name}; train one with "
                                   "`python -m m2r2.training.peers` and pass its directory as adapter=")
            obj = (MedusaHeads.load(where, self.source.identity) if kind == "medusa"
                   else DraftModel.build(where, self.model, self.source.identity))
            self._accelerators[key] = (obj, read_draft_vocab(where, self.config.vocab_size))
        obj, vocab = self._accelerators[key]
        vocab = vocab if draft_vocab else None
        return MedusaDrafter(obj, vocab) if kind == "medusa" else DraftModelDrafter(obj, vocab)

    def _accelerator_for(self, kind: str, rate: int, adapter):
        key = (kind, rate, None if adapter is None else str(adapter))
        if key not in self._accelerators:
            self._accelerators[key] = self.load_accelerator(adapter, rate, kind)
        return self._accelerators[key]

    # ---- text <-> ids, at the boundary ----
    def encode(self, prompt: Prompt, chat: bool = True, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise SamplingError("a prompt is text or a sequence of integer token ids") from None
            if not ids:
                raise SamplingError("the prompt is empty")
            return ids
        if not prompt.strip():
            raise SamplingError("the prompt is empty")
        if self.tokenizer is None:
            raise M2R2Error(f"{self.source.name} has no tokenizer: pass token ids instead of text")
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in tok(prompt)["input_ids"]]

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
            raise SamplingError("pass exactly one of prompt or prompts=[...]")
        single = prompts is None
        batch = [prompt] if single else list(prompts)
        if not batch:
            raise SamplingError("prompts is empty")
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


def load(model: str | os.PathLike | None = None, *, dtype: str = "float32", weights: str = "fp32",
         threads: int | None = None) -> LM:
    """Load a model: the embedded SmolLM2-135M-Instruct by default, or a local Hugging Face directory,
    a GGUF file, or a hub id (where a hub is reachable). ``dtype``: float32 (exact) or bfloat16.
    ``weights``: "fp32" (exact), or "fp16" / "int8" to run the linear layers from reduced-precision copies
    with float32 activations on CPU (fewer bytes per token, output close to but not always equal to
    fp32's; ``lm.model.use_weights(kind)`` switches temporarily)."""
    if dtype not in DTYPES:
        raise SamplingError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if weights not in WEIGHT_KINDS:
        raise SamplingError(f"weights must be one of {list(WEIGHT_KINDS)}, got {weights!r}")
    if weights != "fp32" and (DTYPES[dtype] != torch.float32 or not lowp_available()):
        raise SamplingError(f"weights={weights} needs dtype float32 and PyTorch's FBGEMM kernels (x86 CPU builds)")
    if threads is not None:
        if threads < 1:
            raise SamplingError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif torch.get_num_threads() > available_cpus():  # a container's CPU quota, a narrower affinity mask
        torch.set_num_threads(available_cpus())
    t0 = time.perf_counter()
    source = resolve(model)
    m, tok = load_model(source, dtype=DTYPES[dtype], threads=threads)
    m.set_weights(weights)
    return LM(m, tok, source, time.perf_counter() - t0)
