"""The MoE feed-forward and the block that plugs it into the engine's per-layer seam.

An expert is one flat float buffer ``[gate|up (D, 2n) | down (n, D)]`` (row-major), so moving an expert
between memories is one contiguous copy or one file read, and a slot in fast memory is just a buffer of
that size. ``MoEFFN`` never owns expert weights: it asks its *provider* for the buffers of the experts a
step needs (``fetch``), and the provider decides where they come from (all resident, or a budgeted cache
fed by a background loader). Whatever the provider does, the arithmetic is the same: selected experts
are applied in ascending id order and summed into a zero buffer, so every provider and every prefetch
strategy computes bit-identical outputs.

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

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.model import Block, Transformer


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_size: int  # neurons (intermediate units) per expert
    hidden_size: int
    routing: str = "moefy"  # "moefy" | "softmax"
    norm_topk: bool = False
    router_bias: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.routing not in ("moefy", "softmax"):
            raise ValueError(f"routing must be 'moefy' or 'softmax', got {self.routing!r}")

    @property
    def expert_numel(self) -> int:
        return 3 * self.hidden_size * self.expert_size

    def to_dict(self) -> dict:
        return asdict(self)


def pack_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate, up: (n, D) rows of the gate/up projections; down: (D, n) columns of the down projection ->
    one flat buffer ``[gate|up as (D, 2n) | down as (n, D)]``."""
    gu = torch.cat([gate, up], 0).t()  # (D, 2n)
    return torch.cat([gu.reshape(-1), down.t().reshape(-1)]).contiguous()


def expert_views(buf: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    D, n = spec.hidden_size, spec.expert_size
    return buf[: 2 * D * n].view(D, 2 * n), buf[2 * D * n:].view(n, D)


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
        k = top_k or self.top_k
        logits = self.router(h).float()
        if self.spec.routing == "moefy":
            return logits.topk(k, -1).indices, None
        p = torch.softmax(logits, -1)
        w, idx = p.topk(k, -1)
        if self.spec.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return idx, w.to(h.dtype)

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
        n = self.spec.expert_size
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
        if self.shared is not None:
            s = self.shared(h2)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h2)) * s
            out = out + s
        return out.view(*lead, -1)


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
    forward = Block.forward

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
        return self.spec.expert_numel * next(iter(self.bank.values())).element_size()

    @property
    def total_experts(self) -> int:
        return len(self.bank)
