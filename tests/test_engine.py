"""The engine against transformers on tiny random checkpoints: greedy equality, cache semantics,
batching, and the model seam."""

from __future__ import annotations

import copy
import pytest
import torch

import m2r2
from m2r2.decoding.loop import DecodeState, decode
from m2r2.engine.sampling import SamplingConfig

from conftest import assert_close_rel, assert_same_tokens, greedy_reference, make_tiny

PROMPTS = [[5, 17, 33, 99, 4], [7, 8], [200, 13, 13, 13, 54, 66, 71, 2, 9, 120, 33], [42]]


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),  # q/k/v biases
    ("mistral", {}),
    ("llama", {"num_key_value_heads": 4}),  # no GQA
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
])
def test_greedy_equals_transformers(tmp_path, arch, overrides):
    hf = make_tiny(tmp_path, arch, **overrides)
    lm = m2r2.load(tmp_path)
    for p in PROMPTS:
        out = lm.generate(p, max_new_tokens=64)
        ref = greedy_reference(hf, p, 64)
        assert_same_tokens(out.token_ids, ref, hf, p, lm.model)


def test_same_tokens_allows_only_float_ties(tmp_path):
    """assert_same_tokens rejects a divergence between tokens whose logits differ, and accepts (and counts) one
    between two tokens tied in exact arithmetic (two identical rows of the LM head)."""
    import conftest
    hf = make_tiny(tmp_path, "llama")
    p = PROMPTS[0]
    ref = greedy_reference(hf, p, 6)
    lm = m2r2.load(tmp_path)
    with pytest.raises(AssertionError, match="float64 logits"):
        assert_same_tokens(ref[:3] + [(ref[3] + 1) % 256] + ref[4:], ref, hf, p, lm.model)
    twin = (ref[0] + 1) % 256
    with torch.no_grad():
        hf.lm_head.weight[twin] = hf.lm_head.weight[ref[0]]
    hf.save_pretrained(tmp_path)
    lm = m2r2.load(tmp_path)
    n = len(conftest._tie_allowances)
    assert_same_tokens([twin] + ref[1:], ref, hf, p, lm.model)
    assert len(conftest._tie_allowances) == n + 1
    del conftest._tie_allowances[n:]  # the session's count is of real divergences only


def test_uncached_forward_equals_cached_decode(tiny_lm):
    """Logits from step-by-step decoding with the KV cache equal one uncached forward over the sequence."""
    model = tiny_lm.model
    seq = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    T = seq.shape[1]
    with torch.inference_mode():
        full = model(seq, model.new_cache(1, T), torch.arange(T).unsqueeze(0))[0]
        cache = model.new_cache(1, T)
        steps = []
        for t in range(T):
            steps.append(model(seq[:, t:t + 1], cache, torch.tensor([[t]]))[0, 0])
            cache.advance(1)
    assert_close_rel(torch.stack(steps), full)


def test_cache_crop_then_rewrite_matches_fresh(tiny_lm):
    """Writing garbage past a row's length and cropping back leaves decoding unchanged."""
    model = tiny_lm.model
    prompt = torch.tensor([[9, 8, 7, 6, 5]])
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(prompt, cache, torch.arange(5).unsqueeze(0))
        cache.advance(5)
        ref = model(torch.tensor([[4]]), cache, torch.tensor([[5]]))[0, 0].clone()
        # speculative-style: write 4 junk tokens at positions 5..8, then crop back to 5
        model(torch.tensor([[100, 101, 102, 103]]), cache, torch.arange(5, 9).unsqueeze(0))
        cache.advance(4)
        cache.crop(5)
        again = model(torch.tensor([[4]]), cache, torch.tensor([[5]]))[0, 0]
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        cache.crop(7)  # cannot grow past what was committed


def test_batch_ragged_equals_rows(tiny_lm):
    rows = [tiny_lm.generate(p, max_new_tokens=40).token_ids for p in PROMPTS]
    batch = tiny_lm.generate(prompts=PROMPTS, max_new_tokens=40)
    assert [b.token_ids for b in batch] == rows


def test_ragged_writes_scatter_per_row(tiny_lm):
    """Rows at different positions write to their own slots (the index_put path of the cache)."""
    model = tiny_lm.model
    with torch.inference_mode():
        cache = model.new_cache(2, 12)
        a = torch.tensor([[1, 2, 3, 4, 5, 6]])
        b = torch.tensor([[7, 8, 9]])
        ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]])
        model(ids, cache, torch.arange(6).expand(2, 6))
        cache.crop(0)
        cache.advance([6, 3])
        logits = model(torch.tensor([[10], [11]]), cache, cache.lengths.view(2, 1))[:, 0]
        solo_a = model.new_cache(1, 12)
        model(torch.cat([a, torch.tensor([[10]])], 1), solo_a, torch.arange(7).unsqueeze(0))
        ref_a = model(torch.cat([a, torch.tensor([[10]])], 1), model.new_cache(1, 12), torch.arange(7).unsqueeze(0))[0, -1]
        ref_b = model(torch.cat([b, torch.tensor([[11]])], 1), model.new_cache(1, 12), torch.arange(4).unsqueeze(0))[0, -1]
    assert_close_rel(logits[0], ref_a)
    assert_close_rel(logits[1], ref_b)


