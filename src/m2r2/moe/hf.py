"""Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, OLMoE) on m2r2's blocks.

The attention, norms and RoPE are the engine's Llama-family ``Block`` (Qwen2-MoE: q/k/v biases; OLMoE: an
RMSNorm over the whole q and k projections before RoPE, added here); the sparse FFN is an ``MoEFFN`` with
softmax routing, whose experts become flat buffers in the model's ``bank``, so the same expert cache,
loader and prefetch strategies run on them (on a GPU the bank stays in host memory and slots live on the
device). Numerics follow transformers' implementations: softmax in float32, top-k, renormalised for
Mixtral (and when ``norm_topk_prob``), experts summed in ascending id order, Qwen2-MoE's shared expert
added with its sigmoid gate.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..engine.config import ModelConfig
from ..errors import UnsupportedModelError
from ..engine.model import RMSNorm, Transformer, hf_state_dict_to_m2r2
from .layers import MoEBlock, MoEFFN, MoEModel, MoESpec, SharedMLP, pack_expert

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "olmoe")


class QKNormBlock(MoEBlock):
    """OLMoE: RMSNorm over the full q and k projections (all heads at once), then RoPE."""

    def qkv_proj(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        qkv = self.qkv(x)
        q = self.q_norm(qkv[..., : c.q_size])
        k = self.k_norm(qkv[..., c.q_size: c.q_size + c.kv_size])
        qk = torch.cat([q, k], -1).view(B, T, c.num_heads + c.num_kv_heads, c.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        qk = qk * cos + torch.roll(qk, c.head_dim // 2, dims=-1) * sin
        v = qkv[..., c.q_size + c.kv_size:].view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return qk[:, :, : c.num_heads].transpose(1, 2), qk[:, :, c.num_heads:].transpose(1, 2), v


def _expert(get, p: str, e: int, n: int):
    """(gate (n, D), up (n, D), down (D, n)) of expert e, from any of the three layouts: transformers' fused
    in-memory tensors, the per-expert checkpoint tensors (Qwen2-MoE, OLMoE), or Mixtral's w1/w3/w2."""
    try:
        gu, down = get(p + "experts.gate_up_proj"), get(p + "experts.down_proj")  # (E, 2n, D), (E, D, n)
        return gu[e, :n], gu[e, n:], down[e]
    except UnsupportedModelError:
        pass
    q = f"{p}experts.{e}."
    try:
        return get(q + "gate_proj.weight"), get(q + "up_proj.weight"), get(q + "down_proj.weight")
    except UnsupportedModelError:
        return get(q + "w1.weight"), get(q + "w3.weight"), get(q + "w2.weight")


def is_hf_moe(path: str | os.PathLike) -> bool:
    import json
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text()).get("model_type") in MOE_MODEL_TYPES
    except (OSError, ValueError):
        return False


