"""The GGUF file's own block weights on a loaded model (``m2r2.load(weights="gguf")``): each linear layer gets
its rows' blocks as the file stores them (memory-mapped reads, copied once into the layer's fused layout), for
the ``gguf`` weight format (``engine/weights.py``: ``GGUFBlocks``).

Name mapping for Llama-family GGUFs: ``blk.N.attn_{q,k,v}`` -> the fused ``qkv`` rows, ``attn_output`` -> ``o``,
``ffn_{gate,up}`` -> ``gate_up``, ``ffn_down`` -> ``down``, ``output`` (or the tied ``token_embd``) -> the LM head.
llama.cpp's converter permutes the rows of q and k for its RoPE layout (per head, the two rotation halves
interleaved); whole rows move, so the Hugging Face order is restored by indexing rows (``blocks.unpermute_qk_rows``),
blocks and all. The kernels run Q4_1 and Q8_0 (the embedded model's) so far; any other is refused clearly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnsupportedModelError
from . import native
from .blocks import BLOCK_FORMATS, read_gguf_tensors, unpermute_qk_rows

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
        kinds = {k for k, _ in parts}
        if len(kinds) != 1:
            raise UnsupportedModelError(f"fused rows of mixed block formats {sorted(kinds)} are not supported")
        blocks = torch.from_numpy(np.ascontiguousarray(np.concatenate([d for _, d in parts], 0)))
        bb = BLOCK_FORMATS[parts[0][0].upper()].bytes_per_block
        if tuple(blocks.shape) != (lin.out_features, lin.in_features // 32 * bb):
            raise UnsupportedModelError(f"GGUF blocks {tuple(blocks.shape)} do not fit a {lin.out_features} x "
                                        f"{lin.in_features} layer")
        lin.lowp["gguf"] = (parts[0][0], blocks)

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