def test_seam_layers_compose_to_forward(tiny_lm):
    """embed -> layer(i) for all i -> head is exactly the model's forward."""
    m = tiny_lm.model
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.arange(4).unsqueeze(0)
    with torch.inference_mode():
        ref = m(ids, m.new_cache(1, 4), pos)
        cache = m.new_cache(1, 4)
        ctx = m.context(cache, pos)
        x = m.embed(ids)
        for i in range(m.cfg.num_layers):
            x = m.layer(i, x, ctx)
        out = m.head(x)
    assert torch.equal(out, ref)


def test_stats_and_eos(tiny_lm):
    out = tiny_lm.generate([5, 6, 7], max_new_tokens=10)
    s = out.stats
    assert s.new_tokens == len(out.token_ids)
    assert s.forward_passes == len(out.token_ids)  # prefill + one per further token
    assert s.seconds > 0 and s.tokens_per_s > 0
    # EOS stops a row: make the model's first greedy token the EOS id
    first = out.token_ids[0]
    new, _ = decode(tiny_lm.model, [[5, 6, 7]], max_new_tokens=10, eos_token_ids=(first,))
    assert new == [[first]]


def test_context_window_caps_generation(tmp_path):
    make_tiny(tmp_path, "llama", max_position_embeddings=32)
    lm = m2r2.load(tmp_path)
    out = lm.generate(list(range(2, 30)), max_new_tokens=50)
    # the window ends generation after 32 - 28 tokens, unless EOS ends it sooner (and then it is the last one)
    assert 0 < len(out.token_ids) <= 32 - 28
    assert len(out.token_ids) == 32 - 28 or out.finish_reason == "eos"
    with pytest.raises(m2r2.ContextLengthError):
        lm.generate(list(range(2, 34)), max_new_tokens=5)


def test_decode_state_prefill_lengths(tiny_lm):
    st = DecodeState(tiny_lm.model, PROMPTS, [4] * len(PROMPTS), SamplingConfig())
    with torch.inference_mode():
        logits = st.prefill()
    assert logits.shape == (len(PROMPTS), tiny_lm.config.vocab_size)
    assert st.cache.lengths.tolist() == [len(p) for p in PROMPTS]


def test_cost_model_counts_parameters(tiny_lm):
    cfg = tiny_lm.config
    n_layer = sum(p.numel() for p in tiny_lm.model.layers[0].parameters())
    assert cfg.layer_params() == n_layer
    head = tiny_lm.model.lm_head.weight.numel() + tiny_lm.model.norm.weight.numel()
    assert cfg.head_params() == head


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_dense(parts, bias):
    """The bandwidth-friendly layout computes x W^T + b for one row and for many, and round-trips."""
    from m2r2.engine.model import Linear
    torch.manual_seed(parts)
    dense, b = torch.randn(20, 12), torch.randn(20)
    lin = Linear(12, 20, bias, parts)
    with torch.no_grad():
        lin.weight.copy_(Linear.pack(dense, parts))
        if bias:
            lin.bias.copy_(b)
    assert torch.equal(lin.dense(), dense)
    for rows_layout in (False, True):  # the few-rows copy (oneDNN-prepacked) once derived
        if rows_layout:
            lin.build_row_layout()
            assert lin.packed is not None or not torch.backends.mkldnn.is_available()
        for shape in [(12,), (1, 1, 12), (2, 12), (3, 5, 12), (2, 40, 12)]:  # matvec, few-rows and gemm paths
            x = torch.randn(shape)
            ref = torch.nn.functional.linear(x, dense, b if bias else None)
            with torch.no_grad():
                assert_close_rel(lin(x), ref)
            xg = x.clone().requires_grad_(True)  # with autograd the few-rows path falls back to a GEMM
            y = lin(xg)
            assert_close_rel(y, ref)
            y.sum().backward()
            assert_close_rel(xg.grad, dense.sum(0).expand(shape))
    assert copy.deepcopy(lin).packed is None and torch.equal(copy.deepcopy(lin).dense(), dense)


def test_weight_layout_does_not_change_outputs(tiny_dir):
    """Loading for 1 or 2 threads (a different packing of every weight) gives the same greedy tokens."""
    one, two = m2r2.load(tiny_dir, threads=1), m2r2.load(tiny_dir, threads=2)
    assert one.model.layers[0].qkv.parts == 1 and two.model.layers[0].qkv.parts == 2
    assert torch.equal(one.model.layers[0].qkv.dense(), two.model.layers[0].qkv.dense())
    for p in PROMPTS:
        assert one.generate(p, max_new_tokens=32).token_ids == two.generate(p, max_new_tokens=32).token_ids
    torch.set_num_threads(2)
