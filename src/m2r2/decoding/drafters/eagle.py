"""An EAGLE-style draft head (Li et al. 2024, EAGLE-1: "Speculative Sampling Requires Rethinking Feature
Uncertainty"), a drafter for the shared speculative loop.

The head drafts at the level of the target's features: its input at position p is the target's final hidden state
f_p (the last block's output, before the final norm) concatenated with the embedding of the token at p+1, mapped
back to the hidden size by ``fc`` and run through one decoder layer of the target's shape (its own KV cache over
the positions it has seen); the output predicts f_{p+1}, which the target's own final norm and LM head read out
(over the frequent-token draft vocabulary) as the draft of token p+2. Drafting k tokens runs the layer k times, the
later steps feeding back the head's own predicted features.

Training (``eagle_loss``): self-distillation on the committed distillation data, teacher-forced: a smooth-L1
regression of the predicted feature on the target's next feature (in units of that feature's RMS) plus 0.1 x the
cross-entropy of the read-out on the target's own next token (the data are the target's greedy continuations), at
the scored positions.

The layer starts as a copy of the target's last block (fc as [0 | I] plus noise: the feature passes through), so an
untrained head drafts roughly what the target's last layer makes of its own output. The trained weights ship in
float16 beside the draft vocabulary (``eagle.safetensors``, ``eagle.json``, ``draft_vocab.json``).

Inference runs on the engine: the layer is an engine ``Block`` in a one-layer ``Transformer`` whose LM head is the
target's head restricted to the draft vocabulary, both run from Q8_0 blocks (``EagleHead.quantize``: the read-out
rows are the GGUF's own), so a one-row draft step is one native block call plus two small products. The target features come from the verification forward the drafter runs itself (``verify_forward``) and
from the prompt's prefill (``DecodeState.prefill_states``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...artifacts import load_artifact, save_artifact
from ...engine.model import Linear, Transformer
from ...errors import AdapterError
from ..loop import DecodeState
from .base import Draft, Drafter, FinalStates, pick_draft, scatter_full

STEM = "eagle"
LINEARS = ("qkv", "o", "gate_up", "down")
NORMS = ("input_norm", "post_norm")


def head_row_blocks(target: Transformer, vocab: torch.Tensor):
    """Rows ``vocab`` of the target's LM head as GGUF blocks (a ``BlockWeight`` of one format), where it has them."""
    from ...engine.gguf_weights import BlockWeight
    bw = target.lm_head.lowp.get("gguf")
    if bw is None or len(bw.parts) != 1:
        return None
    fmt, raw = bw.parts[0]
    return BlockWeight([(fmt, raw[vocab].contiguous())])


def head_rows(target: Transformer, vocab: torch.Tensor) -> torch.Tensor:
    """Rows ``vocab`` of the target's LM head as float32 (K, D): dequantised from its GGUF blocks when it runs from
    them (only those rows), else from its float32 weight."""
    lin = target.lm_head
    rows = head_row_blocks(target, vocab) if lin.weight.numel() == 0 else None
    return rows.dense(lin.in_features) if rows is not None else lin.dense()[vocab].float().contiguous()


