"""The MoE feed-forward and the block that plugs it into the engine's per-layer seam.

An expert is one flat buffer ``[gate|up | down]``: float32 (``(D, 2n)`` and ``(n, D)`` row-major) or GGUF blocks
(``MoESpec.expert_format`` "q8_0" / "q4_1": gate and up as rows of blocks, down neuron by neuron; ``quantize_expert``),
so moving an expert between memories is one contiguous copy or one file read, and a slot in fast memory is just a
buffer of that size. ``MoEFFN`` never owns expert weights: it asks its *provider* for the buffers of the experts a
step needs (``fetch``), and the provider decides where they come from (all resident, or a budgeted cache
fed by a background loader). Whatever the provider does, the arithmetic is the same: selected experts
are applied in ascending id order and summed into a zero buffer, so every provider and every prefetch
strategy computes bit-identical outputs. On CPU the sum runs as a native kernel (``native.experts``; the block's
attention half as ``native.attention``: ``MoEBlock.forward``), equal to the PyTorch path up to float32 summation
order.

Routing:

* ``moefy`` (MoEfication of a dense model): the experts partition the dense FFN's neurons, so the output
  is the plain *sum* of the selected experts (no gate weights); all E selected = the dense FFN;
* ``softmax`` (Mixtral, Qwen2-MoE, OLMoE): softmax over the router logits, top-k, optionally
  renormalised (``norm_topk``), expert outputs weighted by it. Qwen2-MoE adds an always-resident shared
  expert with a sigmoid gate (``shared``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import native
from ..engine.model import Block, Linear, RMSNorm, Transformer

EXPERT_FORMATS = ("f32", "q8_0", "q4_1")
BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}  # bytes per 32 weights (Q8_0: f16 scale + 32 int8; Q4_1: f16 scale, min + 16)


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_size: int  # neurons (intermediate units) per expert
    hidden_size: int
    routing: str = "moefy"  # "moefy" | "softmax"
    norm_topk: bool = False
    router_bias: bool = False
    expert_format: str = "f32"  # how an expert's buffer stores its weights: EXPERT_FORMATS

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.routing not in ("moefy", "softmax"):
            raise ValueError(f"routing must be 'moefy' or 'softmax', got {self.routing!r}")
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {', '.join(EXPERT_FORMATS)}, got {self.expert_format!r}")
        if self.expert_format in BLOCK_BYTES and (self.hidden_size % 32 or self.expert_size % 32):
            raise ValueError(f"{self.expert_format} experts need a hidden size and expert size divisible by 32, got "
                             f"{self.hidden_size} and {self.expert_size}")

    @property
    def expert_numel(self) -> int:
        """Weights per expert."""
        return 3 * self.hidden_size * self.expert_size

    @property
    def buffer_numel(self) -> int:
        """Elements of one expert's buffer (float32 numbers, or bytes of blocks)."""
        if self.expert_format in BLOCK_BYTES:
            return self.expert_numel // 32 * BLOCK_BYTES[self.expert_format]
        return self.expert_numel

    @property
    def native_kind(self) -> int:
        """The expert kernel's code for this format (0: float32; else the GGUF block kind)."""
        return native.BLOCK_KINDS[self.expert_format] if self.expert_format in BLOCK_BYTES else 0

    def to_dict(self) -> dict:
        return asdict(self)


