"""GGUF block tensors, read memory-mapped, and m2r2's reference dequantisers for the common GGML block
formats: the specification the native block kernels follow.

A GGML quantised tensor is a sequence of rows; each row (``cols`` weights, a multiple of the format's block
size) is stored as ``cols / weights_per_block`` blocks of ``bytes_per_block`` bytes, one after another, and
a block only ever describes weights of its own row. ``BLOCK_FORMATS`` names each format's block layout; all
multi-byte fields are little-endian, ``f16`` is IEEE half precision. ``dequantize`` turns a ``(rows,
bytes_per_row)`` uint8 array into ``(rows, cols)`` float32, with one short per-format function that unpacks
each field in turn and does the float32 arithmetic in exactly the order of the ``gguf`` package's
``gguf.quants.dequantize`` (each product and sum rounded to float32, no fused multiply-add), so the two are
equal bit for bit (tests/test_blocks.py checks it on random blocks of every format and on the embedded
model's real tensors). A native kernel that wants the same bits must keep that order: for example Q4_1 is
``(d * q) + m``, two roundings, and Q4_K is ``(d * sc) * q - (dmin * m)``.

Bytes per weight (``BlockFormat.bytes_per_weight``; bits = 8x):

=======  ======  =====  ===============
format   block   bytes  bytes per weight
=======  ======  =====  ===============
Q4_0       32      18   0.5625   (4.5 bits)
Q4_1       32      20   0.625    (5 bits)
Q5_0       32      22   0.6875   (5.5 bits)
Q5_1       32      24   0.75     (6 bits)
Q8_0       32      34   1.0625   (8.5 bits)
Q4_K      256     144   0.5625   (4.5 bits)
Q6_K      256     210   0.8203125 (6.5625 bits)
=======  ======  =====  ===============

The embedded SmolLM2-135M-Instruct GGUF (98,362,432 bytes) as read by ``read_gguf_tensors``: 272 tensors;
210 Q4_1 block weights (the q/k/v/o and gate/up/down projections of 30 layers; 106,168,320 weights) in
66,355,200 bytes; the tied embedding / LM head ``token_embd.weight`` (49152 x 576, Q8_0) in 30,081,024 bytes;
61 F32 norm vectors in 140,544 bytes. The tensors' data is 96,576,768 bytes; the remaining 1,785,664 bytes
before the data are the header, metadata (the tokenizer's vocabulary and merges) and alignment padding.

``read_gguf_tensors`` maps the file (``gguf.GGUFReader``, ``np.memmap``) and copies nothing: each
``BlockTensor.raw`` is a view of the mapped file. GGUF lists a tensor's dimensions fastest-varying first
(``ne0`` = the number of columns, i.e. the input features of a projection); ``BlockTensor.shape`` is the
reverse, the model's ``(out_features, in_features)`` orientation of ``nn.Linear.weight`` (the embedding is
``(vocab, hidden)``).

Q/K row permutation. llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the
rows of every Llama ``q_proj`` and ``k_proj`` weight so that its RoPE, which rotates adjacent pairs
``(x[2i], x[2i+1])``, gives the same result as Hugging Face's "rotate half" RoPE, which pairs ``x[i]`` with
``x[i + head_dim/2]``. Within each head of ``head_dim`` rows, GGUF row ``2*i + half`` is HF row
``half * head_dim/2 + i`` (``i < head_dim/2``, ``half`` in {0, 1}); heads stay in place. q uses the number
of attention heads, k the number of key/value heads. transformers' GGUF loader undoes it on load (its
``reverse_permute``), so the float32 model m2r2 runs today has HF row order. Whole rows move, so
``unpermute_qk_rows`` applies equally to dequantised rows and to the raw block rows.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelNotFoundError, UnsupportedModelError


@dataclass(frozen=True)
class BlockFormat:
    name: str
    weights_per_block: int
    bytes_per_block: int
    layout: str  # one line: the block's fields in order, and how a weight's value is formed

    @property
    def bytes_per_weight(self) -> float:
        return self.bytes_per_block / self.weights_per_block


BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18,
                "f16 d, 16 bytes of nibbles (weight j < 16 is the low nibble of byte j, j >= 16 the high nibble "
                "of byte j-16); value d * (q - 8)"),
    BlockFormat("Q4_1", 32, 20,
                "f16 d, f16 m, 16 bytes of nibbles (weight j < 16 is the low nibble of byte j, j >= 16 the high "
                "nibble of byte j-16); value (d * q) + m"),
    BlockFormat("Q5_0", 32, 22,
                "f16 d, u32 qh (bit j is bit 4 of weight j), 16 bytes of nibbles (the low 4 bits, placed as in "
                "Q4_0); value d * (q - 16)"),
    BlockFormat("Q5_1", 32, 24,
                "f16 d, f16 m, u32 qh (bit j is bit 4 of weight j), 16 bytes of nibbles (the low 4 bits, placed "
                "as in Q4_0); value (d * q) + m"),
    BlockFormat("Q8_0", 32, 34,
                "f16 d, 32 int8 q (weight j is byte j); value q * d"),
    BlockFormat("Q4_K", 256, 144,
                "f16 d, f16 dmin, 12 bytes of 8 six-bit scales sc and mins m (s = bytes: for k < 4 sc[k] = "
                "s[k] & 63, m[k] = s[k+4] & 63; for k >= 4 sc[k] = (s[k+4] & 15) | (s[k-4] >> 6) << 4, m[k] = "
                "(s[k+4] >> 4) | (s[k] >> 6) << 4), 128 bytes of nibbles in 4 chunks of 32 bytes (chunk c: "
                "sub-block 2c of 32 weights in the low nibbles, sub-block 2c+1 in the high nibbles); weight j "
                "in sub-block k = j // 32: value (d * sc[k]) * q - (dmin * m[k])"),
    BlockFormat("Q6_K", 256, 210,
                "128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales, f16 d; two halves of "
                "128 weights, half h using ql[64h:64h+64] and qh[32h:32h+32]: weight 32k + l of a half "
                "(k < 4, l < 32) takes the low nibble of ql[l + 32(k % 2)] for k < 2 and the high nibble for "
                "k >= 2, and bits 2k..2k+1 of qh[l]; q = low | high << 4; weight j of the block: value "
                "(d * scale[j // 16]) * (q - 32)"),
)}

PLAIN_FORMATS = ("F32", "F16")  # unquantised tensors (the norms); "dequantising" them is a view / a cast


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian f16 at byte ``at`` of every block, as float32 (N, 1)."""
    bits = blocks[:, at].astype(np.uint16) | (blocks[:, at + 1].astype(np.uint16) << np.uint16(8))
    return bits.view(np.float16).astype(np.float32)[:, None]


