"""2-model speculative decoding: a small draft model with the target's tokenizer, distilled from it.

The draft model is the target cut down to a few of its layers (``layers``, e.g. the first three and the
last) with its embedding, final norm and tied LM head, fine-tuned by KL towards the full model on the
self-distillation data. Only low-rank deltas (LoRA on every linear of the kept layers) and the kept norms
are trained, so the shipped artifact is a few hundred kB of float16 that references the target's own
weights: ``DraftModel.build`` merges the deltas into a copy of the kept layers and returns an ordinary
engine ``Transformer`` (same blocks, packed layouts and KV cache as the target).

``DraftModelDrafter`` runs it with its own KV cache: the committed context is mirrored into the draft
cache (prefill at setup; afterwards only the tokens the draft cache has not seen, usually the pending token
and at most one accepted draft it never ran), then it decodes ``gamma`` tokens autoregressively, greedy or
sampled (its distributions are the proposals of rejection sampling), optionally over a reduced vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError
from ...artifacts import load_artifact, save_artifact
from ..loop import DecodeState
from .base import Draft, Drafter, DraftHead, layer_bytes
from ...engine.model import Linear, Transformer

WEIGHTS, CONFIG = "draft.safetensors", "draft.json"


class LoRALinear(nn.Module):
    """An engine ``Linear`` (frozen) plus a trainable low-rank delta ``B A`` (B starts at zero)."""

    def __init__(self, base: Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()

    def delta(self) -> torch.Tensor:
        return self.b @ self.a  # (out, in)


LINEARS = ("qkv", "o", "gate_up", "down")
NORMS = ("input_norm", "post_norm")


def cut(target: Transformer, layers: list[int]) -> Transformer:
    """A new engine Transformer made of ``layers`` of ``target`` (copied), its embedding, norm and head."""
    L = target.cfg.num_layers
    if not layers or any(not 0 <= i < L for i in layers) or sorted(set(layers)) != list(layers):
        raise AdapterError(f"draft layers must be increasing indices in [0, {L}), got {layers}")
    cfg = dataclasses.replace(target.cfg, num_layers=len(layers))
    threads = max(b.qkv.parts for b in target.layers)
    m = Transformer(cfg, (target.rope_cos, target.rope_sin), threads=threads)
    sd = {}
    target.materialize(layers)  # a model run from GGUF blocks: the float32 weights this cut copies
    full = target.state_dict()
    for new, old in enumerate(layers):
        for k, v in full.items():
            pre = f"layers.{old}."
            if k.startswith(pre):
                sd[f"layers.{new}." + k[len(pre):]] = v
    for k in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        sd[k] = full[k]
    # the target's packed layouts are copied as they are (same in_features, same parts)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AdapterError(f"draft cut failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for mod in m.modules():
        if isinstance(mod, Linear):
            mod.build_row_layout()
    return m.to(target.embed_tokens.weight.dtype)


def trained_shapes(m: Transformer, rank: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``DraftModel.trained_state`` for a cut ``m`` and LoRA ``rank`` (what draft.json implies)."""
    out: dict[str, tuple[int, ...]] = {}
    for i, blk in enumerate(m.layers):
        for name in LINEARS:
            lin: Linear = getattr(blk, name)
            pre = f"model.layers.{i}.{name}."
            out[pre + "a"], out[pre + "b"] = (rank, lin.in_features), (lin.out_features, rank)
        for name in NORMS:
            out[f"model.layers.{i}.{name}.weight"] = tuple(getattr(blk, name).weight.shape)
    out["model.norm.weight"] = tuple(m.norm.weight.shape)
    return out


