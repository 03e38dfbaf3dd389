"""M2R2's accelerated residual stream: accelerator adapters on a frozen decoder.

Design (a reconstruction from the paper's abstract; see docs/METHOD.md):

* The slow stream is the unchanged model, ``s_i = B_i(s_{i-1})``.
* The fast stream with rate R runs the first ``F = ceil(L / R)`` blocks with an adapter beside each:
  ``f_i = B_i(f_{i-1}) + A_i(f_{i-1})``, ``A_i(x) = U_i act(D_i rmsnorm(x))``. ``U_i`` starts at zero,
  so an untrained fast stream *is* the slow stream. Fast layer l is trained so that ``N(f_l)`` matches
  ``N(s_min(L, R*l))``: it reaches the model's answer in about L/R layers.
* Shared KV cache: at block i the fast query at position t attends to the slow stream's K/V for
  positions < t and to its own K/V at t. At inference this is simply the one persistent cache: the
  fast token writes its K/V into slot t (temporarily; verification overwrites it) and attends to
  slots <= t. In training all positions run in parallel with keys ``[slow K (T) | fast K (T)]`` and a
  mask that is strictly causal over the slow half and diagonal over the fast half.
* Seeing the slow stream (``sees_slow``, the ``m2r2-eagle`` variant): the fast stream's input at position t also
  reads the slow stream's final state at t-1, the feature an EAGLE head drafts from:
  ``f_0 = E(x_t) + S(s_L[t-1])`` with ``S(x) = U act(D rmsnorm(x))`` (U zero-initialised: an untrained seer
  adds nothing). Training feeds it the slow stream's own states; when drafting, the first draft reads the last
  verified position's state and later drafts, whose positions have no slow state yet, the fast stream's own final
  state at the previous draft (trained to point the same way: the alignment loss on the final norm).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..artifacts import DRAFT_VOCAB, atomic_write, find_shipped as find_artifact, load_artifact, read_draft_vocab, save_artifact
from ..artifacts import shapes_of, shipped_roots
from ..engine.model import RMSNorm, StepContext, Transformer

ADAPTER_FORMAT = 1


@dataclass
class AcceleratorConfig:
    rate: int = 2
    rank: int = 64
    base_identity: str = ""
    base_num_layers: int = 0
    hidden_size: int = 0
    activation: str = "silu"
    output_scale: str = "rms"  # "rms": the adapter's output is scaled by its input's RMS; "none": not
    kind: str = "m2r2"  # "m2r2": an adapter beside each of the F fast blocks; "exit": the plain slow stream
    #                     through F blocks plus one exit adapter before the read-out (Kangaroo/DEED-style)
    sees_slow: bool = False  # the fast stream's input also reads the slow final state of the previous position
    format: int = ADAPTER_FORMAT
    training: dict = field(default_factory=dict)  # what produced it: command, data, steps, wall time

    def __post_init__(self) -> None:
        if self.rate not in (1, 2, 3, 4, 5, 6, 8):
            raise AdapterError(f"rate must be one of 1-6 or 8, got {self.rate}")
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank}")
        if self.kind not in ("m2r2", "exit"):
            raise AdapterError(f"kind must be 'm2r2' or 'exit', got {self.kind!r}")
        if self.output_scale not in ("rms", "none"):
            raise AdapterError(f"output_scale must be 'rms' or 'none', got {self.output_scale!r}")
        if self.sees_slow and self.kind != "m2r2":
            raise AdapterError("only an m2r2 fast stream can see the slow stream (sees_slow), not an exit adapter")

    @property
    def fast_layers(self) -> int:
        """F = ceil(L / R): the fast stream's depth."""
        return math.ceil(self.base_num_layers / self.rate)

    def target_depth(self, l: int) -> int:
        """Slow depth (number of blocks) that fast layer l (1-based) is trained to match."""
        return min(self.base_num_layers, self.rate * l)


