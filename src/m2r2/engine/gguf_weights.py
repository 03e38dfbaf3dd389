"""The GGUF file's own block weights on a loaded model (``m2r2.load(weights="gguf")``): each linear layer gets
its rows' blocks as the file stores them (memory-mapped reads, copied once into the layer's fused layout), for
the ``gguf`` weight format (``engine/weights.py``: ``GGUFBlocks``).

Name mapping for Llama-family GGUFs: ``blk.N.attn_{q,k,v}`` -> the fused ``qkv`` rows, ``attn_output`` -> ``o``,
``ffn_{gate,up}`` -> ``gate_up``, ``ffn_down`` -> ``down``, ``output`` (or the tied ``token_embd``) -> the LM head.
llama.cpp's converter permutes the rows of q and k for its RoPE layout (per head, the two rotation halves
interleaved); whole rows move, so the Hugging Face order is restored by indexing rows (``blocks.unpermute_qk_rows``),
blocks and all. The kernels run every format of ``native.BLOCK_KINDS`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K);
a fused linear whose parts differ (Q4_K_M files keep v in Q6_K beside q and k in Q4_K) runs as row segments.
A tensor in any other format (F16, Q2_K, IQ*) is refused clearly.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UnsupportedModelError
from . import native
from .blocks import BLOCK_FORMATS, dequantize, gguf_architecture, read_gguf_tensors, unpermute_qk_rows

# GGUF architectures whose q/k rows llama.cpp's converter permutes for its RoPE (LlamaModel.permute; Mistral is
# written as "llama" too); Qwen2 and the others keep Hugging Face's order, as transformers' GGUF loader assumes
PERMUTED_QK = ("llama",)


def _qk_permuted(path) -> bool:
    return gguf_architecture(path) in PERMUTED_QK

@dataclass
class BlockWeight:
    """A linear layer's GGUF blocks (``lin.lowp["gguf"]``): ``parts``, (format, (rows, bytes per row) uint8 blocks)
    in output-row order, one part unless the fused rows mix formats; ``kind`` and ``native`` are what the kernels
    read (the one part's blocks, or a segment table over the parts)."""
    parts: list[tuple[str, torch.Tensor]]
    kind: int = field(init=False)
    native: torch.Tensor = field(init=False)

    def __post_init__(self):
        if len(self.parts) == 1:
            self.kind, self.native = native.BLOCK_KINDS[self.parts[0][0]], self.parts[0][1]
        else:
            self.kind, self.native = native.KIND_SEGMENTS, native.segment_table(self.parts)

    @property
    def formats(self) -> list[str]:
        return [f for f, _ in self.parts]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for _, b in self.parts)

    GEMM_ROWS = 128  # from this many rows (a long prefill, compute-bound) the weight is dequantised for a GEMM

    def dense(self, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (out, in): exactly the reference dequantiser's values (``blocks.dequantize``), through
        the native kernels where they are built (into ``out``, (rows, in) float32 contiguous, if given)."""
        if native.available():
            if out is None:
                return torch.cat([native.qdequant(b, f, b.shape[0], in_features) for f, b in self.parts])
            at = 0
            for f, b in self.parts:
                native.qdequant(b, f, b.shape[0], in_features, out[at:at + b.shape[0]])
                at += b.shape[0]
            return out
        w = torch.from_numpy(np.concatenate([dequantize(b.numpy(), f.upper()) for f, b in self.parts]))
        return w if out is None else out.copy_(w)

    def product(self, x2: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        rows = x2.shape[0]
        if rows < self.GEMM_ROWS and not _PREFILL.get():
            return native.qgemv_kind(x2, self.native, self.kind, bias, out_features)
        # a prefill: exactly the float32 weights (dequantised into this thread's buffer), then a GEMM
        return gemm(x2, self.dense(x2.shape[1], _dequant_buffer(out_features, x2.shape[1])), bias)


# ---- prefills: dequantise + GEMM ----
# A prompt's products are compute-bound: oneDNN's GEMM runs them at ~95% of this CPU's float32 multiply-add rate
# (measured: gate_up 3072 x 576, 100 rows, 0.76 ms; the block kernels 2.69 ms, PyTorch's default GEMM 1.77 ms),
# and dequantising the weight first costs ~0.06 ms. The GEMM sums in its own order, so a row's bits depend on the
# rows beside it: it serves prompt prefills only (``prefill_products``, set by ``Transformer.hidden`` for a
# prompt's forward of ``GGUFBlocks.prefill_rows`` or more tokens per sequence), never decode steps, whose rows must
# not depend on each other (batched serving, speculative verification: m2r2.engine.native).
_PREFILL: contextvars.ContextVar[bool] = contextvars.ContextVar("m2r2_gguf_prefill", default=False)
_buffers = threading.local()


@contextlib.contextmanager
def prefill_products(on: bool = True):
    """Inside the block (this thread), block products dequantise their weight for a GEMM (a prompt's forward)."""
    token = _PREFILL.set(on)
    try:
        yield
    finally:
        _PREFILL.reset(token)


def _dequant_buffer(rows: int, cols: int) -> torch.Tensor:
    """This thread's reusable float32 (rows, cols) buffer for a dequantised weight (grown, never shrunk: a fresh
    allocation of megabytes per product costs its page faults every time)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _buffers.buf = torch.empty(rows * cols, dtype=torch.float32)
    return buf[: rows * cols].view(rows, cols)


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (N, in) @ w (out, in)^T + bias in float32: oneDNN's inner product where PyTorch has it (AVX-512 where the CPU
    has it, on any vendor's CPU), else PyTorch's GEMM."""
    if _onednn_ok():
        return torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [None], "")
    return torch.nn.functional.linear(x2, w, bias)


def _blocks(tensors: dict, name: str) -> tuple[str, np.ndarray]:
    t = tensors.get(name)
    if t is None:
        raise UnsupportedModelError(f"the GGUF has no tensor {name}")
    kind = t.format.lower()  # native.BLOCK_KINDS: the block formats the kernels run so far
    if kind not in native.BLOCK_KINDS:
        raise UnsupportedModelError(f"{name} is {t.format}; weights='gguf' runs "
                                    f"{', '.join(k.upper() for k in native.BLOCK_KINDS)} blocks so far")
    return kind, t.raw


def gguf_state_dict(path, cfg) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF model that are neither linear weights nor the embedding (``embedding_blocks``), by
    m2r2 name, straight from the file: the norms and any biases (q/k rows in Hugging Face order, as the blocks).
    What ``Transformer.load_dense(..., linear_weights=False)`` takes."""
    tensors = read_gguf_tensors(path)
    permuted = _qk_permuted(path)

    def get(name: str, optional: bool = False) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            raise UnsupportedModelError(f"the GGUF has no tensor {name}")
        return torch.from_numpy(np.ascontiguousarray(t.dequantize(), dtype=np.float32))

    out = {"norm.weight": get("output_norm.weight")}
    for i in range(cfg.num_layers):
        p, q = f"blk.{i}.", f"layers.{i}."
        out[q + "input_norm.weight"] = get(p + "attn_norm.weight")
        out[q + "post_norm.weight"] = get(p + "ffn_norm.weight")
        qb, kb, vb = (get(p + f"attn_{n}.bias", True) for n in "qkv")
        if qb is not None and kb is not None and vb is not None:
            if permuted:
                qb = torch.from_numpy(unpermute_qk_rows(qb.numpy()[:, None], cfg.num_heads)[:, 0].copy())
                kb = torch.from_numpy(unpermute_qk_rows(kb.numpy()[:, None], cfg.num_kv_heads)[:, 0].copy())
            out[q + "qkv.bias"] = torch.cat([qb, kb, vb])
        for src, dst in (("attn_output.bias", "o.bias"), ("ffn_down.bias", "down.bias")):
            b = get(p + src, True)
            if b is not None:
                out[q + dst] = b
        gb, ub = get(p + "ffn_gate.bias", True), get(p + "ffn_up.bias", True)
        if gb is not None and ub is not None:
            out[q + "gate_up.bias"] = torch.cat([gb, ub])
    return out


def embedding_blocks(path, cfg) -> tuple[str, np.ndarray]:
    """The token embedding as the GGUF stores it: (format, (vocab, bytes per row) uint8), a view of the mapped file
    (``attach_gguf_blocks`` swaps in the LM head's copy where the two are tied)."""
    t = read_gguf_tensors(path).get("token_embd.weight")
    if t is None or t.shape != (cfg.vocab_size, cfg.hidden_size):
        raise UnsupportedModelError(f"the GGUF's token embedding {None if t is None else t.shape} does not fit "
                                    f"vocab {cfg.vocab_size} x hidden {cfg.hidden_size}")
    return t.format, np.ascontiguousarray(t.raw)


def unsupported(path) -> str | None:
    """Why the block kernels cannot run the GGUF at ``path`` (a linear layer stored in a format they do not
    read, e.g. F16 or Q2_K), or None when they can (then ``m2r2.load`` runs its blocks by default)."""
    for name, t in read_gguf_tensors(path).items():
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2 \
                and t.format.lower() not in native.BLOCK_KINDS:
            return f"{name} is {t.format}"
    return None


def attach_gguf_blocks(model, path) -> None:
    """Give every linear layer of ``model`` (loaded from the GGUF at ``path``) its blocks from the file."""
    cfg = model.cfg
    tensors = read_gguf_tensors(path)
    permuted = _qk_permuted(path)

    def put(lin, parts: list[tuple[str, np.ndarray]]) -> None:
        merged: list[tuple[str, list[np.ndarray]]] = []  # consecutive parts of one format become one segment
        for kind, data in parts:
            if merged and merged[-1][0] == kind:
                merged[-1][1].append(data)
            else:
                merged.append((kind, [data]))
        segs = [(k, torch.from_numpy(np.ascontiguousarray(np.concatenate(ds, 0)))) for k, ds in merged]
        for k, b in segs:
            f = BLOCK_FORMATS[k.upper()]
            if lin.in_features % f.weights_per_block or b.shape[1] != lin.in_features // f.weights_per_block * f.bytes_per_block:
                raise UnsupportedModelError(f"GGUF {k.upper()} blocks of {b.shape[1]} bytes per row do not fit a layer "
                                            f"of {lin.in_features} inputs")
        if sum(b.shape[0] for _, b in segs) != lin.out_features:
            raise UnsupportedModelError(f"GGUF blocks of {sum(b.shape[0] for _, b in segs)} rows do not fit a layer of "
                                        f"{lin.out_features} outputs")
        lin.lowp["gguf"] = BlockWeight(segs)

    for i, blk in enumerate(model.layers):
        p = f"blk.{i}."
        kq, q = _blocks(tensors, p + "attn_q.weight")
        kk, k = _blocks(tensors, p + "attn_k.weight")
        kv, v = _blocks(tensors, p + "attn_v.weight")
        if permuted:
            q, k = unpermute_qk_rows(q, cfg.num_heads), unpermute_qk_rows(k, cfg.num_kv_heads)
        put(blk.qkv, [(kq, q), (kk, k), (kv, v)])
        put(blk.o, [_blocks(tensors, p + "attn_output.weight")])
        put(blk.gate_up, [_blocks(tensors, p + "ffn_gate.weight"), _blocks(tensors, p + "ffn_up.weight")])
        put(blk.down, [_blocks(tensors, p + "ffn_down.weight")])
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    put(model.lm_head, [_blocks(tensors, head)])
    emb = model.__dict__.get("_embed_blocks")
    if head == "token_embd.weight" and emb is not None:  # tied: the embedding rows are the head's blocks, one copy
        fmt, blocks = model.lm_head.lowp["gguf"].parts[0]
        if fmt.upper() == emb[0].upper() and tuple(blocks.shape) == emb[1].shape:
            model.__dict__["_embed_blocks"] = (emb[0], blocks.numpy())
