"""MoE offloading: cache hit/miss accounting on scripted routing, outputs identical across strategies and
memories, MoEfication pieces, and Hugging Face MoE classes (tiny random configs) against transformers."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import assert_close_rel, assert_same_tokens, greedy_reference, make_tiny, random_moefication

from m2r2.decoding.loop import decode
from m2r2.moe.layers import MoESpec, Resident
from m2r2.moe.memory import ExpertCache
from m2r2.moe.stores import FileStore, LinkStore
from m2r2.moe.moefy import MoEfyArtifacts, apply, balanced_kmeans, fit_router
from m2r2.moe.prefetch import M2R2Prefetch, MoEDecode, OnDemand, Oracle, SlowPrefetch, Tracing

E, K = 4, 2


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """The tiny random Llama MoEfied with random neuron groups and random routers (4 layers, 4 experts)."""
    import m2r2
    d = tmp_path_factory.mktemp("tiny-moe")
    make_tiny(d, "llama", num_hidden_layers=4)
    lm = m2r2.load(d)
    return lm, apply(lm.model, random_moefication(lm, E, K, seed=0))


def script_routing(moe, sets: list[list[int]]):
    """Make layer l always pick ``sets[l]`` (zero router weights, a bias that ranks those experts first)."""
    saved = [(f.router.weight.clone(), f.router.bias.clone()) for f in moe.ffns]
    for f, s in zip(moe.ffns, sets):
        f.router.weight.zero_()
        f.router.bias.copy_(torch.tensor([10.0 - s.index(e) if e in s else 0.0 for e in range(E)]))
    return saved


def restore(moe, saved):
    for f, (w, b) in zip(moe.ffns, saved):
        f.router.weight.copy_(w)
        f.router.bias.copy_(b)


def run(moe, provider, tokens=6, strategy=None):
    strat = strategy or MoEDecode(moe, provider)
    out, _ = decode(moe.model, [[3, 4, 5, 6]], max_new_tokens=tokens, strategy=strat)
    return out[0]


def fast_stream(lm, moe, seed: int):
    """An R=2 accelerator for the tiny MoE whose fast stream differs from the slow one (random adapter outputs)."""
    from m2r2.stream.accelerator import Accelerator
    acc = Accelerator.for_model(moe.model, lm.source.identity, rate=2)
    torch.manual_seed(seed)
    for a in acc.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.05)
    return acc.eval().requires_grad_(False)


def test_scripted_routing_hit_miss_accounting(tiny_moe):
    _, moe = tiny_moe
    sets = [[0, 1], [1, 2], [2, 3], [3, 0]]  # 8 distinct experts, 2 per layer
    saved = script_routing(moe, sets)
    try:
        steps = 5 * 4  # 5 decode tokens (the first of 6 comes from prefill) x 4 layers
        # the whole working set fits: prefill loads it, every decode lookup hits, nothing is loaded again
        c = ExpertCache(moe, 8, LinkStore(moe.bank, 100.0))
        run(moe, c)
        c.close()
        s = c.stats
        assert (s.lookups, s.hits, s.misses, s.loads, s.late) == (2 * steps, 2 * steps, 0, 0, 0)
        # 6 slots for a cyclic scan over 8 experts: LRU always evicts the one needed next -> every lookup misses
        c = ExpertCache(moe, 6, LinkStore(moe.bank, 100.0), evict="lru")
        run(moe, c)
        c.close()
        assert (c.stats.hits, c.stats.misses, c.stats.loads) == (0, 2 * steps, 2 * steps)
        # the oracle knows the trace: every later need is requested ahead, predictions exact
        tr = Tracing(moe.bank, moe.num_layers)
        run(moe, tr)
        c = ExpertCache(moe, 6, LinkStore(moe.bank, 100.0))
        c.policy = Oracle(tr.trace)
        run(moe, c)
        c.close()
        # only the first decode token's layer 0 misses (prefill left the end of the scan in the cache)
        assert c.stats.misses == 2 and c.stats.hits + c.stats.late == 2 * steps - 2
        assert c.stats.pred_fp == 0 and c.stats.pred_fn == 0 and c.stats.pred_steps == steps - 1
    finally:
        restore(moe, saved)


def test_lru_and_lfu_eviction_order(tiny_moe):
    _, moe = tiny_moe
    script = [[(0, 0), (1, 1)], [(0, 0), (1, 1), (2, 2)], [(0, 0), (3, 3)]]  # per token: (layer, expert) needs
    for evict, expect in (("lru", {(0, 0), (2, 2), (3, 3)}), ("lfu", {(0, 0), (1, 1), (3, 3)})):
        c = ExpertCache(moe, 3, LinkStore(moe.bank, 100.0), evict=evict)
        for token in script:
            c.begin_token()
            for layer, e in token:
                c.fetch(layer, [e])
        c.close()
        # when (3, 3) arrives, lru evicts (1, 1) (used longest ago), lfu evicts (2, 2) (used once)
        assert set(c.map) == expect, evict
        assert (c.stats.hits, c.stats.misses, c.stats.loads) == (3, 4, 4)


def test_prefetch_counts_and_precision(tiny_moe):
    _, moe = tiny_moe
    c = ExpertCache(moe, 4, LinkStore(moe.bank, 100.0))
    c.begin_token()
    c.fetch(0, [0, 1])
    c.predict(c.step_of(1), [2, 3])
    assert c.prefetch((1, 2), c.step_of(1)) and c.prefetch((1, 3), c.step_of(1))
    assert not c.prefetch((1, 2), c.step_of(1))  # already requested
    c.fetch(1, [2, 0])  # one predicted expert used, one not
    c.close()
    s = c.stats
    assert (s.prefetch_loads, s.prefetch_used, s.pred_tp, s.pred_fp, s.pred_fn) == (2, 1, 1, 1, 1)
    assert s.hits + s.late == 1 and s.misses == 3


def test_outputs_identical_across_strategies_and_memories(tiny_moe, tmp_path):
    lm, moe = tiny_moe
    acc = fast_stream(lm, moe, seed=1)
    tr = Tracing(moe.bank, moe.num_layers)
    ref = run(moe, tr, tokens=10)
    assert run(moe, Resident(moe.bank), tokens=10) == ref
    stores = [LinkStore(moe.bank, 5.0, 20e-6), FileStore(tmp_path / "experts", moe.bank)]
    for store in stores:  # real file reads are slow: fewer strategies there
        for name in ("lru", "lfu", "slow", "m2r2", "oracle") if store.kind == "link" else ("lru", "m2r2"):
            c = ExpertCache(moe, 5, store, evict="lfu" if name == "lfu" else "lru")
            pol = {"slow": SlowPrefetch(moe, 3), "m2r2": M2R2Prefetch(moe, 3), "oracle": Oracle(tr.trace)}.get(name, OnDemand())
            c.policy = pol
            strat = MoEDecode(moe, c, acc if name == "m2r2" else None, pol if name == "m2r2" else None)
            try:
                assert run(moe, c, tokens=10, strategy=strat) == ref, (store.kind, name)
            finally:
                c.close()
            assert c.stats.lookups == 9 * 4 * K
            if name in ("slow", "m2r2"):
                assert c.stats.pred_steps > 0
        store.close()


def test_all_experts_is_the_dense_ffn(tmp_path):
    import m2r2
    make_tiny(tmp_path, "llama", num_hidden_layers=2)
    lm = m2r2.load(tmp_path)
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    dense = lm.model(ids, lm.model.new_cache(1, 5), torch.arange(5).view(1, -1))
    c = lm.model.cfg
    perm = torch.stack([torch.randperm(c.intermediate_size).view(E, -1) for _ in range(c.num_layers)])
    art = MoEfyArtifacts(MoESpec(E, E, c.intermediate_size // E, c.hidden_size, router_bias=True), perm,
                         torch.randn(c.num_layers, E, c.hidden_size), torch.zeros(c.num_layers, E))
    art.save(tmp_path / "moe")
    art = MoEfyArtifacts.load(tmp_path / "moe")
    moe = apply(lm.model, art)
    moe_out = moe.model(ids, moe.model.new_cache(1, 5), torch.arange(5).view(1, -1))
    assert_close_rel(moe_out, dense)


def test_balanced_kmeans_and_router_fit():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    feat = centers.repeat_interleave(8, 0) + 0.05 * torch.randn(32, 16, generator=g)
    feat = feat / feat.norm(dim=1, keepdim=True)
    assign = balanced_kmeans(feat, 4, 10, seed=0)
    assert torch.bincount(assign, minlength=4).tolist() == [8, 8, 8, 8]
    for c in range(4):  # the planted groups are recovered
        assert len(set(assign[c * 8:(c + 1) * 8].tolist())) == 1
    X = torch.randn(200, 6, generator=g)
    W = torch.randn(3, 6, generator=g)
    w, b = fit_router(X, X @ W.t() + 0.5, ridge=1e-6)
    torch.testing.assert_close(w, W, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b, torch.full((3,), 0.5), rtol=1e-3, atol=1e-3)


def _tiny_hf_moe(path, arch):
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=0.2, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
        m = transformers.MixtralForCausalLM(cfg)
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                          decoder_sparse_step=1, mlp_only_layers=[], **common)
        m = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=48, num_experts=4, num_experts_per_tok=2, **common)
        m = transformers.OlmoeForCausalLM(cfg)
    m.eval()
    m.save_pretrained(path)
    return m


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_hf_moe_matches_transformers(arch, tmp_path):
    from m2r2.moe.hf import is_hf_moe, load_hf_moe
    hf = _tiny_hf_moe(tmp_path, arch)
    assert is_hf_moe(tmp_path)
    moe = load_hf_moe(tmp_path)
    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits
    ours = moe.model(torch.tensor([prompt]), moe.model.new_cache(1, 8), torch.arange(5).view(1, -1))
    assert_close_rel(ours, ref_logits)
    ref = greedy_reference(hf, prompt, 12)
    out, _ = decode(moe.model, [prompt], max_new_tokens=12, strategy=MoEDecode(moe, Resident(moe.bank)))
    assert_same_tokens(out[0], ref, hf, prompt, moe.model)
    # a budget of a quarter of the experts, slow-state prefetch: the same tokens
    c = ExpertCache(moe, 2, LinkStore(moe.bank, 10.0))
    c.policy = SlowPrefetch(moe, 2)
    try:
        out2, _ = decode(moe.model, [prompt], max_new_tokens=12, strategy=MoEDecode(moe, c))
    finally:
        c.close()
    assert out2 == out and c.stats.loads > 0


@pytest.mark.parametrize("expert_format", ["f32", "q8_0", "q4_1"])
def test_native_expert_path_matches_pytorch(expert_format, tmp_path, monkeypatch):
    """The native expert path (attention half + one experts call per layer) against the PyTorch path, on a prompt
    (experts fetched one at a time), a ragged batch step and a one-row step, for float32 and Q8_0 experts."""
    import m2r2
    from m2r2.engine import native
    if not native.available():
        pytest.skip("no native kernels")
    make_tiny(tmp_path, "llama", num_hidden_layers=3)
    lm = m2r2.load(tmp_path)
    c = lm.model.cfg
    moe = apply(lm.model, random_moefication(lm, E, K, seed=3), expert_format)
    assert next(iter(moe.bank.values())).dtype == (torch.float32 if expert_format == "f32" else torch.uint8)
    calls = {"experts": 0, "attention": 0}
    for name in calls:
        real = getattr(native, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(native, name, counted)
    m = moe.model

    def steps():
        cache = m.new_cache(2, 8)
        prompt = m(torch.tensor([[5, 9, 11, 3, 7], [4, 8, 2, 6, 1]]), cache, torch.arange(5).expand(2, 5))
        ragged = m(torch.tensor([[3], [4]]), cache, torch.tensor([[5], [2]]))
        solo = m.new_cache(1, 8)
        m(torch.tensor([[7, 2, 9]]), solo, torch.arange(3).view(1, -1))
        one = m(torch.tensor([[6]]), solo, torch.tensor([[3]]))
        return prompt, ragged, one

    got = steps()
    assert calls["attention"] == 4 * c.num_layers and calls["experts"] >= 4 * c.num_layers
    with native.disabled():
        ref = steps()
    for a, b in zip(got, ref):
        assert_close_rel(a, b)


def test_fast_row_riding_matches_the_separate_fast_pass(tiny_moe):
    """The M2R2 fast row riding in the slow row's kernel calls (a second cache row, the slow row's experts) computes
    the fast states of the separate PyTorch fast pass, and the slow row's tokens are unchanged."""
    lm, moe = tiny_moe
    from m2r2.engine import native
    if not native.available():
        pytest.skip("no native kernels")
    acc = fast_stream(lm, moe, seed=2)

    def fast_states(disable: bool):
        pol = M2R2Prefetch(moe, K)
        seen = []
        real = pol.after_fast
        pol.after_fast = lambda cache, layer, targets, f: (seen.append(f.clone()), real(cache, layer, targets, f))
        c = ExpertCache(moe, 6, LinkStore(moe.bank, 5.0))
        c.policy = pol
        strat = MoEDecode(moe, c, acc, pol)
        try:
            with native.disabled() if disable else contextlib.nullcontext():
                out = run(moe, c, tokens=6, strategy=strat)
        finally:
            c.close()
        return out, seen, strat.riding

    out, ridden, riding = fast_states(False)
    ref, separate, was_riding = fast_states(True)
    assert riding and not was_riding
    assert out == ref and len(ridden) == len(separate) == 5 * acc.fast_layers
    for a, b in zip(ridden, separate):
        assert_close_rel(a, b)