class EagleHead(nn.Module):
    """fc (2D -> D) + one decoder layer of the target's shape, read out by the target's norm and head rows ``vocab``
    (a one-layer engine Transformer ``net`` whose vocabulary is the draft vocabulary)."""

    def __init__(self, target: Transformer, vocab: torch.Tensor | None = None, base_identity: str | None = None,
                 init_from_target: bool = True):
        super().__init__()
        cfg = target.cfg
        D = cfg.hidden_size
        self.vocab = (torch.arange(cfg.vocab_size) if vocab is None else torch.as_tensor(vocab, dtype=torch.long))
        self.base_identity = base_identity
        self.training_info: dict = {}
        threads = max(b.qkv.parts for b in target.layers)
        net_cfg = dataclasses.replace(cfg, num_layers=1, vocab_size=len(self.vocab), tie_word_embeddings=False)
        net = Transformer(net_cfg, (target.rope_cos, target.rope_sin), threads=threads)
        net.embed_tokens.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # tokens embed through the target
        with torch.no_grad():
            net.norm.weight.copy_(target.norm.weight)
            net.lm_head.weight = nn.Parameter(Linear.pack(head_rows(target, self.vocab), net.lm_head.parts),
                                              requires_grad=False)
            net.lm_head.build_row_layout()
            blk, src = net.layers[0], target.layers[-1]
            for name in LINEARS:
                lin = getattr(blk, name)
                # (not from the target: zeros for ``load_trained`` to fill)
                w = getattr(src, name).dense() if init_from_target else torch.zeros(lin.out_features, lin.in_features)
                lin.weight = nn.Parameter(Linear.pack(w.detach().float().contiguous(), lin.parts))
                lin.build_row_layout()
            for name in NORMS:
                getattr(blk, name).weight.copy_(getattr(src, name).weight)
        net.norm.weight.requires_grad_(False)
        self.net = net
        self.fc = nn.Linear(2 * D, D)
        with torch.no_grad():  # [embedding | feature] -> feature, plus a little of the embedding
            self.fc.weight.normal_(0.0, 0.02 / (2 * D) ** 0.5)
            self.fc.weight[:, D:] += torch.eye(D)
            self.fc.bias.zero_()
        self.embed = target.embed  # the target's own embedding lookup (GGUF rows dequantised per lookup)

    def quantize(self, target: Transformer) -> "EagleHead":
        """Run the layer and the read-out from Q8_0 blocks (the GGUF block kernels; about a quarter of the float32
        bytes a draft step reads, which come from memory: the target's step between two drafts evicts them). The
        read-out rows are the target's own where it runs from Q8_0 blocks. Drafts only propose, so their rounding
        never changes the output. A no-op without the native kernels."""
        from ...engine import native
        from ...engine.blocks import quantize
        from ...engine.gguf_weights import BlockWeight
        if not native.available():
            return self

        def blocks(w: torch.Tensor) -> BlockWeight:
            return BlockWeight([("q8_0", torch.from_numpy(quantize(w.detach().float().numpy(), "Q8_0")))])

        blk = self.net.layers[0]
        for n in LINEARS:
            lin = getattr(blk, n)
            lin.lowp["gguf"] = blocks(lin.dense())
        own = head_row_blocks(target, self.vocab)
        self.net.lm_head.lowp["gguf"] = own if own is not None and own.formats == ["q8_0"] \
            else blocks(self.net.lm_head.dense())
        self.net.set_weights("gguf")
        return self

    def train(self, mode: bool = True) -> "EagleHead":
        """``eval()`` (mode False) also rebuilds the layer's derived copies (oneDNN's prepacked weights for several
        rows), which training leaves stale."""
        super().train(mode)
        if not mode:
            for n in LINEARS:
                getattr(self.net.layers[0], n).build_row_layout()
        return self

    # ---- the computation ----
    def features(self, f: torch.Tensor, next_ids: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """f (B, T, D) features at ``positions`` (B, T) and the ids of the tokens after them (B, T) -> the predicted
        features of the following positions (B, T, D), writing the layer's K/V at ``positions``."""
        e = self.embed(next_ids).to(f.dtype)
        x = self.fc(torch.cat([e, f], -1))
        ctx = self.net.context(cache, positions)
        return self.net.layer(0, x, ctx)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features (..., D) -> logits over the draft vocabulary (..., K)."""
        return self.net.head(h)

    def new_cache(self, batch: int, max_len: int):
        return self.net.new_cache(batch, max_len)

    def trainable(self) -> list[nn.Parameter]:
        blk = self.net.layers[0]
        return [*self.fc.parameters(), *(getattr(blk, n).weight for n in LINEARS),
                *(getattr(blk, n).weight for n in NORMS)]

    # ---- artifact ----
    def trained_state(self) -> dict[str, torch.Tensor]:
        blk = self.net.layers[0]
        sd = {"fc.weight": self.fc.weight.detach(), "fc.bias": self.fc.bias.detach()}
        for n in LINEARS:
            sd[f"layer.{n}.weight"] = getattr(blk, n).dense().detach().contiguous()
        for n in NORMS:
            sd[f"layer.{n}.weight"] = getattr(blk, n).weight.detach()
        return sd

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        cfg = {"kind": "eagle", "format": 1, "hidden_size": self.fc.out_features, "base_identity": self.base_identity,
               "training": self.training_info}
        return save_artifact(path, STEM, self.trained_state(), cfg, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, target: Transformer, vocab: torch.Tensor | None,
             identity: str | None = None, quantize: bool = True) -> "EagleHead":
        """The shipped (or trained) head for ``target``, its read-out over ``vocab``; ``quantize``: run from Q8_0
        blocks (``quantize``), as drafting does."""
        head = cls(target, vocab, identity, init_from_target=False)
        D = target.cfg.hidden_size

        def parse(cfg: dict) -> dict:
            if cfg.get("kind") != "eagle" or cfg.get("hidden_size") != D:
                raise AdapterError(f"{Path(path) / (STEM + '.json')}: not an EAGLE head for a model of hidden size {D}")
            return cfg

        cfg, sd = load_artifact(path, STEM, "EAGLE head", parse=parse, identity=identity,
                                expected={k: tuple(v.shape) for k, v in head.trained_state().items()})
        head.load_trained({k: v.float() for k, v in sd.items()})
        head.training_info = cfg.get("training", {})
        head = head.eval().requires_grad_(False)
        return head.quantize(target) if quantize else head

    def load_trained(self, sd: dict[str, torch.Tensor]) -> None:
        blk = self.net.layers[0]
        with torch.no_grad():
            self.fc.weight.copy_(sd["fc.weight"])
            self.fc.bias.copy_(sd["fc.bias"])
            for n in LINEARS:
                lin = getattr(blk, n)
                lin.weight.copy_(Linear.pack(sd[f"layer.{n}.weight"].float().contiguous(), lin.parts))
                lin.build_row_layout()
            for n in NORMS:
                getattr(blk, n).weight.copy_(sd[f"layer.{n}.weight"])


def eagle_loss(head: EagleHead, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               cls_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Teacher-forced loss on a right-padded batch: ``feats`` (B, T, D) the target's final hidden states, ``ids``
    (B, T), ``mask`` (B, T) the positions that will be drafted from (m2r2.training.adapters.make_batch). Entry p reads
    (f_p, token p+1) and predicts f_{p+1} (smooth L1) and token p+2 (cross-entropy over the draft vocabulary; a
    token outside it is not scored)."""
    B, T, _ = feats.shape
    pos = torch.arange(T - 1).expand(B, T - 1)
    pred = head.features(feats[:, :-1], ids[:, 1:], head.new_cache(B, T), pos)  # predicts f_1 .. f_{T-1}
    m = mask[:, 1:]  # position p+1 is drafted from
    tgt_f = feats[:, 1:][m]
    # in units of each target feature's RMS: the read-out sees the direction (through the final norm), and the last
    # block's outputs have a few dimensions far larger than the rest, which would otherwise own the loss
    rms = tgt_f.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    reg = F.smooth_l1_loss(pred[m] / rms, tgt_f / rms)
    # token p+2 for p <= T-3, in the draft vocabulary's indices
    full = torch.full((int(head.vocab.max()) + 1,), -100, dtype=torch.long)
    full[head.vocab] = torch.arange(len(head.vocab))
    nxt = ids[:, 2:].clamp_max(len(full) - 1)
    tgt = torch.where(ids[:, 2:] < len(full), full[nxt], torch.full_like(nxt, -100))
    mc = m[:, :-1] & (tgt != -100)
    if bool(mc.any()):
        logits = head.logits(pred[:, :-1][mc])
        cls = F.cross_entropy(logits, tgt[mc])
        agree = float((logits.detach().argmax(-1) == tgt[mc]).float().mean())
    else:
        cls, agree = pred.sum() * 0.0, 0.0
    loss = reg + cls_weight * cls
    return loss, {"loss": float(loss.detach()), "reg": float(reg.detach()), "cls": float(cls.detach()),
                  "agree": agree}


class EagleDrafter(Drafter):
    """Drafts a chain of tokens with an ``EagleHead`` from the target's features (see the module docstring)."""

    name = "eagle"

    def __init__(self, head: EagleHead):
        self.head = head

    def setup(self, state: DecodeState) -> None:
        B, D = state.batch, self.head.fc.out_features
        self.cache = self.head.new_cache(B, state.cache.max_len)
        self.feats = FinalStates(state, D)  # the target's features by position, known from feats.start on
        # the head's cache holds target-feature entries [feats.start, valid)
        self.valid = torch.full((B,), self.feats.start, dtype=torch.long)
        self.calls = 0

    def stats(self) -> dict:
        return {"draft_calls": self.calls, "draft_vocab": len(self.head.vocab)}

    def draft_bytes(self, model: Transformer) -> float:
        """What one draft token reads: the layer's and the read-out's weights (their blocks where quantised) and fc."""
        net = self.head.net

        def size(lin) -> int:
            bw = lin.lowp.get("gguf")
            return bw.nbytes if bw is not None and lin.mode == "gguf" else 4 * lin.weight.numel()
        blk = net.layers[0]
        return sum(size(getattr(blk, n)) for n in LINEARS) + size(net.lm_head) + 4 * self.head.fc.weight.numel()

    trees = True  # with ``branch`` > 1, each depth's next guesses become leaves of a draft tree

    def verify_forward(self, state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, tree=None) -> torch.Tensor:
        """The verification forward, keeping the target's features of its rows for the next draft."""
        return self.feats.forward(state, ids, positions, tree)

    def moved(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.feats.move(rows, src, dst)

    def draft(self, state: DecodeState, gamma: int) -> Draft:
        B, head, s = state.batch, self.head, state.sampling
        n = state.cache.lengths  # committed tokens; the pending one sits at position n
        T = max(1, int((n - self.valid).max()))  # (valid >= start: it starts there and then follows n)
        # entries p = n - T .. n - 1 of each row (a seen one is rewritten with the same values): (f_p, token p+1)
        pos = (n.view(-1, 1) - T + torch.arange(T)).clamp_min(self.feats.start)
        nxt = torch.empty(B, T, dtype=torch.long)
        for b in range(B):
            seq = state.prompts[b] + state.out[b]  # ends with the pending token (live rows)
            for j in range(T):
                p = int(pos[b, j]) + 1
                nxt[b, j] = seq[p] if p < len(seq) else state.pending[b]
        f = self.feats.at(pos)
        drafts, qs, leaves, keeps = [], [], [], []
        with torch.inference_mode():
            h = head.features(f, nxt, self.cache, pos)[:, -1:]  # the predicted feature at position n
            for j in range(gamma):
                logits = head.logits(h[:, 0])
                tok, q = pick_draft(logits, head.vocab, s, state.generator)
                if self.branch > 1:
                    alt, keep = self.guesses(logits, q, head.vocab, state.generator)
                    leaves.append(alt)
                    keeps.append(keep)
                self.calls += 1
                if q is not None:
                    qs.append(scatter_full(q, head.vocab, state.model.cfg.vocab_size))
                drafts.append(tok)
                if j + 1 < gamma:  # entry n + j: (predicted f_{n+j}, draft j+1)
                    h = head.features(h, tok.view(-1, 1), self.cache, (n + j).view(-1, 1))
        self.valid = n.clone()
        return Draft.from_depths(drafts, qs, leaves, keeps)