class Adapter(nn.Module):
    """Low-rank accelerator: U act(D rmsnorm(x)), times rms(x) when ``rms_scaled``. U is zero-initialised,
    so an untrained adapter adds nothing (the fast stream starts as the slow stream).

    Why the RMS factor: the residual stream's RMS grows ~5x between layer 15 and layer 30 of the embedded
    model (6 -> 31, carried by a few massive dimensions that change between depths), and the fast stream has
    to reach the deep direction in half the layers. Scaling the output by the input's own RMS lets the
    adapter work in units relative to the stream, so its weights need the same size at every depth."""

    def __init__(self, hidden: int, rank: int, eps: float = 1e-5, rms_scaled: bool = True):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.rms_scaled = rms_scaled
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(F.silu(self.down(self.norm(x))))
        if self.rms_scaled:
            out = out * x.pow(2).mean(-1, keepdim=True).add(self.norm.eps).sqrt()
        return out


class Accelerator(nn.Module):
    """The adapters of one fast stream (rate R) for one base model."""

    def __init__(self, cfg: AcceleratorConfig):
        super().__init__()
        self.cfg = cfg
        self.draft_vocab: torch.Tensor | None = None  # frequent token ids for drafting (draft_vocab.json)
        # ARLA exit router (router.json), if trained; kept out of the module tree so that the adapter's
        # own weights file never includes it
        object.__setattr__(self, "router", None)
        n = cfg.fast_layers if cfg.kind == "m2r2" else 1
        self.adapters = nn.ModuleList(Adapter(cfg.hidden_size, cfg.rank, rms_scaled=cfg.output_scale == "rms")
                                      for _ in range(n))
        # the slow stream's previous final state -> the fast stream's input (``sees_slow``); unscaled: the input it
        # adds to is an embedding, whose size does not track the deep state's
        self.seer = Adapter(cfg.hidden_size, cfg.rank, rms_scaled=False) if cfg.sees_slow else None

    @classmethod
    def for_model(cls, model: Transformer, identity: str, rate: int = 2, rank: int = 64,
                  output_scale: str = "rms", kind: str = "m2r2", sees_slow: bool = False) -> "Accelerator":
        c = model.cfg
        return cls(AcceleratorConfig(rate=rate, rank=rank, base_identity=identity, base_num_layers=c.num_layers,
                                     hidden_size=c.hidden_size, output_scale=output_scale, kind=kind,
                                     sees_slow=sees_slow))

    @property
    def is_exit(self) -> bool:
        return self.cfg.kind == "exit"

    @property
    def fast_layers(self) -> int:
        return self.cfg.fast_layers

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ---- inference: the fast stream on the shared cache ----
    def fast_layer(self, model: Transformer, i: int, f: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """f_{i+1} = B_i(f_i) + A_i(f_i), with B_i reading/writing the shared cache through ``ctx``."""
        return model.layer(i, f, ctx) + self.adapters[i](f)

    def embed(self, model: Transformer, ids: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The fast stream's input f_0 for ids (B, T): the embedding, plus what the seer makes of ``prev`` (B, T, D),
        the slow stream's final states at the positions before (``sees_slow``; None: none known, nothing added)."""
        f = model.embed(ids)
        if self.seer is not None and prev is not None:
            f = f + self.seer(prev.to(f.dtype))
        return f

    def fast_forward(self, model: Transformer, ids: torch.Tensor, ctx: StepContext, depth: int | None = None,
                     return_states: bool = False, prev: torch.Tensor | None = None):
        """Run the fast stream for ids (B, T) through ``depth`` fast layers (default all). Writes the
        fast K/V into the cache slots of ``ctx`` (temporary: the caller crops or overwrites them). ``prev``: the
        final states before each position, for a fast stream that sees the slow one (``embed``)."""
        depth = self.fast_layers if depth is None else depth
        f = self.embed(model, ids, prev)
        if not return_states and not self.is_exit and depth > 0:
            native_f = self._native_forward(model, f, ctx, depth)
            if native_f is not None:
                return native_f
        states = [f]
        for i in range(depth):
            if self.is_exit:  # the slow stream, then the exit adapter at the read-out depth
                f = model.layer(i, f, ctx)
                if i == self.fast_layers - 1:
                    f = f + self.adapters[0](f)
            else:
                f = self.fast_layer(model, i, f, ctx)
            if return_states:
                states.append(f)
        return states if return_states else f

    def _native_forward(self, model: Transformer, f: torch.Tensor, ctx: StepContext, depth: int):
        """``depth`` fast layers in one native call (``m2r2.engine.native.fast_blocks``) where the blocks would each
        run their native kernel in one format under the causal rule and the adapters are plain float32 modules
        nothing differentiates; else None (the caller runs them one by one)."""
        from ..engine import native
        fmt = model._native_stack(f, ctx, depth)
        if fmt is None or ctx.native_rows[2] is not None or f.dtype != torch.float32:
            return None
        ads = self.adapters[:depth]
        if torch.is_grad_enabled() and (f.requires_grad or any(p.requires_grad for p in ads.parameters())):
            return None
        if any(type(a.down) is not nn.Linear or type(a.up) is not nn.Linear or type(a.norm) is not RMSNorm
               or a.down.bias is not None or a.up.bias is not None or a._forward_hooks or a._forward_pre_hooks
               for a in ads):
            return None
        # the adapters' weights as the kernel reads them, (in, out) row-major: derived once, rebuilt if they change
        # (an inference tensor, e.g. loaded under torch.inference_mode, keeps no version counter: its storage decides)
        def stamp(t: torch.Tensor) -> tuple:
            return t.data_ptr(), 0 if t.is_inference() else t._version
        key = tuple((stamp(a.down.weight), stamp(a.up.weight), stamp(a.norm.weight)) for a in ads)
        cached = self.__dict__.get("_native_adapters")
        if cached is None or cached[0] != key:
            mats = [(a.norm.weight.detach().float().contiguous(), a.down.weight.detach().float().t().contiguous(),
                     a.up.weight.detach().float().t().contiguous()) for a in ads]
            cached = self.__dict__["_native_adapters"] = (key, mats)
        out = native.fast_blocks(model, cached[1], ads[0].norm.eps, ads[0].rms_scaled, f, ctx.cache, ctx.cos,
                                 ctx.sin, ctx.native_rows, fmt)
        ctx.cache.counters.layer_calls += f.shape[0] * f.shape[1] * depth
        return out

    # ---- training: all positions in parallel ----
    def parallel_fast_states(self, model: Transformer, ids: torch.Tensor, slow_k: list[torch.Tensor],
                             slow_v: list[torch.Tensor], depth: int | None = None,
                             slow_states: list[torch.Tensor] | None = None,
                             prev: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Fast states f_0..f_depth (each (B, T, D)) for every position at once.

        slow_k[i], slow_v[i]: the slow stream's rotated K/V at block i, (B, KV, T, hd). Query t sees
        slow keys j < t and its own fast key at t, exactly what step-by-step inference sees. ``prev``: the slow
        stream's final states before each position (B, T, D), for a fast stream that sees them (``embed``).
        For an exit adapter the states are the slow stream's (``slow_states`` if given) and the exit
        adapter applied at depth F."""
        depth = self.fast_layers if depth is None else depth
        if self.is_exit:
            if slow_states is None:
                slow_states, _ = slow_trace(model, ids, depth)
            states = list(slow_states[: depth + 1])
            if depth >= self.fast_layers:
                F_ = self.fast_layers
                states[F_] = states[F_] + self.adapters[0](states[F_])
            return states
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        cos, sin = model.rope(pos.expand(B, T))
        strict = pos.view(1, -1) < pos.view(-1, 1)  # (T, T): slow key j visible to query t iff j < t
        diag = torch.eye(T, dtype=torch.bool, device=ids.device)
        mask = torch.cat([strict, diag], dim=1).view(1, 1, T, 2 * T)
        f = self.embed(model, ids, prev)
        states = [f]
        for i in range(depth):
            blk = model.layers[i]
            q, k, v = blk.qkv_proj(blk.input_norm(f), cos, sin)
            keys = torch.cat([slow_k[i], k], dim=2)
            vals = torch.cat([slow_v[i], v], dim=2)
            x = f + blk.attend(q, keys, vals, mask)
            x = x + blk.mlp(x)
            f = x + self.adapters[i](f)
            states.append(f)
        return states

    # ---- files ----
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``adapter.safetensors`` and ``adapter.json`` into directory ``path`` (atomically);
        ``dtype`` (e.g. float16, for shipping) converts the stored weights; loading casts them back to
        the model's dtype."""
        return save_artifact(path, "adapter", self.state_dict(), asdict(self.cfg), dtype=dtype,
                             metadata={"m2r2": "accelerator", "base_identity": self.cfg.base_identity})

    @classmethod
    def load(cls, path: str | os.PathLike, model: Transformer | None = None, identity: str | None = None) -> "Accelerator":
        """Load adapters from a directory; refuse them if they were trained for another base model."""
        d = Path(path)

        def validate(cfg: AcceleratorConfig) -> None:
            if cfg.format != ADAPTER_FORMAT:
                raise AdapterError(f"{d}: adapter format {cfg.format} is not supported (expected {ADAPTER_FORMAT})")
            if model is not None and (cfg.base_num_layers, cfg.hidden_size) != (model.cfg.num_layers, model.cfg.hidden_size):
                raise AdapterError(f"the adapter in {d} is for a {cfg.base_num_layers}-layer, {cfg.hidden_size}-wide "
                                   f"model, not this {model.cfg.num_layers}-layer, {model.cfg.hidden_size}-wide one")

        # the rate and rank in adapter.json fix every name and shape
        cfg, sd = load_artifact(d, "adapter", "adapter", parse=lambda raw: AcceleratorConfig(**raw), identity=identity,
                                validate=validate, expected=lambda cfg: shapes_of(cls(cfg)))
        acc = cls(cfg)
        acc.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        acc.draft_vocab = read_draft_vocab(d, model.cfg.vocab_size if model is not None else None)
        if (d / "router.json").is_file():  # ARLA, trained for these adapters (m2r2 train-router)
            from .router import ARLARouter
            object.__setattr__(acc, "router", ARLARouter.load(d))
            rc = acc.router.cfg
            if (rc.fast_layers, rc.hidden_size) != (acc.fast_layers, cfg.hidden_size):
                raise AdapterError(f"the router in {d} is for {rc.fast_layers} fast layers of width {rc.hidden_size}, "
                                   f"the adapter has {acc.fast_layers} of width {cfg.hidden_size}")
        if model is not None:
            acc = acc.to(model.embed_tokens.weight.dtype)
        return acc.eval().requires_grad_(False)


def slow_trace(model: Transformer, ids: torch.Tensor, depth: int | None = None):
    """Run the slow stream over ids (B, T) (right padding is harmless: queries never see later keys).

    Returns (states, cache): states[i] is the residual after i blocks (states[0] = embeddings), and the
    cache holds the slow stream's rotated K/V for every block."""
    B, T = ids.shape
    cache = model.new_cache(B, T)
    ctx = model.context(cache, torch.arange(T, device=ids.device).expand(B, T))
    depth = model.cfg.num_layers if depth is None else depth
    x = model.embed(ids)
    states = [x]
    for i in range(depth):
        x = model.layer(i, x, ctx)
        states.append(x)
    return states, cache


@dataclass(frozen=True)
class LossWeights:
    """Weights of the self-distillation objective (see ``distill_loss``)."""
    align: float = 1.0  # 1 - cos(N(f_l), N(s_target(l))), averaged over fast layers
    kl: float = 1.0  # KL(p_full || p_fast(l)) at ``kl_layers``
    kl_layers: tuple[int, ...] = ()  # 1-based fast layers with a KL term; () = the last fast layer

    def layers(self, fast_layers: int) -> tuple[int, ...]:
        return self.kl_layers or (fast_layers,)


def distill_loss(model: Transformer, acc: Accelerator, ids: torch.Tensor, mask: torch.Tensor,
                 weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict]:
    """The self-distillation loss on a right-padded batch ids (B, T); ``mask`` (B, T) marks the positions
    that are scored (e.g. the response positions: where the fast stream will draft). The slow stream
    runs without gradients; gradients reach only the adapters. States are gathered at the scored
    positions before the LM head, so unscored context costs no head FLOPs.

    Returns (loss, stats) with per-layer alignment losses and top-1 agreement of each KL layer's read-out
    with the full model (for logs)."""
    F_ = acc.fast_layers
    sel = mask.nonzero(as_tuple=True)
    if sel[0].numel() == 0:
        raise ValueError("the loss mask selects no position")
    with torch.no_grad():
        slow, cache = slow_trace(model, ids)
        norm_targets = [model.norm(slow[acc.cfg.target_depth(l)][sel]) for l in range(1, F_ + 1)]
        teacher_logp = torch.log_softmax(model.head(slow[-1][sel]), -1)  # (N, V)
        teacher_p = teacher_logp.exp()
        teacher_top = teacher_logp.argmax(-1)
    prev = None
    if acc.seer is not None:  # position t reads the slow final state at t-1 (nothing before the first)
        last = slow[-1]
        prev = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], 1)
    fast = acc.parallel_fast_states(model, ids, cache.k, cache.v, slow_states=slow, prev=prev)
    aligned = range(1, F_ + 1) if not acc.is_exit else (F_,)  # an exit adapter only changes depth F
    align = torch.stack([(1 - F.cosine_similarity(model.norm(fast[l][sel]), norm_targets[l - 1], dim=-1)).mean()
                         for l in aligned])
    kl_terms, agree = [], {}
    for l in weights.layers(F_):
        logp = torch.log_softmax(model.head(fast[l][sel]), -1)
        kl_terms.append((teacher_p * (teacher_logp - logp)).sum(-1).mean())
        agree[l] = float((logp.detach().argmax(-1) == teacher_top).float().mean())
    kl = torch.stack(kl_terms).mean()
    loss = weights.align * align.mean() + weights.kl * kl
    stats = {"loss": float(loss.detach()), "align": float(align.detach().mean()), "kl": float(kl.detach()),
             "align_by_layer": [round(float(a), 5) for a in align.detach()], "agree": agree,
             "positions": int(sel[0].numel())}
    return loss, stats


def ship(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a trained adapter directory into the package for shipping: weights stored as float16 (half the
    bytes; drafts and exits are verified or measured, so the precision of the adapters is a speed/quality
    knob, not an exactness one), the config and the draft vocabulary unchanged."""
    acc = Accelerator.load(src)
    acc.save(dst, dtype=torch.float16)
    for name in (DRAFT_VOCAB, "router.json", "router.safetensors"):
        if (Path(src) / name).is_file():
            atomic_write(Path(dst) / name, (Path(src) / name).read_bytes())
    return Path(dst)


def shipped_dir() -> Path:
    return shipped_roots()[0]


def find_shipped(identity: str, rate: int, kind: str = "m2r2", sees_slow: bool = False) -> Path | None:
    """The adapter of ``kind`` shipped inside the package for this base model and rate (one that sees the slow
    stream, or one that does not), if any."""
    return find_artifact(identity, kind,
                         where=lambda raw: raw.get("rate") == rate and bool(raw.get("sees_slow")) == sees_slow)
