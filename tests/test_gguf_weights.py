"""weights="gguf": the GGUF's own Q4_1 / Q8_0 blocks run by the native kernels. A block dequantises in the kernel
to exactly the float32 model's weights, so products agree with the float32 path up to summation order, a row's
result does not depend on its neighbours, and greedy decoding gives the float32 model's tokens."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import m2r2
from m2r2.engine import native, weights

from conftest import assert_close_rel, assert_same_tokens, make_tiny

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")


@pytest.mark.parametrize("fmt,qtype", [("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)])
@pytest.mark.parametrize("out_f,in_f", [(96, 64), (13, 96), (960, 576), (7, 1536)])
def test_block_products_are_the_dequantised_products(fmt, qtype, out_f, in_f):
    rng = np.random.default_rng(out_f + in_f)
    raw = quants.quantize((rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32), qtype)
    w = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32))  # the float32 model's weights
    blocks = torch.from_numpy(np.ascontiguousarray(raw))
    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(9, in_f, generator=g), torch.randn(out_f, generator=g)
    y = native.qgemv(x, blocks, fmt, b, out_f)
    assert_close_rel(y, (x.double() @ w.double().T + b.double()))  # only the order of summation differs
    for r in range(9):  # a row's result does not depend on how many rows share the call
        assert torch.equal(native.qgemv(x[r:r + 1].contiguous(), blocks, fmt, b, out_f)[0], y[r])
    with pytest.raises(ValueError):
        native.qgemv(torch.randn(17, in_f), blocks, fmt, b, out_f)  # more rows than a decode step has


@pytest.fixture(scope="module")
def gguf_lm():
    return m2r2.load(weights="gguf")


@pytest.mark.slow
def test_embedded_model_on_its_blocks(gguf_lm, embedded_lm, monkeypatch):
    m, ref = gguf_lm.model, embedded_lm.model
    assert m.weights == "gguf" and all("gguf" in lin.lowp for lin in m._linears())
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i in (0, 17, 29):  # every fused linear of a few blocks agrees with the float32 weights
            for name in ("qkv", "o", "gate_up", "down"):
                lin, lin32 = getattr(m.layers[i], name), getattr(ref.layers[i], name)
                x = torch.randn(3, lin.in_features, generator=g)
                assert_close_rel(lin(x), x.double() @ lin32.dense().double().T)
        x = torch.randn(2, m.cfg.hidden_size, generator=g)
        assert_close_rel(m.lm_head(x), x.double() @ ref.lm_head.dense().double().T)
    calls = []
    orig = native.block
    monkeypatch.setattr(native, "block", lambda *a, **k: calls.append(1) or orig(*a, **k))
    prompts = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain."]
    for p in prompts:
        ids = embedded_lm.encode(p)
        ours = gguf_lm.generate(ids, max_new_tokens=40).token_ids
        plain = embedded_lm.generate(ids, max_new_tokens=40).token_ids
        assert_same_tokens(ours, plain, None, ids, ref)
    assert calls  # the decode steps ran the native block kernel on the blocks


def test_gguf_weights_need_a_gguf_model(tmp_path):
    make_tiny(tmp_path, "llama", num_hidden_layers=1)
    with pytest.raises(m2r2.WeightFormatError, match="GGUF"):
        m2r2.load(tmp_path, weights="gguf")
    lm = m2r2.load(tmp_path)
    with pytest.raises(m2r2.WeightFormatError, match="GGUF"):
        lm.model.build_weights("gguf")
    assert "gguf" in weights.names()
