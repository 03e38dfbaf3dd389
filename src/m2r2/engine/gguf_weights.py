"""The GGUF file's own block weights on a loaded model (``m2r2.load(weights="gguf")``): each linear layer gets
its rows' blocks as the file stores them (memory-mapped reads, copied once into the layer's fused layout), for
the ``gguf`` weight format (``engine/weights.py``: ``GGUFBlocks``).

Name mapping for Llama-family GGUFs: ``blk.N.attn_{q,k,v}`` -> the fused ``qkv`` rows, ``attn_output`` -> ``o``,
``ffn_{gate,up}`` -> ``gate_up``, ``ffn_down`` -> ``down``, ``output`` (or the tied ``token_embd``) -> the LM head.
llama.cpp's converter permutes the rows of q and k for its RoPE layout (per head, the two rotation halves
interleaved); whole rows move, so the Hugging Face order is restored by indexing rows (``hf_rows``), blocks and
all. Supported block formats: Q4_1 and Q8_0 (the embedded model's); any other is refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnsupportedModelError
from . import native

BLOCK_TYPES = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def hf_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Index i of the result is the GGUF row holding Hugging Face row i of a q or k projection (llama.cpp's
    converter reshapes the rows to (heads, 2, head_dim/2) and swaps the last two axes)."""
    gguf_of = np.arange(n_rows).reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)
    out = np.empty(n_rows, dtype=np.int64)
    out[gguf_of] = np.arange(n_rows)  # GGUF row j holds HF row gguf_of[j]
    return out


def _tensors(path) -> dict:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file
        raise UnsupportedModelError(f"cannot read {path} as GGUF: {e}") from None
    return {t.name: t for t in reader.tensors}


def _blocks(tensors: dict, name: str, rows: int) -> tuple[str, np.ndarray]:
    t = tensors.get(name)
    if t is None:
        raise UnsupportedModelError(f"the GGUF has no tensor {name}")
    kind = BLOCK_TYPES.get(t.tensor_type.name)
    if kind is None:
        raise UnsupportedModelError(f"{name} is {t.tensor_type.name}; weights='gguf' runs Q4_1 and Q8_0 blocks "
                                    f"({', '.join(BLOCK_TYPES)}) so far")
    data = np.asarray(t.data).reshape(rows, -1)
    return kind, data


def attach_gguf_blocks(model, path) -> None:
    """Give every linear layer of ``model`` (loaded from the GGUF at ``path``) its blocks from the file."""
    cfg = model.cfg
    tensors = _tensors(path)

    def put(lin, parts: list[tuple[str, np.ndarray]]) -> None:
        kinds = {k for k, _ in parts}
        if len(kinds) != 1:
            raise UnsupportedModelError(f"fused rows of mixed block formats {sorted(kinds)} are not supported")
        blocks = torch.from_numpy(np.ascontiguousarray(np.concatenate([d for _, d in parts], 0)))
        _, bb = native.BLOCK_KINDS[parts[0][0]]
        if tuple(blocks.shape) != (lin.out_features, lin.in_features // 32 * bb):
            raise UnsupportedModelError(f"GGUF blocks {tuple(blocks.shape)} do not fit a {lin.out_features} x "
                                        f"{lin.in_features} layer")
        lin.lowp["gguf"] = (parts[0][0], blocks)

    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, blk in enumerate(model.layers):
        p = f"blk.{i}."
        kq, q = _blocks(tensors, p + "attn_q.weight", q_rows)
        kk, k = _blocks(tensors, p + "attn_k.weight", kv_rows)
        kv, v = _blocks(tensors, p + "attn_v.weight", kv_rows)
        q, k = q[hf_rows(q_rows, cfg.num_heads)], k[hf_rows(kv_rows, cfg.num_kv_heads)]
        put(blk.qkv, [(kq, q), (kk, k), (kv, v)])
        put(blk.o, [_blocks(tensors, p + "attn_output.weight", cfg.hidden_size)])
        put(blk.gate_up, [_blocks(tensors, p + "ffn_gate.weight", cfg.intermediate_size),
                          _blocks(tensors, p + "ffn_up.weight", cfg.intermediate_size)])
        put(blk.down, [_blocks(tensors, p + "ffn_down.weight", cfg.hidden_size)])
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    put(model.lm_head, [_blocks(tensors, head, cfg.vocab_size)])
