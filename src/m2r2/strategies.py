"""The built-in strategies, registered by name in the one registry (``m2r2.decoding.registry``): each is an
options dataclass (its settings, defaults, checks and help) and a factory that builds the strategy for a
loaded model, finding the artifacts trained for it (M2R2 adapters, ARLA routers, Medusa heads, a draft
model, MoD routers) in the package or at the path given.

Lossless (greedy output identical to ``plain``; ``m2r2.decoding.speculative``): ``m2r2``, ``m2r2-eagle``, ``early-exit``,
``early-exit-adapter``, ``quant-draft``, ``prompt-lookup``, ``lookahead``, ``medusa``, ``eagle``, ``draft-model``.
Lossy, batch 1 (``m2r2.decoding.early_exit``, ``m2r2.baselines``): ``calm``, ``calm-adapter``,
``m2r2-exit``, ``m2r2-exit-conf``, ``skipdecode``, ``mod``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .baselines.layer_skip import MoDSkip, SkipDecode
from .decoding.drafters.lookahead import LookaheadDrafter
from .decoding.drafters.prompt_lookup import PromptLookupDrafter
from .decoding.drafters.stream import StreamDrafter
from .decoding.early_exit import ConfidenceRule, EarlyExit
from .decoding.registry import Host, Options, option, register_strategy
from .decoding.speculative import Speculative
from .engine import weights
from .engine.cache import TreeMask
from .errors import AdapterError, StrategyError

# ---------------------------------------------------------------- artifacts for a model


def accelerator(host: Host, kind: str, rate: int, path=None, sees_slow: bool | None = False):
    """The M2R2 accelerator (``kind`` "m2r2") or exit adapter ("exit") for ``host``'s model: from ``path`` or
    the one shipped for this exact model and ``rate`` (one whose fast stream sees the slow stream when
    ``sees_slow``; None: either, from ``path``); loaded once per model."""
    from .stream.accelerator import Accelerator, find_shipped
    key = ("accelerator", kind, rate, None if path is None else str(path), sees_slow)
    if key not in host.artifacts:
        identity = _identity(host)
        where = path
        if where is None:
            where = find_shipped(identity, rate, kind, bool(sees_slow))
            if where is None:
                what = f"{kind} adapter{' that sees the slow stream' if sees_slow else ''} with rate {rate}"
                flags = f"--kind {kind}{' --sees-slow' if sees_slow else ''}"
                raise AdapterError(f"no {what} ships for {host.source.name}; train one with `m2r2 data` and "
                                   f"`m2r2 train {flags}`, then pass its directory")
        acc = Accelerator.load(where, host.model, identity)
        if acc.cfg.kind != kind:
            raise AdapterError(f"{where} holds a {acc.cfg.kind} adapter, not a {kind} one")
        if sees_slow and not acc.cfg.sees_slow:
            raise AdapterError(f"{where} holds an adapter whose fast stream does not see the slow stream "
                               "(train one with `m2r2 train --sees-slow`)")
        host.artifacts[key] = acc
    return host.artifacts[key]


def _identity(host: Host) -> str:
    if host.source is None:
        raise StrategyError("this strategy needs the model's trained artifacts: load the model with m2r2.load() "
                            "and use lm.generate / lm.strategy")
    return host.source.identity


def _peer(host: Host, kind: str, path, draft_vocab: bool):
    """The Medusa or draft-model drafter from ``path`` or the artifact shipped for this model."""
    from .decoding.drafters.draft_model import DraftModel, DraftModelDrafter
    from .artifacts import read_draft_vocab
    from .decoding.drafters.medusa import MedusaDrafter, MedusaHeads, find_shipped as find_peer
    from .decoding.drafters.eagle import EagleDrafter, EagleHead
    key = ("peer", kind, None if path is None else str(path), draft_vocab if kind == "eagle" else None)
    if key not in host.artifacts:
        identity = _identity(host)
        where = path or find_peer(identity, kind)
        if where is None:
            trainer = "m2r2.training.eagle" if kind == "eagle" else "m2r2.training.peers"
            raise AdapterError(f"no {kind} artifact ships for {host.source.name}; train one with "
                               f"`python -m {trainer}` and pass its directory as adapter=")
        vocab = read_draft_vocab(where, host.model.cfg.vocab_size)
        if kind == "eagle":  # the head's read-out is built over its vocabulary (the full one: draft_vocab=False)
            obj = EagleHead.load(where, host.model, vocab if draft_vocab else None, identity)
        elif kind == "medusa":
            obj = MedusaHeads.load(where, identity)
        else:
            obj = DraftModel.build(where, host.model, identity)
        host.artifacts[key] = (obj, vocab)
    obj, vocab = host.artifacts[key]
    vocab = vocab if draft_vocab else None
    if kind == "eagle":
        return EagleDrafter(obj)
    return MedusaDrafter(obj, vocab) if kind == "medusa" else DraftModelDrafter(obj, vocab)


# ---------------------------------------------------------------- options


@dataclass
class SpeculativeOptions(Options):
    """Options every lossless speculative strategy shares (the verifier's)."""

    gamma: int = option(4, "initial draft length (adapts between 1 and max_gamma)", min=1)
    max_gamma: int | None = option(None, "longest draft (default: max(8, gamma))", min=1)
    adaptive: bool = option(True, "grow / shrink the draft length with acceptance")
    branch: int = option(1, "candidates per draft depth: > 1 verifies a draft tree (the main chain plus the drafter's "
                            "next guesses at each depth as leaves) in one forward; drafters that propose trees only",
                         min=1, max=8)
    leaf_min_prob: float = option(0.0, "with branch > 1 under greedy decoding: verify a leaf only where the drafter "
                                       "gives it at least this probability (EAGLE-2's confidence-driven tree; 0: "
                                       "every leaf)", min=0, max=1)

    def speculative(self, drafter, min_max_gamma: int = 0) -> Speculative:
        top = max(8, self.gamma) if self.max_gamma is None else self.max_gamma
        if self.gamma > top:
            raise StrategyError(f"gamma ({self.gamma}) must be <= max_gamma ({top})")
        if self.branch > 1:
            if not drafter.trees:
                raise StrategyError(f"branch {self.branch}: the {drafter.name} drafter proposes chains only (branch 1)")
            if max(top, min_max_gamma) * self.branch >= TreeMask.MAX_NODES:
                raise StrategyError(f"branch {self.branch} x max_gamma {top} drafts exceed a tree's "
                                    f"{TreeMask.MAX_NODES - 1}")
            drafter.branch, drafter.leaf_min_prob = self.branch, self.leaf_min_prob
        return Speculative(drafter, gamma=self.gamma, max_gamma=max(top, min_max_gamma), adaptive=self.adaptive)


_FORMATS = tuple(weights.FORMATS)


@dataclass
class StreamOptions(SpeculativeOptions):
    rate: int = option(2, "rate R of the shipped adapter (its fast stream has ceil(L/R) blocks)", choices=(2, 3, 4))
    adapter: str | None = option(None, "adapter directory (default: the one shipped for this model and rate)")
    draft_vocab: bool = option(True, "draft over the adapter's frequent-token vocabulary, when it has one")
    stop_below: float = option(0.0, "stop drafting when every row's top draft probability is below this", min=0, max=1)
    draft_weights: str = option("fp32", "the weight format drafts run from", choices=_FORMATS)


@dataclass
class M2R2Options(StreamOptions):
    # the best M2R2 configuration measured (benchmarks/results/spec-m2r2-native.md, 80 MT-Bench prompts x 128, the
    # fast stream in one native call): R=4 0.68x plain decoding, tied with R=2 stopping below 0.4 confidence (0.68x),
    # R=3 0.66x, R=2 0.65x (spec-m2r2-configs.md, before it: R=4 first too); draft trees lose (spec-trees.md), so chains
    rate: int = option(4, "rate R of the shipped adapter (its fast stream has ceil(L/R) blocks)", choices=(2, 3, 4))


@dataclass
class EarlyExitDraftOptions(SpeculativeOptions):
    depth: int | None = option(None, "layers a draft runs (default: as deep as the R=2 fast stream)", min=1)
    stop_below: float = option(0.0, "stop drafting when every row's top draft probability is below this", min=0, max=1)
    draft_weights: str = option("fp32", "the weight format drafts run from", choices=_FORMATS)

    def validate(self, host: Host) -> None:
        L = host.model.cfg.num_layers
        if self.depth is not None and not 1 <= self.depth < L:
            raise StrategyError(f"early-exit depth must be in [1, {L - 1}], got {self.depth}")


@dataclass
class QuantDraftOptions(SpeculativeOptions):
    draft_weights: str = option("int8", "the reduced-precision copies drafts run from",
                                choices=tuple(f for f in _FORMATS if f != "fp32"))


@dataclass
class PromptLookupOptions(SpeculativeOptions):
    max_ngram: int = option(3, "longest n-gram looked up in the context", min=1)


@dataclass
class LookaheadOptions(SpeculativeOptions):
    window: int = option(4, "Jacobi window width W", min=1)
    ngram: int = option(4, "n-gram size N (the window has N-1 levels)", min=2)


@dataclass
class PeerOptions(SpeculativeOptions):
    adapter: str | None = option(None, "artifact directory (default: the one shipped for this model)")
    draft_vocab: bool = option(True, "draft over the artifact's frequent-token vocabulary, when it has one")


@dataclass
class EagleOptions(PeerOptions):
    # one draft per verification to start (it grows while every draft is accepted): at the acceptance a head trained
    # on this CPU reaches (~0.25 per draft), a longer chain's verification rows cost more than they return
    gamma: int = option(1, "initial draft length (adapts between 1 and max_gamma)", min=1)


_KV = ("recompute", "propagate")


@dataclass
class CalmOptions(Options):
    threshold: float = option(0.9, "read-out confidence a token needs to exit", min=0)
    kv: str = option("recompute", "skipped layers' K/V: recompute exactly and lazily, or propagate the exit "
                                  "state (CALM)", choices=_KV)


@dataclass
class AdapterExitOptions(CalmOptions):
    rate: int = option(2, "rate R of the shipped adapter", choices=(2, 3, 4))
    adapter: str | None = option(None, "adapter directory (default: the one shipped for this model and rate)")


@dataclass
class StreamExitOptions(AdapterExitOptions):
    ride: bool = option(True, "the slow row rides in the fast row's layer calls (a token that does not exit "
                              "continues from there)")


@dataclass
class SkipDecodeOptions(Options):
    min_layers: int | None = option(None, "depth the schedule decays to (default: half the layers)", min=1)
    span: int = option(128, "tokens over which the depth decays", min=1)


@dataclass
class MoDOptions(Options):
    routers: str | None = option(None, "MoD routers directory (default: the ones shipped for this model)")
    skip: float = option(0.25, "fraction of tokens each routed block skips", min=0, max=1)


# ---------------------------------------------------------------- factories


def _stream(kind: str):
    def make(host: Host, o: StreamOptions):
        # m2r2: the shipped plain fast stream, or any adapter given; m2r2-eagle: one that sees the slow stream
        sees = True if kind == "m2r2-eagle" else (None if o.adapter else False)
        acc = accelerator(host, "exit" if kind == "early-exit-adapter" else "m2r2", o.rate, o.adapter, sees)
        host.model.build_weights(o.draft_weights)  # now, not inside a timed generate
        return o.speculative(StreamDrafter(acc, vocab=acc.draft_vocab if o.draft_vocab else None,
                                           stop_below=o.stop_below, name=kind, weights=o.draft_weights))
    return make


def _early_exit(host: Host, o: EarlyExitDraftOptions):
    L = host.model.cfg.num_layers
    host.model.build_weights(o.draft_weights)
    return o.speculative(StreamDrafter(None, depth=-(-L // 2) if o.depth is None else o.depth,
                                       stop_below=o.stop_below, weights=o.draft_weights))


def _quant_draft(host: Host, o: QuantDraftOptions):
    host.model.build_weights(o.draft_weights)
    return o.speculative(StreamDrafter(None, depth=host.model.cfg.num_layers, name="quant-draft",
                                       weights=o.draft_weights))


def _lookahead(host: Host, o: LookaheadOptions):
    return o.speculative(LookaheadDrafter(window=o.window, ngram=o.ngram), min_max_gamma=o.ngram - 1)


def _peer_strategy(kind: str):
    return lambda host, o: o.speculative(_peer(host, kind, o.adapter, o.draft_vocab))


def _calm(host: Host, o: CalmOptions):
    return EarlyExit(ConfidenceRule(o.threshold, first=4, every=2), "slow", None, o.kv, name="calm")


def _calm_adapter(host: Host, o: AdapterExitOptions):  # one exit point, at the exit adapter's depth (Kangaroo-style)
    ex = accelerator(host, "exit", o.rate, o.adapter)
    return EarlyExit(ConfidenceRule(o.threshold, first=ex.fast_layers, every=host.model.cfg.num_layers, last=False),
                     "slow", None, o.kv, name="calm-adapter", exit_adapter=ex)


def _m2r2_exit_conf(host: Host, o: StreamExitOptions):
    acc = accelerator(host, "m2r2", o.rate, o.adapter)
    return EarlyExit(ConfidenceRule(o.threshold, first=2, every=1), "fast", acc, o.kv, name="m2r2-exit-conf",
                     ride=o.ride)


def _m2r2_exit(host: Host, o: StreamExitOptions):
    from .decoding.early_exit import ARLARule
    acc = accelerator(host, "m2r2", o.rate, o.adapter)
    if acc.router is None:
        raise AdapterError("this adapter has no ARLA router (router.json); train one with "
                           "`m2r2 train-router`, or use strategy m2r2-exit-conf")
    return EarlyExit(ARLARule(acc.router, o.threshold), "fast", acc, o.kv, name="m2r2-exit", ride=o.ride)


def _skipdecode(host: Host, o: SkipDecodeOptions):
    L = host.model.cfg.num_layers
    return SkipDecode(min_layers=L // 2 if o.min_layers is None else o.min_layers, span=o.span)


def _mod(host: Host, o: MoDOptions):
    from .baselines.mod import MoDRouters, find_shipped as find_mod
    path = o.routers or (find_mod(_identity(host)) if host.source is not None else None)
    if path is None:
        raise AdapterError(f"no MoD routers ship for {host.source.name if host.source else 'this model'}; fit them "
                           "with `m2r2 train-mod` and pass the directory as routers=")
    return MoDSkip(MoDRouters.load(path, _identity(host), host.model.cfg.num_layers), o.skip)


register_strategy("m2r2", _stream("m2r2"), M2R2Options, lossless=True,
                  help="self-speculative decoding: drafts from the M2R2 fast stream (shipped adapter for rate, R=4 by "
                       "default, the fastest measured; or adapter), over its frequent-token draft vocabulary")
register_strategy("m2r2-eagle", _stream("m2r2-eagle"), StreamOptions, lossless=True,
                  help="self-speculative decoding from an M2R2 fast stream that also reads the slow stream's final "
                       "state of the position before (the feature EAGLE drafts from)")
register_strategy("early-exit", _early_exit, EarlyExitDraftOptions, lossless=True,
                  help="self-speculative decoding drafting with the model's own first depth layers (no adapters)")
register_strategy("early-exit-adapter", _stream("early-exit-adapter"), StreamOptions, lossless=True,
                  help="early-exit drafting through one trained exit adapter (the shipped kind=exit one, or adapter)")
register_strategy("quant-draft", _quant_draft, QuantDraftOptions, lossless=True,
                  help="drafts with the whole model run from reduced-precision copies of its weights")
register_strategy("prompt-lookup", lambda host, o: o.speculative(PromptLookupDrafter(max_ngram=o.max_ngram)),
                  PromptLookupOptions, lossless=True, help="drafts by n-gram lookup in the context")
register_strategy("lookahead", _lookahead, LookaheadOptions, lossless=True,
                  help="Lookahead decoding: an n-gram pool filled by Jacobi iterations riding in the verification")
register_strategy("medusa", _peer_strategy("medusa"), PeerOptions, lossless=True,
                  help="Medusa heads on the model's final hidden state (the shipped ones, or adapter)")
register_strategy("eagle", _peer_strategy("eagle"), EagleOptions, lossless=True,
                  help="an EAGLE-style draft head: one decoder layer on the model's own final hidden states (the "
                       "shipped one, or adapter)")
register_strategy("draft-model", _peer_strategy("draft-model"), PeerOptions, lossless=True,
                  help="2-model speculative decoding with a small draft model distilled from this one")
register_strategy("calm", _calm, CalmOptions,
                  help="lossy early exit on the model's own layers by read-out confidence (CALM; batch 1)")
register_strategy("m2r2-exit", _m2r2_exit, StreamExitOptions,
                  help="lossy early exit on the M2R2 fast stream, decided by its ARLA router (batch 1)")
register_strategy("m2r2-exit-conf", _m2r2_exit_conf, StreamExitOptions,
                  help="lossy early exit on the M2R2 fast stream by read-out confidence (batch 1)")
register_strategy("calm-adapter", _calm_adapter, AdapterExitOptions,
                  help="lossy confidence exit at one depth through a trained exit adapter, else full depth (batch 1)")
register_strategy("skipdecode", _skipdecode, SkipDecodeOptions,
                  help="lossy position-dependent depth decaying to min_layers over span tokens (post hoc; batch 1)")
register_strategy("mod", _mod, MoDOptions,
                  help="lossy Mixture-of-Depths routing post hoc: fitted routers skip a fraction of tokens (batch 1)")
