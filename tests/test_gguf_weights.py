"""weights="gguf": the GGUF's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) run by the native kernels. A block dequantises in the kernel
to exactly the float32 model's weights, so products agree with the float32 path up to summation order, a row's
result does not depend on its neighbours, and greedy decoding gives the float32 model's tokens."""

import contextlib

import numpy as np
import pytest
import torch

import m2r2
from m2r2.engine import native, weights
from m2r2.engine.blocks import BLOCK_FORMATS, dequantize

from conftest import assert_close_rel, assert_same_tokens, count_native_blocks, make_tiny
from test_blocks import random_blocks

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")


FORMATS = list(native.BLOCK_KINDS)  # every block format the kernels run


@contextlib.contextmanager
def torch_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)  # every block format the kernels run


def random_block_rows(fmt: str, out_f: int, in_f: int, seed: int) -> np.ndarray:
    """(out_f, bytes per row) random blocks of ``fmt`` with finite scales (tests/test_blocks.py's generator)."""
    f = BLOCK_FORMATS[fmt.upper()]
    return random_blocks(np.random.default_rng(seed), fmt.upper(), out_f, in_f // f.weights_per_block)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_dequantises_exactly(fmt):
    """x = the identity: row i of the product is column i of W, i.e. the kernel's dequantised weights, which must
    be the reference dequantiser's bit for bit (each term is w * 1 added to zeros)."""
    in_f = BLOCK_FORMATS[fmt.upper()].weights_per_block * 2
    raw = random_block_rows(fmt, 11, in_f, 5)
    y = native.qgemv(torch.eye(in_f), torch.from_numpy(raw), fmt, None, 11)
    ref = dequantize(raw, fmt.upper())
    assert np.array_equal(y.numpy(), ref.T)
    # the whole-weight dequantiser (a long prefill's GEMM, float32 weights on demand): the same bits
    assert np.array_equal(native.qdequant(torch.from_numpy(raw), fmt, 11, in_f).numpy().view(np.uint32),
                          ref.view(np.uint32))
    with pytest.raises(ValueError):  # an output buffer that does not fit is refused, not written past
        native.qdequant(torch.from_numpy(raw), fmt, 11, in_f, torch.empty(10, in_f))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_f,blocks", [(96, 2), (13, 3), (960, 2), (7, 6)])
def test_block_products_are_the_dequantised_products(fmt, out_f, blocks):
    in_f = BLOCK_FORMATS[fmt.upper()].weights_per_block * blocks
    raw = random_block_rows(fmt, out_f, in_f, out_f + blocks)
    w = torch.from_numpy(dequantize(raw, fmt.upper()))  # the float32 model's weights
    g = torch.Generator().manual_seed(0)
    rows = 19  # more than one pass of rows (8 per pass on AVX-512, 3 on AVX2, 4 in plain C)
    x, b = torch.randn(rows, in_f, generator=g), torch.randn(out_f, generator=g)
    blocks_t = torch.from_numpy(raw)
    y = native.qgemv(x, blocks_t, fmt, b, out_f)
    assert_close_rel(y, (x.double() @ w.double().T + b.double()))  # only the order of summation differs
    for threads in (1, 3):
        with torch_threads(threads):
            for r in (0, 4, 11, 18):  # a row's result does not depend on its neighbours or the thread count
                assert torch.equal(native.qgemv(x[r:r + 1].contiguous(), blocks_t, fmt, b, out_f)[0], y[r])
            assert torch.equal(native.qgemv(x[3:12].contiguous(), blocks_t, fmt, b, out_f), y[3:12])
    with pytest.raises(ValueError):
        native.qgemv(x[:, :-1].contiguous(), blocks_t, fmt, b, out_f)  # input features do not fit the blocks


CROSS_BUILD = """
import sys, numpy as np, torch
from m2r2.engine import native
assert native.available()
d = np.load(sys.argv[1])
out = {}
for fmt in native.BLOCK_KINDS:
    out[fmt] = native.qgemv(torch.from_numpy(d["x_" + fmt]), torch.from_numpy(d["raw_" + fmt]), fmt, None,
                            d["raw_" + fmt].shape[0]).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
def test_same_bits_from_every_code_path(tmp_path):
    """The AVX-512, AVX2 and plain C block loops keep each row's 32 partial sums in the same lanes, so on a CPU with
    FMA they give the same bits (on this machine: whichever of them the CPU supports)."""
    import os
    import subprocess
    import sys
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " fma" not in cpu:
        pytest.skip("needs x86-64 with FMA to build the variants")
    arrays = {}
    for i, fmt in enumerate(FORMATS):
        in_f = BLOCK_FORMATS[fmt.upper()].weights_per_block * 3
        arrays["raw_" + fmt] = random_block_rows(fmt, 37, in_f, 100 + i)
        arrays["x_" + fmt] = np.random.default_rng(i).standard_normal((5, in_f)).astype(np.float32)
    np.savez(tmp_path / "in.npz", **arrays)
    builds = {"native": {}, "avx2": {"M2R2_NATIVE_MARCH": "x86-64-v3"},
              "plain-c": {"M2R2_NATIVE_MARCH": "x86-64-v3", "M2R2_NATIVE_PORTABLE": "1"}}
    if " avx512f" not in cpu:
        builds.pop("native")
    results = {}
    for name, env in builds.items():
        out = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, "-c", CROSS_BUILD, str(tmp_path / "in.npz"), str(out)], check=True,
                       env={**os.environ, "M2R2_CACHE": str(tmp_path / "cache"), **env}, timeout=600)
        results[name] = np.load(out)
    first, *others = results.values()
    for fmt in FORMATS:
        for other in others:
            assert np.array_equal(first[fmt].view(np.uint32), other[fmt].view(np.uint32)), fmt


@pytest.mark.slow
def test_embedded_model_on_its_blocks(embedded_lm, embedded_fp32, monkeypatch):
    gguf_lm = embedded_lm  # a GGUF loads as its own blocks by default
    m, ref = gguf_lm.model, embedded_fp32.model
    assert m.weights == "gguf" and all("gguf" in lin.lowp for lin in m._linears())
    assert embedded_fp32.model.weights == "fp32"
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i in (0, 17, 29):  # every fused linear of a few blocks agrees with the float32 weights
            for name in ("qkv", "o", "gate_up", "down"):
                lin, lin32 = getattr(m.layers[i], name), getattr(ref.layers[i], name)
                x = torch.randn(3, lin.in_features, generator=g)
                assert_close_rel(lin(x), x.double() @ lin32.dense().double().T)
        x = torch.randn(2, m.cfg.hidden_size, generator=g)
        assert_close_rel(m.lm_head(x), x.double() @ ref.lm_head.dense().double().T)
    calls = count_native_blocks(monkeypatch)
    prompts = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain."]
    for p in prompts:
        ids = embedded_fp32.encode(p)
        ours = gguf_lm.generate(ids, max_new_tokens=40).token_ids
        plain = embedded_fp32.generate(ids, max_new_tokens=40).token_ids
        assert_same_tokens(ours, plain, None, ids, ref)
    assert calls  # the decode steps ran the native block kernel on the blocks


def test_gguf_weights_need_a_gguf_model(tmp_path):
    make_tiny(tmp_path, "llama", num_hidden_layers=1)
    with pytest.raises(m2r2.WeightFormatError, match="GGUF"):
        m2r2.load(tmp_path, weights="gguf")
    lm = m2r2.load(tmp_path)
    assert lm.model.weights == "fp32"  # the default for a model that is not a GGUF
    with pytest.raises(m2r2.WeightFormatError, match="GGUF"):
        lm.model.build_weights("gguf")
    assert "gguf" in weights.names()


def quantized_rows(fmt: str, rows: int, in_f: int, rng) -> np.ndarray:
    """(rows, bytes per row) blocks of ``fmt`` holding weights of a trained layer's size (~0.05)."""
    import gguf
    if fmt in ("q4_k", "q6_k"):  # the gguf package quantises neither: random quants, scales sized to ~0.05 weights
        f = BLOCK_FORMATS[fmt.upper()]
        raw = rng.integers(0, 256, (rows, in_f // 256, f.bytes_per_block), dtype=np.uint8)
        if fmt == "q4_k":
            for at, size in ((0, 1e-4), (2, 1e-4)):
                raw[:, :, at:at + 2] = (np.abs(rng.standard_normal(raw.shape[:2])) * size).astype(np.float16) \
                    .view(np.uint8).reshape(*raw.shape[:2], 2)
        else:
            raw[:, :, 208:210] = (rng.standard_normal(raw.shape[:2]) * 2e-5).astype(np.float16).view(np.uint8) \
                .reshape(*raw.shape[:2], 2)
        return raw.reshape(rows, -1)
    w = (rng.standard_normal((rows, in_f)) * 0.05).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.upper()])


def test_mixed_formats_and_k_quants_through_the_block_kernel(tmp_path):
    """A model whose fused linears mix block formats the way Q4_K_M files do (q, k in Q4_K and v in Q6_K; other
    layers Q5_x / Q4_0 / Q8_0), its float32 weights set to the blocks' values: the block kernel on the blocks
    gives the float32 model's greedy tokens, and each linear's product (segments included) the float32 one."""
    from m2r2.engine.gguf_weights import BlockWeight
    from m2r2.engine.model import Linear
    make_tiny(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2)
    lm = m2r2.load(tmp_path)
    m, rng = lm.model, np.random.default_rng(0)
    plans = [{"qkv": ["q4_k", "q4_k", "q6_k"], "o": ["q4_k"], "gate_up": ["q4_k", "q4_k"], "down": ["q6_k"]},
             {"qkv": ["q5_0", "q5_1", "q4_0"], "o": ["q8_0"], "gate_up": ["q4_1", "q5_1"], "down": ["q4_0"]}]
    c = m.cfg
    split = {"qkv": [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim],
             "gate_up": [c.intermediate_size] * 2}
    with torch.no_grad():
        for blk, plan in zip(m.layers, plans):
            for name, fmts in plan.items():
                lin = getattr(blk, name)
                sizes = split.get(name, [lin.out_features])
                parts = [(f, quantized_rows(f, n, lin.in_features, rng)) for f, n in zip(fmts, sizes)]
                dense = torch.from_numpy(np.concatenate([dequantize(r, f.upper()) for f, r in parts], 0))
                lin.weight.copy_(Linear.pack(dense, lin.parts))
                lin.build_row_layout()
                lin.lowp["gguf"] = BlockWeight([(f, torch.from_numpy(np.ascontiguousarray(r))) for f, r in parts])
                x = torch.randn(5, lin.in_features)
                assert_close_rel(weights.get("gguf").product(lin, x), x.double() @ dense.double().T)
        head = m.lm_head
        raw = quantized_rows("q8_0", head.out_features, head.in_features, rng)
        head.weight.copy_(Linear.pack(torch.from_numpy(dequantize(raw, "Q8_0")), head.parts))
        head.build_row_layout()
        head.lowp["gguf"] = BlockWeight([("q8_0", torch.from_numpy(raw))])
    assert m.layers[0].qkv.lowp["gguf"].kind == native.KIND_SEGMENTS
    calls = []
    for seed in range(3):
        # prompts of 7, 40 and 73 tokens: prefills of one pass, more than a decode step, more than one row tile
        ids = torch.randint(2, 256, (7 + 33 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = lm.generate(ids, max_new_tokens=24).token_ids
        with m.use_weights("gguf"), pytest.MonkeyPatch.context() as mp:
            ran = count_native_blocks(mp)
            ours = lm.generate(ids, max_new_tokens=24).token_ids
        calls += ran
        assert_same_tokens(ours, plain, None, ids, m)
    assert calls  # the decode steps ran the block kernel
    ids = torch.randint(2, 256, (1, 70), generator=torch.Generator().manual_seed(9))
    pos = torch.arange(70)[None]
    with torch.inference_mode():  # a prefill's logits (a native call of 70 rows): the float32 model's
        with m.use_weights("gguf"):
            ours = m(ids, m.new_cache(1, 128), pos)
        with m.use_weights("fp32"), native.disabled():
            ref = m(ids, m.new_cache(1, 128), pos)
    assert_close_rel(ours, ref.double())


def test_prompts_run_dequantise_plus_gemm_and_decode_steps_never_do(embedded_lm, monkeypatch):
    """A prompt's forward (hidden(prompt=True), 20+ tokens) dequantises each weight into one reused buffer for a GEMM:
    the float32 model's logits up to summation order. The same rows as a decode-sized step or a verification
    (prompt=False) run the row-independent block kernels, never the GEMM."""
    from m2r2.engine import gguf_weights
    m = embedded_lm.model
    gemms = []
    real = gguf_weights.gemm
    monkeypatch.setattr(gguf_weights, "gemm", lambda *a: gemms.append(a[0].shape[0]) or real(*a))
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for T in (19, 20, 45):
            ids = torch.randint(2, 40000, (1, T), generator=g)
            pos = torch.arange(T)[None]
            gemms.clear()
            x = m.hidden(ids, m.new_cache(1, 64), pos, prompt=True)
            assert len(gemms) == (0 if T < 20 else 4 * m.cfg.num_layers)  # every block product of every layer
            y = m.hidden(ids, m.new_cache(1, 64), pos)  # the native block kernels
            assert len(gemms) == (0 if T < 20 else 4 * m.cfg.num_layers)
            assert_close_rel(m.head(x), m.head(y).double())


@pytest.mark.slow
def test_blocks_only_load_dequantises_float32_weights_on_demand(embedded_fp32):
    """Loaded as its blocks, the model holds no float32 linear weights; asking for one (training, the PyTorch path)
    dequantises it from the blocks: the float32 model's weights bit for bit."""
    lm = m2r2.load(weights="gguf")
    lins, refs = lm.model._linears(), embedded_fp32.model._linears()
    assert all(lin.weight.numel() == 0 for lin in lins)
    for i in (0, 50, len(lins) - 1):  # a q/k (unpermuted rows), a fused gate/up, the tied head
        assert torch.equal(lins[i].dense(), refs[i].dense())
    assert lins[1].weight.numel() == 0  # only what was asked for
    x = torch.randn(2, 3, lm.config.hidden_size, requires_grad=True)  # autograd runs the float32 weights
    lins[1](x).sum().backward()
    assert x.grad is not None and lins[1].weight.numel() == lins[1].in_features * lins[1].out_features


@pytest.mark.slow
def test_a_gguf_loads_without_a_float32_conversion(tmp_path, monkeypatch, embedded_fp32):
    """Run as its blocks (the default), a GGUF needs only its config and tokenizer converted: no float32
    checkpoint is written to the cache, and the embedding and norms read from the file are the float32 model's
    bit for bit. Asking for an ordinary checkpoint (source.hf_dir) converts the weights then."""
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path))
    lm = m2r2.load()
    assert lm.model.weights == "gguf" and not (lm.source.config_dir / "model.safetensors").exists()
    ref = embedded_fp32.model
    for name, t in lm.model.state_dict().items():
        if "norm" in name:
            assert torch.equal(t, ref.state_dict()[name]), name
    assert lm.model.embed_tokens.weight.numel() == 0  # the embedding: rows dequantised from the file per lookup
    ids = torch.tensor([[0, 5, 49151, 17, 5]])
    assert torch.equal(lm.model.embed(ids), ref.embed(ids))
    assert torch.equal(lm.model.embedding_weight(), ref.embed_tokens.weight)  # the whole table when asked
    ids = embedded_fp32.encode("Name three colours.")
    assert lm.generate(ids, max_new_tokens=12).token_ids == embedded_fp32.generate(ids, max_new_tokens=12).token_ids


def _one_tensor_gguf(path, fmt: str) -> None:
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 0.05).astype(np.float32)
    if fmt == "F16":
        w.add_tensor("blk.0.attn_q.weight", x.astype(np.float16))
    else:
        w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt]),
                     raw_dtype=gguf.GGMLQuantizationType[fmt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_only_block_formats_the_kernels_run_default_to_blocks(tmp_path):
    from m2r2.engine.gguf_weights import unsupported
    _one_tensor_gguf(tmp_path / "q.gguf", "Q8_0")
    _one_tensor_gguf(tmp_path / "f.gguf", "F16")
    assert unsupported(tmp_path / "q.gguf") is None
    assert "F16" in unsupported(tmp_path / "f.gguf")  # such a model loads with float32 weights by default


def test_qk_rows_are_unpermuted_only_where_llama_cpp_permuted_them(embedded_lm, monkeypatch):
    """llama.cpp permutes q/k rows for "llama" GGUFs only; a Qwen2 GGUF keeps Hugging Face's order."""
    from types import SimpleNamespace

    from m2r2.engine import gguf_weights
    from m2r2.engine.blocks import read_gguf_tensors
    path, cfg = embedded_lm.source.gguf, embedded_lm.model.cfg
    raw_q = read_gguf_tensors(path)["blk.0.attn_q.weight"].raw

    def lin(real):  # a stand-in with the real layer's shape: the shared model is not touched
        return SimpleNamespace(in_features=real.in_features, out_features=real.out_features, lowp={})

    blk = embedded_lm.model.layers[0]
    for arch, same in (("qwen2", True), ("llama", False)):
        layer = SimpleNamespace(**{n: lin(getattr(blk, n)) for n in ("qkv", "o", "gate_up", "down")})
        fake = SimpleNamespace(cfg=cfg, layers=[layer], lm_head=lin(embedded_lm.model.lm_head))
        monkeypatch.setattr(gguf_weights, "gguf_architecture", lambda p: arch)
        gguf_weights.attach_gguf_blocks(fake, path)
        q_rows = layer.qkv.lowp["gguf"].parts[0][1][:raw_q.shape[0]].numpy()  # q rows come first
        assert np.array_equal(q_rows, raw_q) == same, arch
