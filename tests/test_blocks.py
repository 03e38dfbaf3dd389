"""GGUF block tensors (m2r2.engine.blocks): the reference dequantisers equal the gguf package's bit for bit,
on random blocks of every format and on the embedded model's real tensors; the reader maps the file without
copying and orients shapes as (out_features, in_features); the q/k row un-permutation gives the float32
model m2r2 runs; a corrupt file is an m2r2 error."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from m2r2.engine.blocks import (BLOCK_FORMATS, BlockTensor, dequantize, dequantize_rows, qk_hf_row_order,
                                read_gguf_tensors, unpermute_qk_rows)
from m2r2.errors import M2R2Error, ModelNotFoundError, UnsupportedModelError

# byte offsets of each format's f16 fields (d, and m / dmin where there is one), from ggml-common.h
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
              "Q6_K": (208,)}


def gguf_dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])


def assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(a.view(np.uint32)[~np.isnan(a)], b.view(np.uint32)[~np.isnan(b)])


def random_blocks(rng, fmt: str, rows: int, blocks_per_row: int, finite: bool = True) -> np.ndarray:
    f = BLOCK_FORMATS[fmt]
    raw = rng.integers(0, 256, (rows, blocks_per_row, f.bytes_per_block), dtype=np.uint8)
    if finite:
        for at in F16_FIELDS[fmt]:  # finite scales of both signs over a wide range, subnormals included
            scale = (rng.standard_normal((rows, blocks_per_row)) * np.exp2(rng.integers(-20, 8, (rows, blocks_per_row))))
            raw[:, :, at:at + 2] = scale.astype(np.float16).view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * f.bytes_per_block)


def test_formats_match_ggml_sizes():
    assert set(F16_FIELDS) == set(BLOCK_FORMATS)
    for name, f in BLOCK_FORMATS.items():
        assert (f.weights_per_block, f.bytes_per_block) == gguf.constants.GGML_QUANT_SIZES[
            gguf.GGMLQuantizationType[name]]
        assert f.bytes_per_weight == f.bytes_per_block / f.weights_per_block
        assert f.layout and "\n" not in f.layout


@pytest.mark.parametrize("fmt", list(BLOCK_FORMATS))
def test_random_blocks_bitwise(fmt):
    rng = np.random.default_rng(sum(map(ord, fmt)))
    for rows, blocks_per_row in ((1, 1), (3, 5), (16, 2), (17, 7)):  # odd block counts: odd multiples of 32/256
        raw = random_blocks(rng, fmt, rows, blocks_per_row)
        ours = dequantize(raw, fmt)
        assert ours.shape == (rows, blocks_per_row * BLOCK_FORMATS[fmt].weights_per_block)
        assert np.isfinite(ours).all()
        assert_bitwise(ours, gguf_dequantize(raw, fmt))
        idx = [rows - 1, 0, rows // 2, 0]
        assert_bitwise(dequantize_rows(raw, fmt, idx), ours[idx])


@pytest.mark.parametrize("fmt", list(BLOCK_FORMATS))
def test_arbitrary_bytes_bitwise(fmt):
    """Any bytes at all (inf / NaN scales included): the same values and the same NaN positions."""
    rng = np.random.default_rng(7 + len(fmt))
    raw = random_blocks(rng, fmt, 64, 3, finite=False)
    with np.errstate(invalid="ignore", over="ignore"):
        assert_bitwise(dequantize(raw, fmt), gguf_dequantize(raw, fmt))


def test_block_boundaries_and_non_contiguous_input():
    rng = np.random.default_rng(3)
    raw = random_blocks(rng, "Q4_1", 8, 4)
    full = dequantize(raw, "Q4_1")
    # a row's blocks are independent: dequantising block b alone gives columns [32b, 32b+32)
    for b in range(4):
        assert_bitwise(dequantize(raw[:, b * 20:(b + 1) * 20], "Q4_1"), full[:, b * 32:(b + 1) * 32])
    assert_bitwise(dequantize(raw[::2], "Q4_1"), full[::2])


def test_bad_arguments():
    raw = np.zeros((2, 20), np.uint8)
    with pytest.raises(UnsupportedModelError):
        dequantize(raw, "Q2_K")
    with pytest.raises(UnsupportedModelError):
        dequantize(np.zeros((2, 19), np.uint8), "Q4_1")  # not whole blocks
    with pytest.raises(ValueError):
        dequantize(raw.astype(np.int16), "Q4_1")
    with pytest.raises(IndexError):
        dequantize_rows(raw, "Q4_1", [2])


def test_qk_row_order_inverts_llama_cpp_permute():
    """llama.cpp's converter (LlamaModel.permute) applied to HF rows, then our order, gives the HF rows back."""
    def llama_cpp_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for rows, heads in ((576, 9), (192, 3), (8, 1), (12, 3)):
        hf = np.arange(rows * 3).reshape(rows, 3)
        assert np.array_equal(unpermute_qk_rows(llama_cpp_permute(hf, heads), heads), hf)
        order = qk_hf_row_order(rows, heads)
        assert sorted(order) == list(range(rows))
    assert list(qk_hf_row_order(8, 1)) == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(ValueError):
        qk_hf_row_order(10, 3)


