"""The native decode kernels (m2r2.engine.native): the same arithmetic as the PyTorch path up to float32
summation order, used exactly where they are valid, and a clean fallback when they cannot be built."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.engine import native
from m2r2.decoding.loop import decode
from m2r2.engine.model import Linear

from conftest import FAR, assert_close_rel, count_native_blocks, make_tiny, ulps_apart

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")


@pytest.mark.parametrize("in_f,out_f,bias,threads", [(64, 96, False, 2), (37, 13, True, 2), (576, 960, True, 1),
                                                      (48, 200, False, 3)])
def test_gemv_matches_matmul(in_f, out_f, bias, threads):
    g = torch.Generator().manual_seed(0)
    lin = Linear(in_f, out_f, bias, parts=1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    x = torch.randn(1, in_f, generator=g)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = lin(x)
            with native.disabled():
                ref = lin(x)
    finally:
        torch.set_num_threads(prev)
    assert_close_rel(y, ref)
    assert not torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("in_f,out_f", [(64, 96), (36, 13), (576, 1000), (64, 2100)])
def test_gemv_rows_match_float32_products(in_f, out_f, dtype):
    """Several rows in one call (weights read once, tile by tile): each row as a one-row call computes it."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(in_f, out_f, generator=g).to(dtype)
    x, b = torch.randn(5, in_f, generator=g), torch.randn(out_f, generator=g)
    y = native.gemv(x, w, b, out_f)
    assert_close_rel(y, x @ w.float() + b)  # only the summation order differs
    for r in range(5):  # a row's result does not depend on how many rows share the call
        assert torch.equal(native.gemv(x[r:r + 1].contiguous(), w, b, out_f)[0], y[r])


def test_fp16_mode_runs_natively_like_the_fbgemm_path(tiny_lm):
    """One row in fp16 mode: the native kernels read the half copy (same arithmetic as FBGEMM's fp16
    product: half weights, float32 activations and sums)."""
    m = tiny_lm.model
    with m.use_weights("fp16"):
        assert all(lin.half is not None for lin in m._linears())
        got, _ = _one_token_steps(m, list(range(3, 20)), True)
        ref, _ = _one_token_steps(m, list(range(3, 20)), False)
    exact, _ = _one_token_steps(m, list(range(3, 20)), True)
    assert_close_rel(got, ref)
    assert ulps_apart(got, exact) > FAR  # really the half weights
    import copy
    assert copy.deepcopy(m.lm_head).half is None  # a derived copy, not state


def _one_token_steps(model, ids, use_native: bool, chunks=None):
    """Logits (len(ids), V) and cache after feeding ``ids`` (batch 1) one token at a time, or in chunks
    of the given sizes (a prefill, then verification-sized steps)."""
    chunks = chunks or [1] * len(ids)
    assert sum(chunks) == len(ids)
    cache = model.new_cache(1, len(ids) + 1)
    logits, p = [], 0
    prev = native.set_enabled(use_native)
    try:
        with torch.inference_mode():
            for n in chunks:
                logits.append(model(torch.tensor([ids[p:p + n]]), cache, torch.arange(p, p + n).view(1, -1))[0])
                cache.advance(n)
                p += n
    finally:
        native.set_enabled(prev)
    return torch.cat(logits), cache