def test_pinned_experts_stay_and_counts_come_from_other_traces(tiny_moe):
    """pinned-lfu: the most used experts of the calibration counts fill half the budget before decoding and are
    never evicted; a cyclic scan that defeats LRU then hits on them every time."""
    from m2r2.moe.prefetch import Pinned, usage_counts
    _, moe = tiny_moe
    counts = usage_counts([[[[0, 1], [1, 2], [2, 3], [3, 0]]] * 3, [[[0, 1], [2, 3], [2, 3], [3, 0]]]])
    assert counts[(1, 2)] == 4 and counts[(1, 1)] == 3 and counts[(1, 3)] == 1 and (1, 0) not in counts
    sets = [[0, 1], [1, 2], [2, 3], [3, 0]]
    saved = script_routing(moe, sets)
    try:
        c = ExpertCache(moe, 6, LinkStore(moe.bank, 100.0))
        c.policy = Pinned({(l, e): 10 - l for l, s in enumerate(sets) for e in s})  # layers 0 and 1 most used
        c.policy.prepare(c)
        assert c.fixed == {(0, 0), (0, 1), (1, 1)} and c.stats.loads == 0  # 3 = half of 6; loads not counted
        out = run(moe, c)
        c.close()
        assert {(0, 0), (0, 1), (1, 1)} <= set(c.map)
        # the held experts hit on every decode token (3 per token); the other 5 needs cycle through 3 LRU slots
        assert c.stats.hits >= 3 * 5
        assert out == run(moe, Resident(moe.bank))
    finally:
        restore(moe, saved)


