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

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UnsupportedModelError
from . import native
from .blocks import BLOCK_FORMATS, read_gguf_tensors, unpermute_qk_rows

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

    def product(self, x2: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        return native.qgemv_kind(x2, self.native, self.kind, bias, out_features)


def _blocks(tensors: dict, name: str) -> tuple[str, np.ndarray]:
    t = tensors.get(name)
    if t is None:
        raise UnsupportedModelError(f"the GGUF has no tensor {name}")
    kind = t.format.lower()  # native.BLOCK_KINDS: the block formats the kernels run so far
    if kind not in native.BLOCK_KINDS:
        raise UnsupportedModelError(f"{name} is {t.format}; weights='gguf' runs "
                                    f"{', '.join(k.upper() for k in native.BLOCK_KINDS)} blocks so far")
    return kind, t.raw


def attach_gguf_blocks(model, path) -> None:
    """Give every linear layer of ``model`` (loaded from the GGUF at ``path``) its blocks from the file."""
    cfg = model.cfg
    tensors = read_gguf_tensors(path)

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
        q, k = unpermute_qk_rows(q, cfg.num_heads), unpermute_qk_rows(k, cfg.num_kv_heads)
        put(blk.qkv, [(kq, q), (kk, k), (kv, v)])
        put(blk.o, [_blocks(tensors, p + "attn_output.weight")])
        put(blk.gate_up, [_blocks(tensors, p + "ffn_gate.weight"), _blocks(tensors, p + "ffn_up.weight")])
        put(blk.down, [_blocks(tensors, p + "ffn_down.weight")])
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    put(model.lm_head, [_blocks(tensors, head)])