def pack_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate, up: (n, D) rows of the gate/up projections; down: (D, n) columns of the down projection ->
    one flat buffer ``[gate|up as (D, 2n) | down as (n, D)]``."""
    gu = torch.cat([gate, up], 0).t()  # (D, 2n)
    return torch.cat([gu.reshape(-1), down.t().reshape(-1)]).contiguous()


def quantize_expert(buf: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """A float32 expert buffer (``pack_expert``) -> its buffer in the block format ``spec.expert_format`` (Q8_0,
    Q4_1): ``[gate|up as block rows (2n, D) | down as block rows (n, D)]``: gate and up in the GGUF layout (out rows
    of blocks: the kernel's dot products), down neuron by neuron (each neuron's D outputs in blocks: the kernel adds
    each neuron's row times its activation, kernels/decode.c q_axpy_team)."""
    from ..engine.blocks import quantize
    D, n = spec.hidden_size, spec.expert_size
    gu, down = buf[: 2 * D * n].view(D, 2 * n), buf[2 * D * n:].view(n, D)
    parts = [quantize(w.float().numpy(), spec.expert_format.upper()).reshape(-1) for w in (gu.t(), down)]
    return torch.from_numpy(np.concatenate(parts)).contiguous()


def _split(buf: torch.Tensor, spec: MoESpec) -> int:
    """Where the down projection starts in an expert's buffer (elements)."""
    D, n = spec.hidden_size, spec.expert_size
    return 2 * n * D // 32 * BLOCK_BYTES[spec.expert_format] if spec.expert_format in BLOCK_BYTES else 2 * D * n


def expert_views(buf: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's gate+up (D, 2n) and down (n, D) float32 weights: views of a float32 buffer, the exact
    dequantisation of a block one."""
    D, n = spec.hidden_size, spec.expert_size
    at = _split(buf, spec)
    if spec.expert_format in BLOCK_BYTES:
        from ..engine.blocks import dequantize
        f = spec.expert_format.upper()
        gu = torch.from_numpy(dequantize(buf[:at].view(2 * n, -1).numpy(), f).reshape(2 * n, D))
        down = torch.from_numpy(dequantize(buf[at:].view(n, -1).numpy(), f).reshape(n, D))
        return gu.t(), down
    return buf[:at].view(D, 2 * n), buf[at:].view(n, D)


def native_pointers(buf: torch.Tensor, spec: MoESpec) -> tuple[int, int]:
    """The (gate+up, down) data pointers the native expert kernel reads from an expert's buffer."""
    p = buf.data_ptr()
    return p, p + _split(buf, spec) * buf.element_size()


class ExpertProvider(Protocol):
    def fetch(self, layer: int, experts: list[int], state: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Buffers of ``experts`` of ``layer`` (blocks until they are in fast memory). ``state``: the
        normalised FFN input the router saw (a prefetcher may read it)."""
        ...


class Resident:
    """All experts in (fast) memory: the all-resident bound and the default."""

    def __init__(self, bank: dict[tuple[int, int], torch.Tensor]):
        self.bank = bank

    def fetch(self, layer, experts, state=None):
        return {e: self.bank[(layer, e)] for e in experts}

    def peek(self, layer, experts):
        return self.fetch(layer, experts)


class MoEFFN(nn.Module):
    def __init__(self, layer: int, spec: MoESpec, shared: nn.Module | None = None,
                 shared_gate: nn.Linear | None = None):
        super().__init__()
        self.layer, self.spec = layer, spec
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias)
        self.shared, self.shared_gate = shared, shared_gate
        self.provider: ExpertProvider | None = None
        self.top_k = spec.top_k  # may be changed at run time (quality sweeps)
        self.last_experts: list[int] = []  # the union of experts the last call used (for traces and the fast row)

    def route(self, h: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (N, D) normalised -> (expert ids (N, k), weights (N, k) or None for an unweighted sum)."""
        idx, w = self.choose(self.router(h).float(), top_k)
        return idx, None if w is None else w.to(h.dtype)

    def choose(self, logits: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router logits (N, E) float32 -> (expert ids (N, k), weights (N, k) float32 or None)."""
        k = top_k or self.top_k
        if self.spec.routing == "moefy":
            return logits.topk(k, -1).indices, None
        p = torch.softmax(logits, -1)
        w, idx = p.topk(k, -1)
        if self.spec.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return idx, w

    def router_columns(self) -> torch.Tensor:
        """The router's weight as float32 (D, E) row-major (what the native kernel streams), rebuilt when the
        weight changes."""
        w = self.router.weight
        key = (w.data_ptr(), w._version)
        if getattr(self, "_router_key", None) != key:
            self._router_t = w.detach().float().t().contiguous()
            self._router_key = key
        return self._router_t

    def native_step(self, x: torch.Tensor, h: torch.Tensor, logits: torch.Tensor, follow: bool = False) -> torch.Tensor:
        """The block's output from the native attention half (``native.attention``): x (B, T, D) the states after
        attention (contiguous; updated in place), h (N, D) the FFN input, logits (N, E) the router's. The same
        choice, fetch and sum as ``forward``, the experts in one kernel call per layer in decode. ``follow``: every
        row runs row 0's experts with row 0's weights (the M2R2 fast row riding with the slow row: no loads of its
        own; row 0's result is the one it gets alone, the kernel's rows being independent)."""
        spec = self.spec
        N = h.shape[0]
        idx, w = self.choose(logits[:1] if follow else logits)
        x2 = x.view(N, -1)
        kind = spec.native_kind
        out = torch.zeros_like(h)
        resid = x2 if self.shared is None else None
        if N == 1 or follow:
            picked = idx[0].tolist()
            needed = sorted(picked)
            bufs = self.provider.fetch(self.layer, needed, x2[:1])
            self.last_experts = needed
            sel = torch.ones(N, len(needed), dtype=torch.uint8)
            wts = None if w is None else w[0, [picked.index(e) for e in needed]].expand(N, -1).contiguous()
            native.experts(h, [native_pointers(bufs[e], spec) for e in needed], kind, sel, wts, out,
                           spec.expert_size, resid)
        else:
            needed = sorted(set(idx.flatten().tolist()))
            self.last_experts = needed
            out = self._native_forward(h, needed, idx, w, None)
            if resid is not None:
                x2 += out
        if resid is None:
            x2 += out + self._shared_term(h)
        return x

    def _native(self, h2: torch.Tensor) -> bool:
        """Whether the experts run as the native kernel (float32 on CPU, nothing to differentiate)."""
        return h2.dtype == torch.float32 and h2.device.type == "cpu" and native.available() \
            and not (torch.is_grad_enabled() and h2.requires_grad)

    def _torch_forward(self, h2, needed, idx, w, bufs) -> torch.Tensor:
        n = self.spec.expert_size
        N = h2.shape[0]
        out = torch.zeros_like(h2)
        for e in needed:
            buf = bufs[e] if bufs is not None else self.provider.fetch(self.layer, [e], None)[e]
            gu, down = expert_views(buf, self.spec)
            if N == 1:
                rows, x = None, h2
            else:
                sel = (idx == e)
                rows = sel.any(-1).nonzero()[:, 0]
                if rows.numel() == 0:
                    continue
                x = h2[rows]
            y = x @ gu
            y = (F.silu(y[:, :n]) * y[:, n:]) @ down
            if w is not None:
                wr = (w * (idx == e)).sum(-1, keepdim=True)
                y = y * (wr if rows is None else wr[rows])
            if rows is None:
                out = out + y
            else:
                out.index_add_(0, rows, y)
        return out

    def _native_forward(self, h2, needed, idx, w, bufs) -> torch.Tensor:
        """The same sum in one kernel call per layer (decode: every needed expert's buffer is in hand) or per
        expert (a prefill fetching one expert at a time): ascending expert ids, each row's experts summed into
        its output in that order."""
        spec = self.spec
        kind = spec.native_kind
        h2 = h2.contiguous()
        out = torch.zeros_like(h2)
        chosen = torch.stack([(idx == e).any(-1) for e in needed], 1).to(torch.uint8).contiguous()
        wts = None
        if w is not None:
            wts = torch.stack([(w * (idx == e)).sum(-1) for e in needed], 1).float().contiguous()
        if bufs is not None:
            native.experts(h2, [native_pointers(bufs[e], spec) for e in needed], kind, chosen, wts, out,
                           spec.expert_size)
            return out
        for j, e in enumerate(needed):
            if not bool(chosen[:, j].any()):
                continue
            buf = self.provider.fetch(self.layer, [e], None)[e]
            native.experts(h2, [native_pointers(buf, spec)], kind, chosen[:, j:j + 1].contiguous(),
                           None if wts is None else wts[:, j:j + 1].contiguous(), out, spec.expert_size)
        return out

    def forward(self, h: torch.Tensor, experts: list[int] | None = None, raw: torch.Tensor | None = None,
                bufs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """h: (B, T, D), already normalised; ``raw``: the un-normalised residual it came from (handed to the
        provider, whose prefetcher may apply a later layer's norm and router to it). ``experts`` forces the
        expert set of every row and ``bufs`` supplies their buffers (the M2R2 fast row rides through the
        slow row's experts, already in fast memory; moefy routing only)."""
        lead = h.shape[:-1]
        h2 = h.reshape(-1, h.shape[-1])
        N = h2.shape[0]
        if experts is None:
            idx, w = self.route(h2)
            needed = sorted(set(idx.flatten().tolist()))
        else:
            needed, w = sorted(experts), None
            idx = torch.tensor(needed).expand(N, len(needed))
        if bufs is None:
            state = None if raw is None else raw.reshape(-1, raw.shape[-1])
            if N == 1:
                bufs = self.provider.fetch(self.layer, needed, state)
            else:  # prefill: one expert at a time, so a small budget never has to hold a layer's union
                bufs = None
        self.last_experts = needed
        if self._native(h2):
            out = self._native_forward(h2, needed, idx, w, bufs)
        else:
            out = self._torch_forward(h2, needed, idx, w, bufs)
        if self.shared is not None:
            out = out + self._shared_term(h2)
        return out.view(*lead, -1)

    def _shared_term(self, h2: torch.Tensor) -> torch.Tensor:
        """The always-resident shared expert's output (Qwen2-MoE), through its sigmoid gate where it has one."""
        s = self.shared(h2)
        return s if self.shared_gate is None else torch.sigmoid(self.shared_gate(h2)) * s


class SharedMLP(nn.Module):
    """A dense gated-SiLU MLP (Qwen2-MoE's shared expert), always resident."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEBlock(nn.Module):
    """A decoder block whose FFN is an ``MoEFFN``; attention, norms and the forward are ``Block``'s own."""

    def __init__(self, block: Block, ffn: MoEFFN):
        super().__init__()
        self.index, self.cfg, self.scale = block.index, block.cfg, block.scale
        self.input_norm, self.qkv, self.o, self.post_norm = block.input_norm, block.qkv, block.o, block.post_norm
        if hasattr(block, "q_norm"):  # OLMoE's q/k norms (see hf.py)
            self.q_norm, self.k_norm = block.q_norm, block.k_norm
        self.ffn = ffn

    qkv_proj = Block.qkv_proj
    attend = Block.attend
    # what the native kernel computes of this block: its attention half (the experts run their own kernel)
    _NATIVE_PARTS = (("input_norm", RMSNorm), ("qkv", Linear), ("o", Linear), ("post_norm", RMSNorm))
    _NATIVE_LINEARS = ("qkv", "o")

    def _native_attention(self, x: torch.Tensor, ctx) -> object:
        """The weight format the native kernel computes this block's attention half from, or None: ``Block``'s own
        conditions for those parts (not with OLMoE's q/k norms, which the kernel does not compute)."""
        return None if "q_norm" in self._modules else Block._native_format(self, x, ctx)

    def _native_ffn(self, x: torch.Tensor) -> bool:
        """Whether the experts run as the native kernel after it (the router's logits fit the kernel's scratch)."""
        return self.ffn._native(x) and self.ffn.spec.num_experts <= self.cfg.q_size + 2 * self.cfg.kv_size

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        fmt = self._native_attention(x, ctx)
        if fmt is None or not self._native_ffn(x):
            return Block.forward(self, x, ctx)
        ffn = self.ffn
        x, h, logits = native.attention(self, x, ctx.cache.k[self.index], ctx.cache.v[self.index], ctx.cos,
                                        ctx.sin, ctx.native_rows, fmt, ffn.router_columns(), ffn.router.bias)
        return ffn.native_step(x, h, logits)

    def can_ride(self, x: torch.Tensor, ctx) -> bool:
        """Whether ``ride`` runs here (the native attention half and expert kernel, moefy routing)."""
        return self._native_attention(x, ctx) is not None and self._native_ffn(x) \
            and self.ffn.spec.routing == "moefy" and self.ffn.shared is None

    def ride(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The block on rows whose first is the token's slow row and whose others ride with it (``can_ride`` must
        hold): one attention call for all rows (each in its own cache slots: ``ctx``) and one expert call, every
        row through the slow row's experts (``MoEFFN.native_step(follow=True)``). The slow row's result is the one
        ``forward`` gives it alone."""
        ffn = self.ffn
        x, h, logits = native.attention(self, x, ctx.cache.k[self.index], ctx.cache.v[self.index], ctx.cos,
                                        ctx.sin, ctx.native_rows, self._native_attention(x, ctx),
                                        ffn.router_columns(), ffn.router.bias)
        return ffn.native_step(x, h, logits, follow=True)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.post_norm(x), raw=x)


class MoEModel:
    """A ``Transformer`` whose blocks are ``MoEBlock``s, plus the slow-memory copy of every expert."""

    def __init__(self, model: Transformer, spec: MoESpec, bank: dict[tuple[int, int], torch.Tensor],
                 info: dict | None = None):
        self.model, self.spec, self.bank = model, spec, bank
        self.info = info or {}
        self.set_provider(Resident(bank))

    @property
    def num_layers(self) -> int:
        return self.model.cfg.num_layers

    @property
    def ffns(self) -> list[MoEFFN]:
        return [blk.ffn for blk in self.model.layers]

    def set_provider(self, provider: ExpertProvider) -> None:
        for f in self.ffns:
            f.provider = provider

    def set_top_k(self, k: int) -> None:
        if not 1 <= k <= self.spec.num_experts:
            raise ValueError(f"top_k must be in [1, {self.spec.num_experts}], got {k}")
        for f in self.ffns:
            f.top_k = k

    @property
    def top_k(self) -> int:
        return self.ffns[0].top_k

    def expert_bytes(self) -> int:
        return self.spec.buffer_numel * next(iter(self.bank.values())).element_size()

    def fingerprint(self) -> str:
        """A hash of every expert's bytes (in key order): names a directory of expert files, so files written for
        other experts (another MoEfication, recovery or format) are never read for these."""
        import hashlib
        h = hashlib.sha256()
        for key in sorted(self.bank):
            h.update(self.bank[key].contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def total_experts(self) -> int:
        return len(self.bank)