@pytest.mark.parametrize("overrides", [
    {},  # grouped-query attention (4 query / 2 KV heads)
    {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    {"num_attention_heads": 8, "num_key_value_heads": 1, "hidden_size": 96, "intermediate_size": 80},
])
def test_native_block_matches_pytorch_block(tmp_path, overrides):
    make_tiny(tmp_path, "llama", seed=3, **overrides)
    lm = m2r2.load(tmp_path)
    ids = list(range(5, 29))
    with pytest.MonkeyPatch.context() as mp:
        calls = count_native_blocks(mp)
        got, c1 = _one_token_steps(lm.model, ids, True)
    ref, c2 = _one_token_steps(lm.model, ids, False)
    assert len(calls) == len(ids) * lm.config.num_layers  # every block of every step ran natively
    assert_close_rel(got, ref)
    for a, b in zip(c1.k + c1.v, c2.k + c2.v):  # the K/V written for later tokens agree too
        assert_close_rel(a, b)
    # several tokens per call (a short prefill, then verification-sized steps up to 16 tokens)
    chunks = [3, 1, 2, 16, 2]
    many, c3 = _one_token_steps(lm.model, ids, True, chunks)
    ref_many, _ = _one_token_steps(lm.model, ids, False, chunks)
    assert_close_rel(many, ref_many)
    assert_close_rel(many, got)
    for a, b in zip(c3.k + c3.v, c2.k + c2.v):
        assert_close_rel(a, b)


def test_ragged_batch_steps_run_natively_like_pytorch(tiny_lm, monkeypatch):
    """One token of each of several sequences at different positions (a ragged batched decode step), and
    two tokens of each: each row attends to its own cache row up to its own position."""
    m = tiny_lm.model
    prompts = [[3, 7, 11, 19, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 8]]
    lens = torch.tensor([len(p) for p in prompts])
    results = []
    for use in (True, False):
        prev = native.set_enabled(use)
        try:
            with torch.inference_mode():
                cache = m.new_cache(3, 16)
                for b, p in enumerate(prompts):  # each row's prompt into its own cache row
                    one = m.new_cache(1, 16)
                    m(torch.tensor([p]), one, torch.arange(len(p)).view(1, -1))
                    for layer in range(m.cfg.num_layers):
                        cache.k[layer][b], cache.v[layer][b] = one.k[layer][0], one.v[layer][0]
                step1 = m(torch.tensor([[1], [2], [3]]), cache, lens.view(-1, 1))
                step2 = m(torch.tensor([[4, 5], [6, 7], [8, 9]]), cache, lens.view(-1, 1) + 1 + torch.arange(2))
            results.append((step1, step2, [t.clone() for t in cache.k + cache.v]))
        finally:
            native.set_enabled(prev)
    (a1, a2, ca), (b1, b2, cb) = results
    assert_close_rel(a1, b1)
    assert_close_rel(a2, b2)
    for x, y in zip(ca, cb):
        assert_close_rel(x, y)
    calls = count_native_blocks(monkeypatch)
    out, _ = decode(m, prompts, max_new_tokens=12)
    assert calls  # the batched decode steps took the native path
    with native.disabled():
        ref, _ = decode(m, prompts, max_new_tokens=12)
    assert out == ref


def test_greedy_decoding_is_unchanged_by_the_kernels(tiny_lm):
    prompts = [[3, 7, 11, 19], [5, 6, 7, 8, 9, 10, 11]]
    for p in prompts:
        ours, _ = decode(tiny_lm.model, [p], max_new_tokens=40)
        with native.disabled():
            ref, _ = decode(tiny_lm.model, [p], max_new_tokens=40)
        assert ours == ref


def test_kernels_only_run_where_they_apply(tiny_lm, monkeypatch):
    """Steps of more than 16 token rows, replaced masks, autograd and hooks keep the PyTorch path."""
    calls = count_native_blocks(monkeypatch)
    m = tiny_lm.model
    with torch.inference_mode():
        m(torch.tensor([list(range(17))]), m.new_cache(1, 20), torch.arange(17).view(1, -1))  # 17 tokens
        m(torch.tensor([[4] * 9] * 2), m.new_cache(2, 20), torch.arange(9).expand(2, 9))  # 18 token rows
        ctx = m.context(m.new_cache(1, 8), torch.tensor([[0, 1, 2]]))  # a mask replaced after construction
        ctx.write.mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
        m.layer(0, m.embed(torch.tensor([[4, 5, 6]])), ctx)
    assert not calls
    seen = []
    h = m.layers[0].gate_up.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    try:
        with torch.inference_mode():
            m(torch.tensor([[4]]), m.new_cache(1, 8), torch.tensor([[0]]))
    finally:
        h.remove()
    assert seen and len(calls) == m.cfg.num_layers - 1  # the hooked block ran in PyTorch, its hook fired
    calls.clear()
    x = m.embed(torch.tensor([[4]])).requires_grad_(True)
    ctx = m.context(m.new_cache(1, 8), torch.tensor([[0]]))
    m.layer(0, x, ctx).sum().backward()
    assert not calls and x.grad is not None


def test_a_replaced_linear_keeps_the_pytorch_path(tiny_lm, monkeypatch):
    """A block whose linear was wrapped (a LoRA delta, as the draft-model trainer does) is not what the kernel
    computes: it runs through PyTorch, delta included, and the other blocks still run natively."""
    import copy
    from m2r2.decoding.drafters.draft_model import LoRALinear
    _one_token_steps(tiny_lm.model, [3], True)  # after native steps the model still deep-copies
    m = copy.deepcopy(tiny_lm.model)
    for lin in m._linears():
        lin.build_row_layout()
    lora = LoRALinear(m.layers[1].qkv, rank=4)
    with torch.no_grad():
        lora.b.normal_()
    m.layers[1].qkv = lora
    calls = count_native_blocks(monkeypatch)
    got, _ = _one_token_steps(m, [3, 4, 5], True)
    ref, _ = _one_token_steps(m, [3, 4, 5], False)
    assert 1 not in calls and set(calls) == set(range(m.cfg.num_layers)) - {1}
    assert_close_rel(got, ref)


def test_build_failure_falls_back_with_one_message(tiny_lm, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert not native.available()
    err = capsys.readouterr().err
    assert err.count("native decode kernels unavailable") == 1 and "no-such-compiler" in err
    ref, _ = decode(tiny_lm.model, [[3, 7, 11]], max_new_tokens=8)  # still decodes, on the PyTorch path
    assert len(ref[0]) == 8
    assert not list(tmp_path.glob("kernels/*.so"))


def test_a_built_library_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.available()
    built = list(tmp_path.glob("kernels/*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.available() and built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".so"]  # no temporary left behind


def test_environment_switch_turns_the_kernels_off():
    import os
    import subprocess
    import sys
    code = "from m2r2.engine import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "M2R2_NATIVE": "0"})
    assert out.stdout.strip() == "False" and "unavailable" not in out.stderr  # off: nothing built, nothing said


def test_march_override_is_built_and_cached_apart():
    """M2R2_NATIVE_MARCH picks the -march target (to test the SSE2 or AVX2 code on an AVX-512 machine); it is
    part of the library's cache key, so a build for one target is never loaded for another."""
    import os
    import subprocess
    import sys
    code = "from m2r2.engine import native; print(native.FLAGS[1]); print(native.library_path(native._compiler()).name)"
    env = {k: v for k, v in os.environ.items() if k != "M2R2_NATIVE_MARCH"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**env, **extra}).stdout.split() for extra in ({}, {"M2R2_NATIVE_MARCH": "x86-64"})]
    assert runs[0][0] == "-march=native" and runs[1][0] == "-march=x86-64"
    assert runs[0][1] != runs[1][1]


def test_a_rows_block_result_does_not_depend_on_its_neighbours(tiny_lm, monkeypatch):
    """A decode step of several sequences (one row each, different positions) gives every row bit for bit what
    the step of that sequence alone gives: what lets a server batch requests without changing their outputs."""
    m = tiny_lm.model
    calls = count_native_blocks(monkeypatch)
    g = torch.Generator().manual_seed(5)
    B, L = 6, 40
    lengths = torch.tensor([3, 17, 9, 30, 1, 22])
    ids = torch.randint(0, m.cfg.vocab_size, (B, 1), generator=g)
    cache = m.new_cache(B, L)
    for layer in range(m.cfg.num_layers):  # a filled cache: random K/V below each row's position
        cache.k[layer].copy_(torch.randn(cache.k[layer].shape, generator=g))
        cache.v[layer].copy_(torch.randn(cache.v[layer].shape, generator=g))
    with torch.inference_mode():
        together = m.hidden(ids, cache.rows(0, B, lengths), lengths.view(-1, 1))
        for b in range(B):
            alone = m.hidden(ids[b:b + 1], cache.rows(b, b + 1, lengths[b:b + 1]), lengths[b:b + 1].view(1, 1))
            assert torch.equal(alone[0], together[b]), b
    assert len(calls) == (B + 1) * m.cfg.num_layers  # every block ran natively


def test_the_whole_stack_in_one_call_equals_block_by_block(tiny_lm, monkeypatch):
    """A full-depth step runs every block in one C call (native.blocks) when all of them would run natively: the
    same bits as the block-by-block calls, states and cache alike."""
    m = tiny_lm.model
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 5), generator=g)
    pos = torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        c1, c2 = m.new_cache(2, 16), m.new_cache(2, 16)
        calls = count_native_blocks(monkeypatch)
        whole, counted = [], native.blocks
        monkeypatch.setattr(native, "blocks", lambda *a, **k: whole.append(1) or counted(*a, **k))
        stack = m.hidden(ids, c1, pos)
        assert calls == list(range(m.cfg.num_layers)) and whole == [1]
        monkeypatch.setattr(type(m), "_native_stack", lambda self, x, ctx: None)  # block by block
        calls.clear()
        layered = m.hidden(ids, c2, pos)
        assert calls == list(range(m.cfg.num_layers))
    assert torch.equal(stack, layered)
    for a, b in zip(c1.k + c1.v, c2.k + c2.v):
        assert torch.equal(a, b)
