"""The per-layer model seam every method uses: ``embed``, ``layer(i)``, ``norm``, ``head``.

m2r2 owns its decoder blocks (mapped from a Hugging Face Llama-family checkpoint at load time) instead
of calling a library's layer internals, whose signatures change between releases. The blocks are
written for decode speed on CPU: q/k/v and gate/up are fused into single matmuls, RoPE comes from a
precomputed table, and K/V go straight into the pre-allocated ``KVCache``.

Numerics follow transformers' Llama implementation (float32 RMSNorm, same RoPE table, SDPA), so greedy
output matches ``transformers.generate`` token for token up to float ties.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, WriteSpec
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same arithmetic as transformers' LlamaRMSNorm (checked bit-equal), as one fused op in float32
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for x (..., in); a single row goes through gemv, measurably faster than gemm with
    M=1 on CPU (and bit-identical)."""
    if x.numel() == x.shape[-1] and layer.bias is None and x.dtype == layer.weight.dtype:
        return torch.mv(layer.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
    return layer(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    """One pre-norm decoder layer: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.cfg = cfg
        d = cfg.hidden_size
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o = nn.Linear(cfg.q_size, d, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def qkv_proj(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Project normalised states to rotated q (B,H,T,hd), k and v (B,KV,T,hd).

        RoPE is applied to q and k heads in one go; ``sin`` arrives sign-folded (see ``Transformer.rope``)
        so rotate_half(x) * sin == roll(x, hd/2) * sin_folded, bit for bit, in fewer ops."""
        B, T, _ = x.shape
        c = self.cfg
        qkv = linear(x, self.qkv)
        qk = qkv[..., : c.q_size + c.kv_size].view(B, T, c.num_heads + c.num_kv_heads, c.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd)
        qk = qk * cos + torch.roll(qk, c.head_dim // 2, dims=-1) * sin
        q = qk[:, :, : c.num_heads].transpose(1, 2)
        k = qk[:, :, c.num_heads:].transpose(1, 2)
        v = qkv[..., c.q_size + c.kv_size:].view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k_all, v_all, mask) -> torch.Tensor:
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=self.scale,
            enable_gqa=self.cfg.num_heads != self.cfg.num_kv_heads)
        return linear(out.transpose(1, 2).reshape(B, T, self.cfg.q_size), self.o)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linear(self.post_norm(x), self.gate_up).chunk(2, dim=-1)
        return linear(F.silu(g) * u, self.down)

    def forward(self, x: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        q, k, v = self.qkv_proj(self.input_norm(x), ctx.cos, ctx.sin)
        k_all, v_all = ctx.cache.update(self.index, k, v, ctx.write)
        x = x + self.attend(q, k_all, v_all, ctx.write.mask)
        return x + self.mlp(x)


class StepContext:
    """Everything the layers of one forward call share: positions, RoPE rows, cache and mask."""

    def __init__(self, model: "Transformer", cache: KVCache, positions: torch.Tensor):
        self.cache = cache
        self.positions = positions
        self.write = WriteSpec(positions, cache.max_len)
        self.cos, self.sin = model.rope(positions)


class Transformer(nn.Module):
    """A decoder as a seam of parts; the decode loop and every strategy drive it layer by layer."""

    def __init__(self, cfg: ModelConfig, rope_table: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_table  # (max_positions, hd), float32
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        half = cos.shape[-1] // 2  # rotate_half(x)*sin == roll(x, half)*[-sin_lo, sin_hi], exactly
        self.register_buffer("rope_sin_folded", torch.cat((-sin[:, :half], sin[:, half:]), -1), persistent=False)
        self.forward_passes = 0  # full-depth forward calls, for stats
        self.layer_calls = 0  # (token rows x layers) executed, for compute accounting

    # ---- the seam ----
    def rope(self, positions: torch.Tensor):
        if int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError("position beyond the model's context window")
        dtype = self.rope_dtype()
        return self.rope_cos[positions].to(dtype), self.rope_sin_folded[positions].to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        self.layer_calls += x.shape[0] * x.shape[1]
        return self.layers[i].forward(x, ctx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden states -> float32 logits."""
        return linear(self.norm(x), self.lm_head).float()

    def context(self, cache: KVCache, positions: torch.Tensor) -> StepContext:
        return StepContext(self, cache, positions)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        dtype = self.rope_dtype()
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype=dtype,
                       device=self.embed_tokens.weight.device)

    def rope_dtype(self) -> torch.dtype:
        w = self.embed_tokens.weight
        return w.dtype if w.is_floating_point() else torch.float32

    def forward(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """Full-depth forward of ids (B, T) at ``positions`` (B, T); returns logits (B, T, V)
        (or (B, 1, V) of the last position when ``last_only``). Writes K/V; does not commit lengths."""
        ctx = self.context(cache, positions)
        x = self.embed(ids)
        for i in range(self.cfg.num_layers):
            x = self.layer(i, x, ctx)
        self.forward_passes += 1
        if last_only:
            x = x[:, -1:]
        return self.head(x)


def hf_state_dict_to_m2r2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama-family state dict onto m2r2's fused blocks (done once, at load)."""

    def get(name: str) -> torch.Tensor:
        for key in (name, "model." + name):
            if key in sd:
                return sd[key]
        raise KeyError(name)

    out: dict[str, torch.Tensor] = {"embed_tokens.weight": get("embed_tokens.weight"),
                                    "norm.weight": get("norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        out[p + "input_norm.weight"] = get(p + "input_layernorm.weight")
        out[p + "post_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out[p + "qkv.weight"] = torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"),
                                           get(a + "v_proj.weight")], 0)
        if cfg.attention_bias:
            out[p + "qkv.bias"] = torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"),
                                             get(a + "v_proj.bias")], 0)
        out[p + "o.weight"] = get(a + "o_proj.weight")
        if cfg.attention_bias and cfg.model_type != "qwen2":
            out[p + "o.bias"] = get(a + "o_proj.bias")
        m = p + "mlp."
        out[p + "gate_up.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")], 0)
        out[p + "down.weight"] = get(m + "down_proj.weight")
        if cfg.mlp_bias:
            out[p + "gate_up.bias"] = torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")], 0)
            out[p + "down.bias"] = get(m + "down_proj.bias")
    return out
