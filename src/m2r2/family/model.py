"""One decoder, many depths: every architecture of the family is a ``FamilyConfig`` of ``FamilyModel``.

The blocks are the engine's own (``m2r2.engine.model.Block``: fused q/k/v and gate/up, RMSNorm, RoPE from the
shared table, SDPA); what differs between architectures is only *which* block runs on *which* tokens:

* ``vanilla``   - L unique blocks, every token through every block.
* ``recursive`` - middle-cycle sharing (MoR's best scheme): first and last blocks unique, the middle
  ``(L-2)/Nr`` blocks applied ``Nr`` times; no routing.
* ``mor-ec``    - MoR expert-choice: before recursion r a router picks the top ``capacity[r]`` fraction of
  the tokens still active (hierarchical), an auxiliary BCE teaches the router's sign to agree with the
  top-k so a causal threshold (logit > 0) replaces top-k when generating.
* ``mor-tc``    - MoR token-choice: one router gives each token a depth 1..Nr up front (balancing loss).
* ``mor-kv``    - ``mor-ec`` with recursive KV sharing: every recursion attends to the first recursion's
  K/V (which all tokens compute), so later recursions project only queries and store nothing.
* ``mod``       - Mixture-of-Depths: every other block routes the top ``mod_capacity`` of the tokens
  (aux BCE for the causal threshold at decode, like ``mor-ec``).
* ``pmod``      - p-MoD: MoD over *designated* tokens only (``token_type`` mask), TanhNorm router weight
  ``0.2*tanh(logit)+1`` (zero-initialised router, so the model starts dense-equivalent), STRing
  (skipped designated tokens are scaled by their weight too, so the router learns from them), and
  progressive ratio decay: layer l keeps ``floor + (1-floor)*(1+cos(pi*l/L))/2`` of them (a cosine over
  the model's own depth L, shifted up by ``floor``).
* ``vmod``      - VideoLLM-MoD: designated tokens arrive in chunks ("frames") of ``vmod_chunk``; every
  other block keeps the top ``vmod_ratio`` of each chunk. Selection needs only the chunk itself, so a
  stream fed one whole chunk per call is causal at chunk granularity.

The designated-token interface is a boolean mask over positions. Here it marks the document part of long
prompts (Spec-Bench summarization/RAG); a multimodal model passes its image-token mask through the same
argument and nothing else changes.

Tokens that skip a block write no K/V there. ``RaggedKVCache`` keeps one cache per block *application*
(recursion-wise caching for MoR) holding only the tokens that ran it, with their positions, so attention
at an application is among the tokens active there. Training uses the same code with a fresh cache, so
the cached decode and the full forward are one code path (tested equal in threshold mode).

Every forward counts what it executed (``Counter``): FLOPs of the rows each block actually processed,
of the attention pairs actually scored, of routers and head; the cache reports the K/V bytes it holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.config import ModelConfig
from ..errors import M2R2Error
from .cache import RaggedKVCache
from ..engine.model import Block, RMSNorm

ARCHS = ("vanilla", "recursive", "mor-ec", "mor-tc", "mor-kv", "mod", "pmod", "vmod")
MOR = ("recursive", "mor-ec", "mor-tc", "mor-kv")


class FamilyConfigError(M2R2Error):
    """A family architecture configuration that cannot be built."""


@dataclass(frozen=True)
class FamilyConfig:
    arch: str = "vanilla"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 8  # effective depth: block applications of a token that takes every layer/recursion
    n_heads: int = 4
    ffn: int = 352
    max_len: int = 1024
    recursions: int = 3  # Nr for the recursive / MoR archs
    mor_capacity: tuple[float, ...] = (1.0, 2 / 3, 1 / 3)  # expert-choice fraction per recursion
    mod_capacity: float = 0.125
    prd_floor: float = 0.0  # p-MoD: the shift of the cosine ratio schedule (0: mean ratio 0.56 at L=8, the paper's ~55%)
    vmod_ratio: float = 0.2
    vmod_chunk: int = 32
    aux_weight: float = 0.1  # router BCE (expert-choice, MoD)
    balance_weight: float = 0.01  # token-choice balancing loss
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "mor_capacity", tuple(float(c) for c in self.mor_capacity))
        if self.arch not in ARCHS:
            raise FamilyConfigError(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise FamilyConfigError(f"d_model={self.d_model} must split into {self.n_heads} even-sized heads")
        if self.arch in MOR:
            if self.n_layers < 3 or (self.n_layers - 2) % self.recursions:
                raise FamilyConfigError(f"middle-cycle sharing needs (n_layers-2) divisible by recursions: "
                                        f"n_layers={self.n_layers}, recursions={self.recursions}")
            if self.arch in ("mor-ec", "mor-kv"):
                cap = self.mor_capacity
                if len(cap) != self.recursions or not all(0 < c <= 1 for c in cap) or list(cap) != sorted(cap, reverse=True):
                    raise FamilyConfigError(f"mor_capacity {cap} must be {self.recursions} non-increasing fractions in (0, 1]")
                if self.arch == "mor-kv" and cap[0] != 1.0:
                    raise FamilyConfigError("mor-kv reuses the first recursion's K/V: mor_capacity[0] must be 1")
        for name in ("mod_capacity", "vmod_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise FamilyConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.prd_floor <= 1:
            raise FamilyConfigError(f"prd_floor must be in [0, 1], got {self.prd_floor}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def uses_token_type(self) -> bool:
        return self.arch in ("pmod", "vmod")

    def block_config(self, n_blocks: int) -> ModelConfig:
        """The engine's ModelConfig for the unique blocks (so ``Block`` and its cost model are reused)."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.d_model, intermediate_size=self.ffn,
                           num_layers=n_blocks, num_heads=self.n_heads, num_kv_heads=self.n_heads,
                           head_dim=self.head_dim, rms_norm_eps=self.rms_eps, max_position_embeddings=self.max_len,
                           tie_word_embeddings=True)

    def prd_ratio(self, layer: int) -> float:
        """p-MoD's progressive ratio decay: shifted cosine over the model's depth."""
        return self.prd_floor + (1 - self.prd_floor) * 0.5 * (1 + math.cos(math.pi * layer / self.n_layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mor_capacity"] = list(self.mor_capacity)
        return d


@dataclass
class Group:
    """Consecutive block applications that share one routing decision (a MoR recursion, or one layer)."""
    kind: str  # dense | ec | tc | mod | pmod | vmod
    apps: list[tuple[int, int, int | None]]  # (block index, cache slot, K/V source slot or None)
    router: int | None = None  # index into routers
    recursion: int = 0
    fraction: float = 1.0  # capacity / keep ratio


def build_plan(cfg: FamilyConfig) -> tuple[int, list[Group], list[int]]:
    """(number of unique blocks, groups in execution order, router output sizes)."""
    L = cfg.n_layers
    groups: list[Group] = []
    routers: list[int] = []
    if cfg.arch in MOR:
        nr, m = cfg.recursions, (L - 2) // cfg.recursions
        groups.append(Group("dense", [(0, 0, None)]))
        slot = 1
        if cfg.arch == "mor-tc":
            routers.append(nr)
        for r in range(nr):
            apps = []
            for j in range(m):
                src = 1 + j if (cfg.arch == "mor-kv" and r > 0) else None
                apps.append((1 + j, slot, src))
                slot += 1
            if cfg.arch == "recursive" or (cfg.arch in ("mor-ec", "mor-kv") and cfg.mor_capacity[r] >= 1.0):
                groups.append(Group("dense", apps, recursion=r))
            elif cfg.arch == "mor-tc":
                groups.append(Group("tc", apps, router=0, recursion=r))
            else:
                routers.append(1)
                groups.append(Group("ec", apps, router=len(routers) - 1, recursion=r, fraction=cfg.mor_capacity[r]))
        groups.append(Group("dense", [(1 + m, slot, None)]))
        return 2 + m, groups, routers
    for i in range(L):
        kind, frac = "dense", 1.0
        if cfg.arch == "mod" and i % 2 == 1:
            kind, frac = "mod", cfg.mod_capacity
        elif cfg.arch == "pmod" and cfg.prd_ratio(i) < 1.0:
            kind, frac = "pmod", cfg.prd_ratio(i)
        elif cfg.arch == "vmod" and i % 2 == 1:
            kind, frac = "vmod", cfg.vmod_ratio
        router = None
        if kind != "dense":
            routers.append(1)
            router = len(routers) - 1
        groups.append(Group(kind, [(i, i, None)], router=router, fraction=frac))
    return L, groups, routers


@dataclass
class Counter:
    """What one forward executed: FLOPs (multiply-adds x 2) and per-application token counts."""
    flops: float = 0.0
    tokens: int = 0
    processed: dict = field(default_factory=dict)  # slot -> tokens that ran it
    designated_processed: dict = field(default_factory=dict)  # slot -> designated tokens that ran it
    designated: int = 0


class FamilyModel(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        from transformers import LlamaConfig

        from ..engine.loading import rope_table
        self.cfg = cfg
        n_blocks, self.groups, router_sizes = build_plan(cfg)
        self.n_slots = 1 + max(slot for g in self.groups for _, slot, _ in g.apps)
        self.bcfg = cfg.block_config(n_blocks)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # tied with the head
        self.blocks = nn.ModuleList(Block(self.bcfg, i, threads=1) for i in range(n_blocks))
        self.routers = nn.ModuleList(nn.Linear(cfg.d_model, n, bias=True) for n in router_sizes)
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        hf = LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_len,
                         intermediate_size=cfg.ffn, num_hidden_layers=n_blocks)
        cos, sin = rope_table(hf, cfg.max_len)
        half = cos.shape[-1] // 2  # the engine's sign-folded sin (see Transformer.__init__)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", torch.cat((-sin[:, :half], sin[:, half:]), -1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(0)  # the caller seeds torch; this keeps init independent of it
        std = 0.02
        with torch.no_grad():
            self.embed.weight.normal_(0, std, generator=g)
            for b in self.blocks:
                for lin, s in ((b.qkv, std), (b.gate_up, std), (b.o, std / math.sqrt(2 * self.cfg.n_layers)),
                               (b.down, std / math.sqrt(2 * self.cfg.n_layers))):
                    lin.weight.normal_(0, s, generator=g)
            for r in self.routers:
                if self.cfg.arch == "pmod":  # TanhNorm starts at weight 1: the dense model
                    r.weight.zero_()
                else:
                    r.weight.normal_(0, std, generator=g)
                r.bias.zero_()

    # ---- accounting ----
    def unique_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def new_cache(self, batch: int) -> RaggedKVCache:
        return RaggedKVCache(self.n_slots, batch)

    # ---- the forward ----
    def forward(self, ids: torch.Tensor, token_type: torch.Tensor | None = None, cache: RaggedKVCache | None = None,
                mode: str = "threshold", counter: Counter | None = None, last_only: bool = False):
        """Logits (B, T, V) of ``ids`` (B, T) continuing ``cache`` (a fresh one when None), and the auxiliary
        loss (0-dim). ``mode`` "topk" is training-time expert choice over the whole call (non-causal for
        ec/mod); "threshold" routes each token by its own router logit (causal; what generation uses).
        p-MoD and VideoLLM-MoD select within the designated tokens of the call (a whole document or chunk)
        in both modes."""
        if mode not in ("topk", "threshold"):
            raise ValueError(f"mode must be 'topk' or 'threshold', got {mode!r}")
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B)
        if cache.batch != B:
            raise ValueError(f"cache holds {cache.batch} rows, ids has {B}")
        if token_type is None:
            token_type = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        elif token_type.shape != ids.shape:
            raise ValueError(f"token_type shape {tuple(token_type.shape)} != ids shape {tuple(ids.shape)}")
        pos = cache.seen.view(B, 1) + torch.arange(T).view(1, T)
        if int(pos.max()) >= self.cfg.max_len:
            raise ValueError(f"position {int(pos.max())} beyond max_len {self.cfg.max_len}")
        c = counter if counter is not None else Counter()
        c.tokens += B * T
        c.designated += int(token_type.sum())
        x = self.embed(ids)
        aux = x.new_zeros(())
        state: dict = {}
        for g in self.groups:
            x, a = self._group(g, x, pos, token_type, mode, cache, state, c)
            aux = aux + a
        cache.seen = cache.seen + T
        if last_only:
            x = x[:, -1:]
        c.flops += 2.0 * x.shape[0] * x.shape[1] * self.cfg.vocab_size * self.cfg.d_model
        return F.linear(self.norm(x), self.embed.weight), aux

    def _route(self, g: Group, x, ttype, mode, state, c: Counter):
        """(active (B,T) bool or None = all, weight (B,T) or None, skip_scale (B,T) or None, aux loss)."""
        B, T, _ = x.shape
        zero = x.new_zeros(())
        if g.kind == "dense":
            return None, None, None, zero
        if g.kind == "tc":
            if "depth" not in state:  # one decision per token, before the first recursion
                logits = self.routers[g.router](x)  # (B, T, Nr)
                c.flops += 2.0 * B * T * self.cfg.d_model * logits.shape[-1]
                probs = logits.float().softmax(-1)
                depth = probs.argmax(-1)
                state["depth"], state["w"] = depth, probs.gather(-1, depth.unsqueeze(-1)).squeeze(-1).to(x.dtype)
                nr = probs.shape[-1]
                frac = F.one_hot(depth, nr).float().mean((0, 1))  # Switch-style balancing loss
                bal = nr * (frac * probs.mean((0, 1))).sum()
                return state["depth"] >= g.recursion, state["w"], None, self.cfg.balance_weight * bal
            return state["depth"] >= g.recursion, state["w"], None, zero
        if g.kind in ("pmod", "vmod") and not bool(ttype.any()):
            return None, None, None, zero  # nothing designated in this call (a decode step): the dense block
        logit = self.routers[g.router](x).squeeze(-1).float()  # (B, T)
        c.flops += 2.0 * B * T * self.cfg.d_model
        if g.kind in ("ec", "mod"):
            eligible = state.get("active") if g.kind == "ec" else None
            if eligible is None:
                eligible = torch.ones(B, T, dtype=torch.bool)
            if mode == "topk":
                k = max(1, math.ceil(g.fraction * T))
                top = logit.masked_fill(~eligible, float("-inf")).topk(min(k, T), dim=1).indices
                active = torch.zeros(B, T, dtype=torch.bool).scatter(1, top, True) & eligible
                bce = F.binary_cross_entropy_with_logits(logit[eligible], active[eligible].float())
                aux = self.cfg.aux_weight * bce
            else:
                active, aux = eligible & (logit > 0), zero
            if g.kind == "ec":
                state["active"] = active
            return active, torch.sigmoid(logit).to(x.dtype), None, aux
        # token-type routing: undesignated tokens always run the block with weight 1
        if g.kind == "pmod":
            w = 0.2 * torch.tanh(logit) + 1.0  # TanhNorm
            keep = self._topk_within(logit, ttype, [ttype], g.fraction)
            active = keep | ~ttype
            weight = torch.where(ttype, w, torch.ones_like(w)).to(x.dtype)
            skip = torch.where(ttype & ~active, w, torch.ones_like(w)).to(x.dtype)  # STRing
            return active, weight, skip, zero
        # vmod: chunks of consecutive designated tokens within the call
        chunks = self._chunks(ttype)
        keep = self._topk_within(logit, ttype, chunks, g.fraction)
        active = keep | ~ttype
        weight = torch.where(ttype, torch.sigmoid(logit), torch.ones_like(logit)).to(x.dtype)
        return active, weight, None, zero

    @staticmethod
    def _topk_within(logit, ttype, sets: list[torch.Tensor], fraction: float) -> torch.Tensor:
        """Within each boolean set (B, T) of each row, the top ceil(fraction * size) tokens by logit."""
        keep = torch.zeros_like(ttype)
        for s in sets:
            for b in range(logit.shape[0]):
                n = int(s[b].sum())
                if n == 0:
                    continue
                k = math.ceil(fraction * n)
                idx = logit[b].masked_fill(~s[b], float("-inf")).topk(k).indices
                keep[b, idx] = True
        return keep & ttype

    def _chunks(self, ttype: torch.Tensor) -> list[torch.Tensor]:
        """Designated tokens of the call grouped in order into chunks of ``vmod_chunk`` (per row)."""
        rank = torch.cumsum(ttype.long(), 1) - 1  # index among the row's designated tokens
        cid = torch.where(ttype, rank // self.cfg.vmod_chunk, torch.full_like(rank, -1))
        n = int(cid.max()) + 1 if bool(ttype.any()) else 0
        return [cid == j for j in range(n)]

    def _group(self, g: Group, x, pos, ttype, mode, cache, state, c: Counter):
        active, weight, skip, aux = self._route(g, x, ttype, mode, state, c)
        B, T, d = x.shape
        if active is None:  # every token: no gather
            xs, ps, qvalid, idx = x, pos, torch.ones(B, T, dtype=torch.bool), None
        else:
            counts = active.sum(1)
            K = int(counts.max())
            if K == 0:
                return (x * skip.unsqueeze(-1) if skip is not None else x), aux
            idx = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :K]  # active first, in order
            qvalid = torch.arange(K).view(1, K) < counts.view(B, 1)
            xs = x.gather(1, idx.unsqueeze(-1).expand(B, K, d))
            ps = pos.gather(1, idx)
        h = xs
        for block, slot, src in g.apps:
            h = self._run_block(block, slot, src, h, ps, qvalid, cache, c)
            n = int(qvalid.sum())
            c.processed[slot] = c.processed.get(slot, 0) + n
            tsel = ttype if idx is None else ttype.gather(1, idx)
            c.designated_processed[slot] = c.designated_processed.get(slot, 0) + int((tsel & qvalid).sum())
        if idx is None:
            return h, aux
        delta = (h - xs) * (weight.gather(1, idx) * qvalid).unsqueeze(-1)
        base = x * skip.unsqueeze(-1) if skip is not None else x
        return base.scatter_add(1, idx.unsqueeze(-1).expand(B, idx.shape[1], d), delta), aux

    def _run_block(self, bi: int, slot: int, src, x, pos, qvalid, cache: RaggedKVCache, c: Counter):
        """One block on the gathered tokens x (B, K, d) at absolute ``pos``; padding rows (~qvalid) are
        computed but discarded by the caller and never stored as valid K/V."""
        blk = self.blocks[bi]
        cfg, bc = self.cfg, self.bcfg
        B, K, _ = x.shape
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        hn = blk.input_norm(x)
        n = int(qvalid.sum())
        if src is None:
            q, k, v = blk.qkv_proj(hn, cos, sin)
            kc, vc, kpos, kvalid = cache.append(slot, k, v, pos, qvalid)
            c.flops += 2.0 * n * bc.layer_params()
        else:  # KV sharing: queries only, attend to the source application's K/V
            w = blk.qkv.weight.view(cfg.d_model, -1)[:, : bc.q_size]
            q = (hn @ w).view(B, K, cfg.n_heads, cfg.head_dim)
            q = (q * cos.unsqueeze(2) + torch.roll(q, cfg.head_dim // 2, dims=-1) * sin.unsqueeze(2)).transpose(1, 2)
            kc, vc, kpos, kvalid = cache.read(src)
            c.flops += 2.0 * n * (bc.layer_params() - 2 * cfg.d_model * bc.kv_size)
        mask = kvalid[:, None, None, :] & (kpos[:, None, None, :] <= pos[:, None, :, None])
        pairs = int((mask & qvalid[:, None, :, None]).sum())
        c.flops += 4.0 * pairs * cfg.n_heads * cfg.head_dim
        mask = mask | ~qvalid[:, None, :, None]  # padding queries see everything (finite, discarded)
        x = x + blk.attend(q, kc, vc, mask)
        return x + blk.mlp(x)