def _u32(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian u32 at byte ``at`` of every block (N, 1)."""
    b = blocks[:, at:at + 4].astype(np.uint32)
    return (b[:, 0] | b[:, 1] << np.uint32(8) | b[:, 2] << np.uint32(16) | b[:, 3] << np.uint32(24))[:, None]


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values 0..15 (uint8): low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """A u32 per block (N, 1) -> bit j of it for j < 32 (N, 32), as uint8."""
    return ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = _nibbles32(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 4:20]).astype(np.float32)
    return (d * q) + m


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = _nibbles32(b[:, 6:22]) | (_fifth_bits(_u32(b, 2)) << np.uint8(4))
    return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 8:24]) | (_fifth_bits(_u32(b, 4)) << np.uint8(4))
    return (d * q.astype(np.float32)) + m


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8)
    return q.astype(np.float32) * d


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes per block -> the 8 six-bit scales and 8 six-bit mins (N, 8) each, uint8."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & np.uint8(63), (hi & np.uint8(15)) | ((lo >> np.uint8(6)) << np.uint8(4))], axis=1)
    mn = np.concatenate([mid & np.uint8(63), (hi >> np.uint8(4)) | ((mid >> np.uint8(6)) << np.uint8(4))], axis=1)
    return sc, mn


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    scale = d * sc.astype(np.float32)  # (N, 8): one per sub-block of 32 weights
    offset = dmin * mn.astype(np.float32)
    chunks = b[:, 16:144].reshape(n, 4, 1, 32)  # chunk c: sub-blocks 2c (low nibbles) and 2c+1 (high)
    q = np.concatenate([chunks & np.uint8(0x0F), chunks >> np.uint8(4)], axis=2).reshape(n, 8, 32)
    return (scale[:, :, None] * q.astype(np.float32) - offset[:, :, None]).reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # half, which 32-byte row of ql, byte
    qh = b[:, 128:192].reshape(n, 2, 1, 32)  # half, -, byte
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # (N, 16)
    d = _f16(b, 208)
    low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)  # (N, 2, 4, 32): k = 0..3
    high = (qh >> (np.arange(0, 8, 2, dtype=np.uint8)[:, None])) & np.uint8(3)  # (N, 2, 4, 32)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    scale = (d * scales)[:, :, None]  # (N, 16, 1): one per 16 weights
    return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
            "Q6_K": _q6_k}


def _format(fmt) -> str:
    name = getattr(fmt, "name", fmt)
    if name not in BLOCK_FORMATS and name not in PLAIN_FORMATS:
        raise UnsupportedModelError(
            f"unsupported tensor format {name!r}; m2r2 reads {', '.join((*BLOCK_FORMATS, *PLAIN_FORMATS))}")
    return name


def row_cols(raw: np.ndarray, fmt) -> int:
    """The number of weights in each row of ``raw`` (rows, bytes_per_row) in format ``fmt``."""
    name = _format(fmt)
    if name in PLAIN_FORMATS:
        size = 4 if name == "F32" else 2
        if raw.shape[-1] % size:
            raise UnsupportedModelError(f"{raw.shape[-1]} bytes per row is not a whole number of {name} values")
        return raw.shape[-1] // size
    f = BLOCK_FORMATS[name]
    if raw.shape[-1] % f.bytes_per_block:
        raise UnsupportedModelError(
            f"{raw.shape[-1]} bytes per row is not a whole number of {name} blocks of {f.bytes_per_block} bytes")
    return raw.shape[-1] // f.bytes_per_block * f.weights_per_block


def dequantize(raw: np.ndarray, fmt) -> np.ndarray:
    """uint8 ``raw`` (rows, bytes_per_row) in ``fmt`` (a ``BLOCK_FORMATS`` name or ``BlockFormat``, or
    "F32" / "F16") -> float32 (rows, cols), bit for bit what ``gguf.quants.dequantize`` gives."""
    name = _format(fmt)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"raw must be a 2-D uint8 array (rows, bytes_per_row), not {raw.dtype} {raw.shape}")
    rows, cols = raw.shape[0], row_cols(raw, name)
    if name in PLAIN_FORMATS:
        data = np.ascontiguousarray(raw).view(np.float32 if name == "F32" else np.float16)
        return data.astype(np.float32)
    f = BLOCK_FORMATS[name]
    blocks = np.ascontiguousarray(raw).reshape(-1, f.bytes_per_block)
    out = _DEQUANT[name](blocks)
    assert out.dtype == np.float32, (name, out.dtype)
    return out.reshape(rows, cols)


def quantize(w: np.ndarray, fmt) -> np.ndarray:
    """float32 ``w`` (rows, cols) -> uint8 (rows, bytes_per_row) in block format ``fmt`` (a ``BLOCK_FORMATS`` name), as
    the gguf package quantizes (for weights m2r2 derives itself: the EAGLE head's layer, MoE experts)."""
    import gguf
    name = _format(fmt)
    if name not in BLOCK_FORMATS:
        raise ValueError(f"quantize: {name} is not a block format")
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType[name])


def dequantize_rows(raw: np.ndarray, fmt, rows_idx) -> np.ndarray:
    """``dequantize(raw, fmt)[rows_idx]`` reading only the selected rows (an embedding gather): float32
    (len(rows_idx), cols)."""
    idx = np.asarray(rows_idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -raw.shape[0] or idx.max() >= raw.shape[0]):
        raise IndexError(f"row index out of range for {raw.shape[0]} rows")
    return dequantize(np.asarray(raw)[idx], fmt)


def qk_hf_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """The index permutation from llama.cpp's q/k row order to Hugging Face's: HF row ``r`` is GGUF row
    ``order[r]`` (so ``hf = gguf[order]``). ``n_heads`` is the attention heads for q, the kv heads for k."""
    if n_heads <= 0 or n_rows % n_heads or (n_rows // n_heads) % 2:
        raise ValueError(f"{n_rows} rows do not split into {n_heads} heads of an even head_dim")
    half = n_rows // n_heads // 2
    # GGUF rows of a head, viewed as (i, which half): row 2*i + h. HF wants (h, i): swap the two axes.
    return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(n_rows)


def unpermute_qk_rows(raw_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """A q or k projection's rows (raw block rows or dequantised rows, (rows, ...)) from llama.cpp's order
    back to Hugging Face's (a copy)."""
    return np.asarray(raw_rows)[qk_hf_row_order(raw_rows.shape[0], n_heads)]


@dataclass(frozen=True)
class BlockTensor:
    """One tensor of a GGUF file. ``shape`` is the model's orientation ((out_features, in_features) for a
    projection, (vocab, hidden) for the embedding, (n,) for a norm); ``raw`` is a read-only uint8 view of
    the mapped file, (rows, bytes_per_row) with rows = the product of all but the last dimension."""
    name: str
    format: str  # a BLOCK_FORMATS name, or "F32" / "F16"
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def dequantize(self) -> np.ndarray:
        """The float32 weight, shaped ``shape``."""
        return dequantize(self.raw, self.format).reshape(self.shape)


def gguf_architecture(path: str | os.PathLike) -> str:
    """The GGUF's ``general.architecture`` ("llama", "qwen2", ...; "" if absent)."""
    return _read_gguf(*_file_key(path))[1]


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, BlockTensor]:
    """Every tensor of the GGUF file at ``path`` by name, memory-mapped (nothing is copied). A missing file
    raises ``ModelNotFoundError``; a file that is not a readable GGUF, or holds a tensor in a format m2r2
    does not read, ``UnsupportedModelError``. Parsed once per file version (the gguf package's reader takes
    seconds on a file with a large vocabulary in its metadata): later calls return the same mapping."""
    return dict(_read_gguf(*_file_key(path))[0])


def release_gguf_maps() -> None:
    """Drop the parsed GGUFs (and their file mappings): after a load has copied what it keeps, so the mapped
    file's pages do not stay resident with the process."""
    _read_gguf.cache_clear()


def _file_key(path) -> tuple[str, int, int]:
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{p} does not exist or is not a file")
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int) -> tuple[dict[str, BlockTensor], str]:
    p = Path(path)  # (an existing file: _file_key, which makes this cache's key, checked it)
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a dependency of the GGUF path
        raise UnsupportedModelError(f"reading GGUF files needs the gguf package: pip install gguf ({e})") from e
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UnsupportedModelError(f"{p} is not a GGUF file (bad magic {magic!r}); the file may be corrupt")
        reader = GGUFReader(p, "r")
        tensors = list(reader.tensors)
    except UnsupportedModelError:
        raise
    except Exception as e:  # the reader's own errors on a truncated / corrupt file are ValueError, IndexError, ...
        raise UnsupportedModelError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); "
                                    "the file may be truncated or corrupt") from e
    out: dict[str, BlockTensor] = {}
    for t in tensors:
        fmt = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        if fmt not in BLOCK_FORMATS and fmt not in PLAIN_FORMATS:
            raise UnsupportedModelError(f"{p}: tensor {t.name} is {fmt}; m2r2 reads "
                                        f"{', '.join((*BLOCK_FORMATS, *PLAIN_FORMATS))}")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        data = t.data
        if fmt in PLAIN_FORMATS:
            row_bytes = shape[-1] * (4 if fmt == "F32" else 2)
        else:
            f = BLOCK_FORMATS[fmt]
            if shape[-1] % f.weights_per_block:
                raise UnsupportedModelError(f"{p}: tensor {t.name} has rows of {shape[-1]} weights, not a "
                                            f"multiple of the {fmt} block size {f.weights_per_block}")
            row_bytes = shape[-1] // f.weights_per_block * f.bytes_per_block
        if data.nbytes != rows * row_bytes:
            raise UnsupportedModelError(f"{p}: tensor {t.name} has {data.nbytes} bytes of data, expected "
                                        f"{rows * row_bytes}; the file may be truncated or corrupt")
        raw = data.reshape(-1).view(np.uint8).reshape(rows, row_bytes)
        out[t.name] = BlockTensor(t.name, fmt, shape, raw)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field is not None and field.data else ""
    return out, arch