def test_m2r2_horizon_holds_predictions_until_near(tiny_moe):
    """With a horizon the fast stream's predictions are recorded at once but their loads are issued only when the
    slow stream comes within that many layers; outputs are unchanged."""
    lm, moe = tiny_moe
    from m2r2.stream.accelerator import Accelerator
    acc = Accelerator.for_model(moe.model, lm.source.identity, rate=2).eval().requires_grad_(False)
    ref = run(moe, Resident(moe.bank), tokens=5)
    issued = {}
    for horizon in (None, 1):
        pol = M2R2Prefetch(moe, K, horizon=horizon)
        c = ExpertCache(moe, 6, LinkStore(moe.bank, 50.0))
        c.policy = pol
        seen = []
        real = c.prefetch
        c.prefetch = lambda key, need, _real=real: (seen.append((key, need, c.now)), _real(key, need))[1]
        try:
            assert run(moe, c, tokens=5, strategy=MoEDecode(moe, c, acc, pol)) == ref
        finally:
            c.close()
        issued[horizon] = seen
        assert c.stats.pred_steps > 0
    assert max(need - now for _, need, now in issued[None]) >= 2  # R=2: layers two ahead predicted at once
    assert all(need - now <= 1 for _, need, now in issued[1])


def test_fast_routers_fit_and_leave_outputs_unchanged(tiny_moe):
    """fit_fast_routers: per predicted layer a map from the fast state to that layer's router logits, the ridge
    chosen on held-out calibration prompts; M2R2 prefetch reading them predicts, and the output stays the
    all-resident one."""
    lm, moe = tiny_moe
    from m2r2.engine import native
    from m2r2.moe.fast_routers import FastRouters, fit_fast_routers
    if not native.available():
        pytest.skip("no native kernels")
    acc = fast_stream(lm, moe, seed=4)
    prompts = [[(5 * i + j) % 200 + 3 for j in range(4 + i % 3)] for i in range(8)]
    routers, info = fit_fast_routers(lm, moe, acc, prompts, max_new_tokens=6, progress=False)
    assert isinstance(routers, FastRouters) and routers.weight.shape == (moe.num_layers, moe.spec.hidden_size, E)
    assert info["heldout_prompts"] == 2 and 0 <= info["heldout_precision_fitted"] <= 1
    assert float(routers.weight[1].abs().sum()) > 0 and float(routers.weight[0].abs().sum()) == 0  # 0 never predicted
    ref = run(moe, Resident(moe.bank), tokens=6)
    pol = M2R2Prefetch(moe, K, routers=routers)
    c = ExpertCache(moe, 5, LinkStore(moe.bank, 20.0))
    c.policy = pol
    try:
        assert run(moe, c, tokens=6, strategy=MoEDecode(moe, c, acc, pol)) == ref
    finally:
        c.close()
    assert c.stats.pred_steps > 0