def load_hf_moe(path: str | os.PathLike, threads: int | None = None, max_positions: int | None = None) -> MoEModel:
    """A local Mixtral / Qwen2-MoE / OLMoE directory as an ``MoEModel`` (float32; all experts resident until a
    budgeted provider is set). ``moe.tokenizer`` is the checkpoint's tokenizer or None."""
    from transformers import AutoConfig

    from ..engine.loading import _eos_ids, _load_state_dict, _load_tokenizer, rope_table

    d = Path(path)
    try:
        hf = AutoConfig.from_pretrained(str(d))
    except Exception as e:
        raise UnsupportedModelError(f"{d}/config.json is not a valid model config: {e}") from e
    mt = hf.model_type
    if mt not in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type={mt!r} is not an MoE m2r2 supports ({', '.join(MOE_MODEL_TYPES)})")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={hf.hidden_act!r} is not supported (only 'silu')")
    if mt == "qwen2_moe":
        if getattr(hf, "mlp_only_layers", []) or getattr(hf, "decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError("Qwen2-MoE with dense (mlp_only) layers is not supported")
        E, k, n = hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size
    elif mt == "mixtral":
        E, k, n = hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size
    else:
        E, k, n = hf.num_experts, hf.num_experts_per_tok, hf.intermediate_size
    if getattr(hf, "clip_qkv", None) is not None:
        raise UnsupportedModelError("clip_qkv is not supported")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    eos = _eos_ids(d, hf)
    cfg = ModelConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=n,
                      num_layers=hf.num_hidden_layers, num_heads=heads,
                      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      rms_norm_eps=float(hf.rms_norm_eps),
                      max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
                      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                      attention_bias=mt == "qwen2_moe" or bool(getattr(hf, "attention_bias", False)),
                      model_type="qwen2" if mt == "qwen2_moe" else "llama",
                      bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos,
                      pad_token_id=getattr(hf, "pad_token_id", None))
    n_pos = min(cfg.max_position_embeddings, max_positions or cfg.max_position_embeddings, 1 << 17)
    model = Transformer(cfg, rope_table(hf, n_pos), threads)
    sd = _load_state_dict(d)

    def get(name):
        for key in (name, "model." + name):
            if key in sd:
                return sd[key]
        raise UnsupportedModelError(f"the weights in {d} lack tensor {name!r}")

    D = cfg.hidden_size
    # the dense part through the engine's own mapping; the (unused) dense FFN slots get placeholders
    for i in range(cfg.num_layers):
        sd.setdefault(f"model.layers.{i}.mlp.gate_proj.weight", torch.zeros(n, D))
        sd.setdefault(f"model.layers.{i}.mlp.up_proj.weight", torch.zeros(n, D))
        sd.setdefault(f"model.layers.{i}.mlp.down_proj.weight", torch.zeros(D, n))
    try:
        model.load_dense(hf_state_dict_to_m2r2(sd, cfg))
    except (KeyError, ValueError, RuntimeError) as e:
        raise UnsupportedModelError(f"weights in {d} do not fit the config: {e}") from e
    spec = MoESpec(E, k, n, D, routing="softmax", norm_topk=mt == "mixtral" or bool(getattr(hf, "norm_topk_prob", False)))
    bank = {}
    for i, blk in enumerate(model.layers):
        p = f"layers.{i}.mlp."
        if mt == "mixtral" and any(k.endswith(f"layers.{i}.block_sparse_moe.gate.weight") for k in sd):
            p = f"layers.{i}.block_sparse_moe."  # the checkpoint (hub) layout of Mixtral
        for e in range(E):
            bank[(i, e)] = pack_expert(*_expert(get, p, e, n)).float()
        shared = shared_gate = None
        if mt == "qwen2_moe":
            si = hf.shared_expert_intermediate_size
            shared = SharedMLP(D, si)
            shared.gate.weight.data.copy_(get(p + "shared_expert.gate_proj.weight"))
            shared.up.weight.data.copy_(get(p + "shared_expert.up_proj.weight"))
            shared.down.weight.data.copy_(get(p + "shared_expert.down_proj.weight"))
            shared_gate = torch.nn.Linear(D, 1, bias=False)
            shared_gate.weight.data.copy_(get(p + "shared_expert_gate.weight"))
        ffn = MoEFFN(i, spec, shared, shared_gate)
        ffn.router.weight.data.copy_(get(p + "gate.weight"))
        if mt == "olmoe":
            blk.q_norm = RMSNorm(cfg.q_size, cfg.rms_norm_eps)
            blk.k_norm = RMSNorm(cfg.kv_size, cfg.rms_norm_eps)
            blk.q_norm.weight.data.copy_(get(f"layers.{i}.self_attn.q_norm.weight"))
            blk.k_norm.weight.data.copy_(get(f"layers.{i}.self_attn.k_norm.weight"))
            model.layers[i] = QKNormBlock(blk, ffn)
        else:
            model.layers[i] = MoEBlock(blk, ffn)
    model = model.float().eval().requires_grad_(False)
    moe = MoEModel(model, spec, bank, {"kind": mt, "path": str(d)})
    moe.tokenizer = _load_tokenizer(d)
    return moe
