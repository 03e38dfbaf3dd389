"""Reduced-precision weight copies (fp16, int8 through FBGEMM) on tiny random models: each product is close
to the float32 one, switching is scoped and restorable, and drafting from them is lossless."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import m2r2
from m2r2.decoding.loop import decode
from m2r2.engine.model import Linear, lowp_available
from m2r2.engine.sampling import SamplingConfig
from m2r2.decoding.speculative import Speculative, StreamDrafter

from conftest import assert_close_rel, make_tiny

pytestmark = pytest.mark.skipif(not lowp_available(), reason="this PyTorch build has no FBGEMM kernels")

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12], [42]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-lowp")
    make_tiny(d, "llama", num_hidden_layers=4, eos_token_id=None)
    return m2r2.load(d)


@pytest.mark.parametrize("kind,tol", [("fp16", 2e-3), ("int8", 3e-2)])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_lowp_product_is_close_to_float32(kind, tol, rows, bias):
    g = torch.Generator().manual_seed(0)
    lin = Linear(64, 96, bias=bias, parts=2)
    dense = torch.randn(96, 64, generator=g)
    with torch.no_grad():
        lin.weight.copy_(Linear.pack(dense, 2))
        if bias:
            lin.bias.copy_(torch.randn(96, generator=g))
    x = torch.randn(2, rows, 64, generator=g)
    lin.build_lowp(kind)
    lin.mode = kind
    with torch.no_grad():
        ref = F.linear(x, dense, lin.bias)
        y = lin(x)
    assert y.shape == ref.shape
    err = float((y - ref).abs().max() / ref.abs().max())
    if 2 * rows > Linear.GEMM_ROWS:  # a prefill-sized product runs the float32 GEMM (another call than the ref)
        assert_close_rel(y, ref)
    else:
        assert 0 < err < tol, err  # close, and really another kernel (not the float32 one)


def test_autograd_falls_back_to_float32():
    lin = Linear(32, 16, parts=1)
    with torch.no_grad():
        lin.weight.normal_()
    lin.build_lowp("int8")
    lin.mode = "int8"
    x = torch.randn(3, 32, requires_grad=True)
    y = lin(x)
    torch.testing.assert_close(y, F.linear(x, lin.dense()), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None


def test_use_weights_is_scoped_and_copies_drop_the_derived_weights(lm):
    m = lm.model
    ids = torch.tensor([PROMPTS[0]])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ref = m(ids, m.new_cache(1, 32), pos)
        with m.use_weights("fp16"):
            assert m.weights == "fp16"
            half = m(ids, m.new_cache(1, 32), pos)
            assert copy.deepcopy(m.lm_head).lowp == {}
        assert m.weights == "fp32"
        again = m(ids, m.new_cache(1, 32), pos)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    assert not torch.equal(half, ref)
    torch.testing.assert_close(half, ref, rtol=0, atol=5e-3 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="weights must be one of"):
        m.set_weights("int4")


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_quantized_drafts_keep_greedy_output(lm, weights):
    """Greedy speculative decoding with drafts from the fp16 / int8 copies equals plain decoding (batch 1
    and a ragged batch), and the model is back on its float32 weights afterwards."""
    plain = decode(lm.model, PROMPTS, max_new_tokens=48)[0]
    strat = lm.strategy("quant-draft", draft_weights=weights)
    out, st = decode(lm.model, PROMPTS, max_new_tokens=48, strategy=strat)
    assert out == plain
    assert st.extra["drafted"] > 0 and st.extra["draft_weights"] == weights
    if weights == "fp16":  # fp16 weights agree with the float32 model on nearly every token
        assert st.extra["acceptance"] > 0.9
    one, _ = decode(lm.model, PROMPTS[:1], max_new_tokens=48, strategy=strat)
    assert one[0] == plain[0]
    assert lm.model.weights == "fp32"


def test_quantized_drafts_sample_reproducibly(lm):
    strat = lm.strategy("quant-draft")
    s = SamplingConfig(temperature=0.9, top_p=0.95, seed=3)
    a, _ = decode(lm.model, [PROMPTS[1]], max_new_tokens=24, sampling=s, strategy=strat)
    b, _ = decode(lm.model, [PROMPTS[1]], max_new_tokens=24, sampling=s, strategy=strat)
    assert a == b


def test_load_with_reduced_precision_weights(tmp_path):
    make_tiny(tmp_path, "llama", num_hidden_layers=2)
    lm = m2r2.load(tmp_path, weights="fp16")
    assert lm.model.weights == "fp16"
    assert lm.generate([5, 6, 7], max_new_tokens=4).stats.new_tokens >= 1
    with pytest.raises(m2r2.WeightFormatError, match="weights must be one of"):
        m2r2.load(tmp_path, weights="int4")
    with pytest.raises(m2r2.StrategyError, match="draft weights"):
        lm.strategy("quant-draft", draft_weights="fp32")
    with pytest.raises(m2r2.StrategyError, match="draft weights"):
        lm.strategy("early-exit", draft_weights="bf16")
    with pytest.raises(ValueError, match="draft weights"):
        StreamDrafter(None, depth=2, weights="int4")


def test_early_exit_drafts_from_int8_copies_stay_lossless(lm):
    plain = decode(lm.model, PROMPTS, max_new_tokens=32)[0]
    strat = lm.strategy("early-exit", depth=2, draft_weights="int8")
    assert isinstance(strat, Speculative) and strat.drafter.weight_scale == 0.25
    out, st = decode(lm.model, PROMPTS, max_new_tokens=32, strategy=strat)
    assert out == plain and st.extra["draft_weights"] == "int8" and st.extra["draft_depth"] == 2


def test_fp16_product_split_across_threads_equals_one_chunk(monkeypatch):
    """A big weight's fp16 product runs one chunk of output rows per thread: same numbers as one chunk."""
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(300, 64, generator=g)
    x = torch.randn(1, 4, 64, generator=g)
    ys = []
    for split_min in (1 << 30, 1):
        monkeypatch.setattr(Linear, "FP16_SPLIT_MIN", split_min)
        lin = Linear(64, 300, parts=2)
        with torch.no_grad():
            lin.weight.copy_(Linear.pack(dense, 2))
        lin.build_lowp("fp16")
        lin.mode = "fp16"
        with torch.no_grad():
            ys.append(lin(x))
        assert len(lin.lowp["fp16"]) == (1 if split_min > 1 else 2)
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