# ---- the embedded model's GGUF ----

@pytest.fixture(scope="module")
def embedded_path():
    from m2r2.engine.loading import embedded_gguf_path
    try:
        return embedded_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def embedded_tensors(embedded_path):
    return read_gguf_tensors(embedded_path)


def test_embedded_read_shapes_and_views(embedded_path, embedded_tensors):
    t = embedded_tensors
    assert len(t) == 272
    by_format: dict[str, list[BlockTensor]] = {}
    for x in t.values():
        by_format.setdefault(x.format, []).append(x)
        assert isinstance(x, BlockTensor) and x.raw.dtype == np.uint8 and x.raw.ndim == 2
        assert isinstance(x.raw.base, np.memmap) or isinstance(x.raw, np.memmap)  # a view of the mapped file
        assert not x.raw.flags.owndata and not x.raw.flags.writeable
    assert {k: len(v) for k, v in by_format.items()} == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    # (out_features, in_features), as nn.Linear.weight; the embedding (vocab, hidden)
    assert t["blk.0.attn_q.weight"].shape == (576, 576)
    assert t["blk.0.attn_k.weight"].shape == (192, 576)
    assert t["blk.0.attn_v.weight"].shape == (192, 576)
    assert t["blk.0.ffn_gate.weight"].shape == (1536, 576)
    assert t["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert t["token_embd.weight"].shape == (49152, 576)
    assert t["blk.0.attn_norm.weight"].shape == (576,)
    assert t["blk.0.ffn_down.weight"].raw.shape == (576, 1536 // 32 * 20)
    assert t["token_embd.weight"].raw.shape == (49152, 576 // 32 * 34)
    # the byte counts the module docstring reports
    sizes = {k: sum(x.nbytes for x in v) for k, v in by_format.items()}
    assert sizes == {"Q4_1": 66_355_200, "Q8_0": 30_081_024, "F32": 140_544}
    assert embedded_path.stat().st_size == 98_362_432
    assert embedded_path.stat().st_size - sum(sizes.values()) == 1_785_664


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.13.ffn_gate.weight",
                                  "blk.29.attn_k.weight", "blk.29.attn_output.weight", "token_embd.weight",
                                  "blk.7.ffn_norm.weight"])
def test_embedded_tensor_bitwise(embedded_tensors, name):
    x = embedded_tensors[name]
    ours = x.dequantize()
    assert ours.shape == x.shape
    assert_bitwise(ours.reshape(x.raw.shape[0], -1), gguf_dequantize(x.raw, x.format))


def test_embedded_embedding_gather(embedded_tensors):
    x = embedded_tensors["token_embd.weight"]
    idx = [0, 1, 2, 49151, 1000, 1]
    assert_bitwise(dequantize_rows(x.raw, x.format, idx), gguf_dequantize(np.asarray(x.raw[idx]), x.format))


@pytest.mark.slow
def test_unpermuted_qk_equal_loaded_model(embedded_tensors, embedded_fp32):
    """GGUF q/k rows, dequantised and un-permuted (or un-permuted as raw blocks, then dequantised), are the
    float32 q/k projections of transformers' conversion, bit for bit; v and the tied embedding need no permutation."""
    embedded_lm = embedded_fp32  # the float32 checkpoint transformers converted (not the model's own blocks)
    cfg = embedded_lm.model.cfg
    for layer in (0, 17, cfg.num_layers - 1):
        w = embedded_lm.model.layers[layer].qkv.dense().detach().numpy()
        q_hf, k_hf, v_hf = np.split(w, [cfg.q_size, cfg.q_size + cfg.kv_size])
        q, k, v = (embedded_tensors[f"blk.{layer}.attn_{n}.weight"] for n in "qkv")
        assert_bitwise(unpermute_qk_rows(q.dequantize(), cfg.num_heads), q_hf)
        assert_bitwise(dequantize(unpermute_qk_rows(q.raw, cfg.num_heads), q.format), q_hf)
        assert_bitwise(unpermute_qk_rows(k.dequantize(), cfg.num_kv_heads), k_hf)
        assert_bitwise(v.dequantize(), v_hf)
        assert not np.array_equal(q.dequantize(), q_hf)  # the permutation is real
    emb = embedded_lm.model.embed_tokens.weight.detach().numpy()
    idx = [0, 5, 12345, emb.shape[0] - 1]
    x = embedded_tensors["token_embd.weight"]
    assert_bitwise(dequantize_rows(x.raw, x.format, idx), emb[idx])


# ---- bad files ----

def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        read_gguf_tensors(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    for content in (b"", b"GGU", b"hello, this is not a GGUF file at all\n" * 10):
        p = tmp_path / "bad.gguf"
        p.write_bytes(content)
        with pytest.raises(UnsupportedModelError, match="not a GGUF"):
            read_gguf_tensors(p)


def write_small_gguf(path, rng) -> dict[str, np.ndarray]:
    """A small GGUF of one tensor per block format plus F32 and F16 ones, written by the gguf package."""
    tensors = {}
    w = gguf.GGUFWriter(path, "llama")
    for i, fmt in enumerate(BLOCK_FORMATS):
        raw = random_blocks(rng, fmt, 3 + i, 1 + i % 3)
        w.add_tensor(f"t.{fmt}", raw, raw_dtype=gguf.GGMLQuantizationType[fmt])
        tensors[f"t.{fmt}"] = raw
    tensors["t.f32"] = rng.standard_normal(7).astype(np.float32)
    tensors["t.f16"] = rng.standard_normal((2, 5)).astype(np.float16)
    w.add_tensor("t.f32", tensors["t.f32"])
    w.add_tensor("t.f16", tensors["t.f16"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_small_gguf_round_trip(tmp_path):
    p = tmp_path / "small.gguf"
    written = write_small_gguf(p, np.random.default_rng(11))
    got = read_gguf_tensors(p)
    assert set(got) == set(written)
    for fmt in BLOCK_FORMATS:
        x = got[f"t.{fmt}"]
        raw = written[x.name]
        assert x.format == fmt and np.array_equal(x.raw, raw)
        assert x.shape == (raw.shape[0], raw.shape[1] // BLOCK_FORMATS[fmt].bytes_per_block
                           * BLOCK_FORMATS[fmt].weights_per_block)
        assert_bitwise(x.dequantize(), gguf_dequantize(raw, fmt))
    assert got["t.f32"].format == "F32" and got["t.f32"].shape == (7,)
    assert np.array_equal(got["t.f32"].dequantize(), written["t.f32"])
    assert got["t.f16"].format == "F16" and got["t.f16"].shape == (2, 5)
    assert_bitwise(got["t.f16"].dequantize(), written["t.f16"].astype(np.float32))


def test_truncated_gguf(tmp_path):
    full = tmp_path / "small.gguf"
    write_small_gguf(full, np.random.default_rng(12))
    data = full.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(full).tensors)  # the file pads after this
    assert end <= len(data)
    # inside the header, the tensor infos, the padding before the data, a tensor's data; one byte short
    for n in (10, 30, 100, 200, len(data) // 2, end - 100, end - 1):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(UnsupportedModelError) as e:
            read_gguf_tensors(p)
        assert isinstance(e.value, M2R2Error) and str(p) in str(e.value)


def test_truncated_embedded_gguf(tmp_path, embedded_path):
    """The real file cut inside a block weight's data (its metadata and tokenizer intact)."""
    with open(embedded_path, "rb") as f:
        head = f.read(32_000_000)
    for n in (32_000_000,):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(head[:n])
        with pytest.raises(UnsupportedModelError, match="truncated or corrupt"):
            read_gguf_tensors(p)