class DraftModel(nn.Module):
    """The trainable form: a cut of the target with LoRA on its linears and trainable norms."""

    def __init__(self, target: Transformer, layers: list[int], rank: int = 32, base_identity: str | None = None):
        super().__init__()
        self.layers_kept, self.rank, self.base_identity = list(layers), rank, base_identity
        self.model = cut(target, layers).requires_grad_(False)
        for blk in self.model.layers:
            for name in LINEARS:
                setattr(blk, name, LoRALinear(getattr(blk, name), rank))
            for name in NORMS:
                getattr(blk, name).weight.requires_grad_(True)
        self.model.norm.weight.requires_grad_(True)
        self.training_info: dict = {}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What is shipped: LoRA factors and the kept layers' norms (the rest is the target's)."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
        cfg = {"kind": "draft-model", "format": 1, "layers": self.layers_kept, "rank": self.rank,
               "base_identity": self.base_identity, "training": self.training_info}
        return save_artifact(path, "draft", self.trained_state(), cfg, dtype=dtype)

    @staticmethod
    def build(path: str | os.PathLike, target: Transformer, identity: str | None = None) -> Transformer:
        """The inference form: deltas merged into a cut of ``target`` (an ordinary engine Transformer)."""
        def parse(cfg: dict) -> dict:
            layers, rank = cfg["layers"], cfg["rank"]
            if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers) \
                    or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise AdapterError(f"{Path(path) / CONFIG}: layers must be a list of integers and rank a positive integer")
            return cfg

        cuts = []

        def expected(cfg: dict) -> dict:
            cuts.append(cut(target, cfg["layers"]))
            return trained_shapes(cuts[0], cfg["rank"])

        _, trained = load_artifact(path, "draft", "draft model", parse=parse, identity=identity, expected=expected)
        m = cuts[0]
        trained = {k: v.float() for k, v in trained.items()}
        with torch.no_grad():
            for i, blk in enumerate(m.layers):
                for name in LINEARS:
                    lin: Linear = getattr(blk, name)
                    pre = f"model.layers.{i}.{name}."
                    delta = trained[pre + "b"] @ trained[pre + "a"]
                    dense = lin.dense().float() + delta
                    lin.weight.copy_(Linear.pack(dense.to(lin.weight.dtype), lin.parts))
                    lin.build_row_layout()
                for name in NORMS:
                    getattr(blk, name).weight.copy_(trained[f"model.layers.{i}.{name}.weight"])
            m.norm.weight.copy_(trained["model.norm.weight"])
        return m.eval().requires_grad_(False)


def draft_loss(draft: DraftModel, ids: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               ) -> tuple[torch.Tensor, dict]:
    """KL(p_target || p_draft) at the scored positions of a right-padded batch ``ids`` (B, T)."""
    m = draft.model
    B, T = ids.shape
    cache = m.new_cache(B, T)
    ctx = m.context(cache, torch.arange(T).expand(B, T))
    x = m.embed(ids)
    for i in range(m.cfg.num_layers):
        x = m.layer(i, x, ctx)
    sel = mask.nonzero(as_tuple=True)
    logp = torch.log_softmax(m.head(x[sel]), -1)
    tgt = teacher_logp[sel]
    kl = (tgt.exp() * (tgt - logp)).sum(-1).mean()
    agree = float((logp.detach().argmax(-1) == tgt.argmax(-1)).float().mean())
    return kl, {"loss": float(kl.detach()), "agree": agree}


