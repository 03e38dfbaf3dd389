"""Integration tests on the embedded SmolLM2-135M-Instruct (a couple of minutes on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.prompts import load_prompts

from conftest import assert_same_tokens, greedy_reference


@pytest.fixture(scope="module")
def hf_model(embedded_lm):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(embedded_lm.source.hf_dir), dtype=torch.float32).eval()


def test_embedded_shape(embedded_lm):
    c = embedded_lm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert embedded_lm.source.gguf is not None and embedded_lm.source.identity.startswith("gguf:")
    assert embedded_lm.tokenizer.chat_template


def test_greedy_equals_transformers_on_mt_bench(embedded_lm, hf_model):
    prompts = load_prompts("mt-bench")
    for rec in (prompts[0], prompts[20], prompts[50]):  # writing, reasoning, coding
        ids = embedded_lm.encode(rec.text)
        out = embedded_lm.generate(ids, max_new_tokens=64)
        ref = greedy_reference(hf_model, ids, 64)
        assert_same_tokens(out.token_ids, ref, hf_model, ids, embedded_lm.model)


def test_batch_equals_single(embedded_lm):
    texts = ["Why is the sky blue?", "Write a haiku about autumn leaves falling into a quiet river at dusk.", "2+2="]
    singles = [embedded_lm.generate(t, max_new_tokens=24).token_ids for t in texts]
    batch = embedded_lm.generate(prompts=texts, max_new_tokens=24)
    for b, s in zip(batch, singles):
        assert b.token_ids[:len(s)] == s or b.token_ids == s
    assert batch[0].text and isinstance(batch[0].text, str)


def test_cached_conversion_is_reused(embedded_lm, monkeypatch, capfd):
    """A second load reads the cached dequantised weights: transformers never reads the GGUF (the conversion's
    first step), nothing in the cache directory is rewritten, no conversion progress is shown."""
    import transformers
    d = embedded_lm.source.hf_dir
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    gguf_reads = []
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        if k.get("gguf_file"):
            gguf_reads.append(k["gguf_file"])
        return orig(*a, **k)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    capfd.readouterr()
    again = m2r2.load()
    assert gguf_reads == [] and "converting" not in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert again.source.hf_dir == d
    assert torch.equal(again.model.layers[3].qkv.weight, embedded_lm.model.layers[3].qkv.weight)


def test_shipped_adapters_load_and_speculative_output_is_plain(embedded_lm):
    """Every shipped adapter loads for the embedded model, and the lossless strategies on it give the plain
    greedy output token for token on real prompts."""
    from m2r2.stream.accelerator import find_shipped, shipped_dir
    shipped = sorted(shipped_dir().glob("*/adapter.json"))
    assert shipped, "no adapter ships in the package"
    assert find_shipped(embedded_lm.source.identity, 2) is not None
    prompts = load_prompts("mt-bench")
    names = ["m2r2", "early-exit", "prompt-lookup", "eagle"]  # (eagle: the shipped head, from Q8_0 blocks)
    if find_shipped(embedded_lm.source.identity, 2, "exit") is not None:
        names.append("early-exit-adapter")
    if find_shipped(embedded_lm.source.identity, 2, sees_slow=True) is not None:
        names.append("m2r2-eagle")
    # draft trees from the shipped drafters (the main chain plus 2 leaves per depth)
    trees = [("eagle", {"branch": 3}), ("m2r2", {"branch": 3})]
    for rec in (prompts[10], prompts[70]):
        ids = embedded_lm.encode(rec.text)
        plain = embedded_lm.generate(ids, max_new_tokens=48).token_ids
        for name, opts in [(n, {}) for n in names] + trees:
            out = embedded_lm.generate(ids, max_new_tokens=48, strategy=embedded_lm.strategy(name, **opts))
            assert out.token_ids == plain, (name, opts)
            assert out.stats.extra["drafted"] > 0


def test_shipped_sparse_moe_decodes_the_same_under_a_budget():
    """The shipped 16-expert, top-4 MoEfication of the embedded model (recovered: its deltas fold into the experts)
    loads with Q8_0 experts, runs the native expert path, and gives the all-resident tokens under a quarter of the
    experts in fast memory with M2R2 prefetching riding on the slow row."""
    from m2r2.moe.layers import Resident
    from m2r2.moe.memory import ExpertCache
    from m2r2.moe.moefy import load_moefied
    from m2r2.moe.prefetch import M2R2Prefetch, MoEDecode
    from m2r2.moe.stores import LinkStore
    try:
        lm = m2r2.load(threads=1)
    except m2r2.ModelNotFoundError as e:
        pytest.skip(str(e))
    acc = lm.load_accelerator(None, rate=2)
    moe = load_moefied(lm, num_experts=16, expert_format="q8_0")
    assert moe.top_k == 4 and moe.info.get("recovery", {}).get("steps") == 300 and moe.total_experts == 480
    ids = lm.encode(load_prompts("mt-bench")[0].text)
    ref = lm.generate(ids, max_new_tokens=12, strategy=MoEDecode(moe, Resident(moe.bank))).token_ids
    pol = M2R2Prefetch(moe, 4, horizon=2)
    cache = ExpertCache(moe, 120, LinkStore(moe.bank, 8.0, 50e-6))
    cache.policy, cache.reuse = pol, True
    strat = MoEDecode(moe, cache, acc, pol)
    try:
        out = lm.generate(ids, max_new_tokens=12, strategy=strat).token_ids
    finally:
        cache.close()
    assert out == ref and strat.riding and cache.stats.pred_steps > 0 and cache.stats.loads > 0