class DraftModelDrafter(Drafter):
    """Drafts with a small model of the same tokenizer and its own KV cache."""

    name = "draft-model"

    def __init__(self, draft: Transformer, vocab: torch.Tensor | None = None, name: str | None = None):
        self.model, self.vocab = draft, vocab
        self.name = name or self.name
        self.depth = draft.cfg.num_layers  # layers one draft token runs (bench accounting)
        self._head = None

    def setup(self, state: DecodeState) -> None:
        if self._head is None:
            self._head = DraftHead(self.model, self.vocab)
        d = self.model
        self.cache = d.new_cache(state.batch, state.cache.max_len)
        lens = state.prompt_lens
        T = int(lens.max())
        ids = torch.zeros(state.batch, T, dtype=torch.long)
        for b, p in enumerate(state.prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        ctx = d.context(self.cache, torch.arange(T).expand(state.batch, T))
        x = d.embed(ids)
        for i in range(d.cfg.num_layers):  # K/V only: no read-out needed
            x = d.layer(i, x, ctx)
        self.valid = lens.clone()  # per row: draft-cache slots [0, valid) hold the committed context
        self.calls = 0

    def stats(self) -> dict:
        return {"draft_calls": self.calls, "draft_depth": self.depth, "draft_vocab": self._head.size}

    def draft_bytes(self, model: Transformer) -> float:
        """The draft model's layers (blocks of the target's size) and its read-out rows, per draft token."""
        return layer_bytes(model) * self.depth + self._head.read_bytes()

    def _catch_up(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """The last T tokens of each row ending with the pending one at position n, T covering every
        committed token the draft cache has not seen (re-running a seen one rewrites the same K/V)."""
        n = state.cache.lengths
        valid = torch.minimum(self.valid, n)
        T = int((n - valid).max()) + 1
        ids = torch.empty(state.batch, T, dtype=torch.long)
        for b in range(state.batch):
            ctx = state.prompts[b] + state.out[b]  # ends with the pending token (live rows)
            nb = int(n[b])
            if len(ctx) == nb + 1:
                ids[b] = torch.tensor(ctx[nb + 1 - T: nb + 1])
            else:  # a finished row (its output was cut at EOS or budget): anything will do
                ids[b] = state.pending[b]
        return ids, n.view(-1, 1) - T + 1 + torch.arange(T)

    def draft(self, state: DecodeState, gamma: int):
        d, s, head = self.model, state.sampling, self._head
        ids, pos = self._catch_up(state)
        drafts, qs = [], []
        for j in range(gamma):
            ctx = d.context(self.cache, pos)
            x = d.embed(ids)
            for i in range(d.cfg.num_layers):
                x = d.layer(i, x, ctx)
            logits = head.logits(x[:, -1])
            self.calls += 1
            tok, q = head.pick(logits, s, state.generator)
            if q is not None:
                qs.append(head.scatter_full(q))
            drafts.append(tok)
            ids, pos = tok.view(-1, 1), pos[:, -1:] + 1
        # the draft cache now holds the context, the pending token and drafts 1..gamma-1
        self.valid = state.cache.lengths + gamma
        return Draft(torch.stack(drafts, 1), torch.stack(qs, 1) if qs else None)


def to_hf(draft: Transformer, hf_dir: str | os.PathLike):
    """The draft model as a transformers model (for ``generate(assistant_model=...)``): the target's HF
    config with fewer layers, the engine's fused weights split back into q/k/v and gate/up."""
    from transformers import AutoConfig, AutoModelForCausalLM
    c = draft.cfg
    if c.attention_bias or c.mlp_bias:
        raise AdapterError("draft -> transformers: biased models are not supported")
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    hf_cfg.num_hidden_layers = c.num_layers
    if getattr(hf_cfg, "layer_types", None) is not None:
        hf_cfg.layer_types = hf_cfg.layer_types[: c.num_layers]
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    sd = {"model.embed_tokens.weight": draft.embed_tokens.weight, "model.norm.weight": draft.norm.weight}
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = draft.lm_head.dense()
    q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
    for i, blk in enumerate(draft.layers):
        p = f"model.layers.{i}."
        qkv, gu = blk.qkv.dense(), blk.gate_up.dense()
        sd.update({p + "input_layernorm.weight": blk.input_norm.weight,
                   p + "post_attention_layernorm.weight": blk.post_norm.weight,
                   p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
                   p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": blk.o.dense(),
                   p + "mlp.gate_proj.weight": gu[:inter], p + "mlp.up_proj.weight": gu[inter:],
                   p + "mlp.down_proj.weight": blk.down.dense()})
    missing, unexpected = model.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()},
                                                strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise AdapterError(f"draft -> transformers failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if c.tie_word_embeddings:
        model.tie_weights()
    return model.eval().requires_grad_(False)
