"""Early-exit decoding on tiny random models: a rule that never fires equals plain decoding, a rule that
always fires exits at the first allowed depth, and exact lazy recomputation leaves the slow stream's cache."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.stream.accelerator import Accelerator
from m2r2.decoding.early_exit import ConfidenceRule, EarlyExit, ExitRule, FixedDepthRule
from m2r2.decoding.loop import DecodeState, decode
from m2r2.engine.sampling import SamplingConfig

from conftest import FAR, assert_close_rel, make_tiny, ulps_apart

PROMPTS = [[5, 17, 33, 99, 4], [200, 13, 13, 13, 54, 66, 71, 2, 9, 120, 33], [42]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-exit")
    make_tiny(d, "llama", num_hidden_layers=6, eos_token_id=None)
    return m2r2.load(d)


@pytest.fixture(scope="module")
def acc(lm):
    a = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ad in a.adapters:
            ad.up.weight.copy_(torch.randn(ad.up.weight.shape, generator=g) * 0.2)
    return a.eval()


@pytest.mark.parametrize("stream,kv", [("slow", "recompute"), ("slow", "propagate"), ("fast", "recompute"),
                                       ("fast", "propagate")])
def test_an_impossible_threshold_is_plain_decoding(lm, acc, stream, kv):
    strat = EarlyExit(ConfidenceRule(1.01, first=1, every=1), stream, acc if stream == "fast" else None, kv)
    for p in PROMPTS[:2]:
        plain, _ = decode(lm.model, [p], max_new_tokens=32)
        out, st = decode(lm.model, [p], max_new_tokens=32, strategy=strat)
        assert out == plain
        assert st.extra["exited"] == 0 and st.extra["full_passes"] == st.extra["tokens"]


@pytest.mark.parametrize("stream,depth", [("slow", 2), ("fast", 1)])
def test_an_always_firing_rule_exits_every_token_at_the_first_allowed_depth(lm, acc, stream, depth):
    strat = EarlyExit(FixedDepthRule(depth), stream, acc if stream == "fast" else None, "recompute")
    out, st = decode(lm.model, [PROMPTS[0]], max_new_tokens=30, strategy=strat)
    assert st.extra["exit_depths"] == {depth: st.extra["tokens"]} and st.extra["exit_rate"] == 1.0
    # and the tokens are the read-outs at that depth: not the full model's (the test is not vacuous)
    plain, _ = decode(lm.model, [PROMPTS[0]], max_new_tokens=30)
    assert out != plain


def _run(lm, strat, prompt, n):
    state = DecodeState(lm.model, [prompt], [n], SamplingConfig(), cache_slack=0)
    state.pending = state.prefill().argmax(-1)
    toks = [int(state.pending[0])]
    strat.setup(state)
    for _ in range(n - 1):
        toks += strat.step(state)[0]
    return state, toks


class ScriptedRule(ExitRule):  # the declared rule interface (needs_logits defaults to True)
    """Token k exits at depth script[k % len(script)] (None: goes full depth)."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.k = script, -1

    def depths(self, max_depth):
        return tuple(range(1, max_depth + 1))

    def exit(self, depth, hidden, logits):
        if depth == 1:
            self.k += 1
        return depth == self.script[self.k % len(self.script)]


@pytest.mark.parametrize("stream,script", [("slow", [1, 3, None, 2, 4, 1, 1, None, 5]),
                                           ("fast", [1, 3, None, 2, 2, 1, None])])
def test_lazy_recomputation_leaves_the_slow_streams_cache(lm, acc, stream, script):
    """Tokens exit at mixed depths; after the lazy layers are flushed, the cache holds exactly what a
    full-depth forward over the same tokens writes, so a later full-depth token sees the same K/V."""
    strat = EarlyExit(ScriptedRule(script), stream, acc if stream == "fast" else None, "recompute")
    prompt = PROMPTS[1]
    state, toks = _run(lm, strat, prompt, 24)
    assert strat.exited > 0 and strat.extra_rows > 0
    strat.flush(state)
    committed = prompt + toks[:-1]
    T = len(committed)
    assert int(state.cache.lengths[0]) == T
    ref = lm.model.new_cache(1, T)
    lm.model(torch.tensor([committed]), ref, torch.arange(T).unsqueeze(0))
    for i in range(lm.config.num_layers):
        assert_close_rel(state.cache.k[i][:, :, :T], ref.k[i])
        assert_close_rel(state.cache.v[i][:, :, :T], ref.v[i])


def test_propagation_approximates_the_skipped_layers(lm):
    """CALM-style propagation writes K/V for the skipped layers from the exit state: not the slow stream's."""
    strat = EarlyExit(FixedDepthRule(2), "slow", None, "propagate")
    prompt = PROMPTS[1]
    state, toks = _run(lm, strat, prompt, 12)
    committed = prompt + toks[:-1]
    T = len(committed)
    ref = lm.model.new_cache(1, T)
    lm.model(torch.tensor([committed]), ref, torch.arange(T).unsqueeze(0))
    P = len(prompt)
    assert_close_rel(state.cache.k[1][:, :, :T], ref.k[1])  # below the exit: exact
    assert ulps_apart(state.cache.k[4][:, :, P:T], ref.k[4][:, :, P:T]) > FAR


def test_early_exit_refuses_batches(lm):
    with pytest.raises(m2r2.StrategyError, match="batch 1"):
        decode(lm.model, PROMPTS[:2], max_new_tokens=4, strategy=EarlyExit(FixedDepthRule(1)))


def test_skipdecode_without_skipping_is_plain_and_never_reads_a_skipped_key(lm):
    from m2r2.baselines.layer_skip import SkipDecode
    p = PROMPTS[1]
    plain, _ = decode(lm.model, [p], max_new_tokens=24)
    out, st = decode(lm.model, [p], max_new_tokens=24, strategy=SkipDecode(min_layers=6, max_layers=6))
    assert out == plain and st.extra["mean_slow_layers"] == 6
    # poison every generated slot first: a token reading a K/V that an earlier token skipped would see NaN
    strat = SkipDecode(min_layers=1, span=10)
    state = DecodeState(lm.model, [p], [24], SamplingConfig())
    state.pending = state.prefill().argmax(-1)
    for i in range(lm.config.num_layers):
        state.cache.k[i][:, :, len(p):] = float("nan")
        state.cache.v[i][:, :, len(p):] = float("nan")
    strat.setup(state)
    for _ in range(20):
        strat.step(state)
    assert [strat.depth(t, 6) for t in (0, 5, 10, 30)] == [6, 4, 1, 1]
    T = int(state.cache.lengths[0])
    top = state.cache.k[-1][:, :, :T]
    assert not torch.isnan(top).any()  # the top layer is always run
    skipped = [len(p) + t for t in range(20) if strat.depth(t, 6) < 6]
    assert len(skipped) > 10 and torch.isnan(state.cache.k[0][:, :, skipped]).all()  # layer 0 really skipped


# ---- Mixture-of-Depths routing, post hoc ----

def _routers(lm, scores_below: bool):
    """Hand-set routers: every score is 0; thresholds from quantiles all 1 (skip) or all -1 (never)."""
    from m2r2.baselines.mod import MoDConfig, MoDRouters
    L = lm.config.num_layers
    r = MoDRouters(MoDConfig(lm.config.hidden_size, L, list(range(1, L - 1)), lm.source.identity))
    r.quantiles.fill_(1.0 if scores_below else -1.0)
    return r


def test_mod_that_skips_nothing_is_plain_decoding(lm):
    from m2r2.baselines.layer_skip import MoDSkip
    for routers, skip in ((_routers(lm, False), 0.5), (_routers(lm, True), 0.0)):
        for p in PROMPTS[:2]:
            plain, _ = decode(lm.model, [p], max_new_tokens=24)
            out, st = decode(lm.model, [p], max_new_tokens=24, strategy=MoDSkip(routers, skip))
            assert out == plain and st.extra["skipped_blocks"] == 0


def test_mod_skipping_every_routed_block_runs_first_and_last_and_writes_their_kv(lm):
    """Every routed block skipped: the token's state passes blocks 1..L-2 unchanged, and each skipped
    block's K/V are the ones that block computes from the state entering it (so a later token finds them)."""
    from m2r2.baselines.layer_skip import MoDSkip
    L = lm.config.num_layers
    strat = MoDSkip(_routers(lm, True), 0.5, first=1)
    prompt = PROMPTS[1]
    state, toks = _run(lm, strat, prompt, 6)
    assert strat.skipped == (L - 2) * 5 and strat.stats()["mean_slow_layers"] == 2
    assert MoDSkip(_routers(lm, True), 0.5).first == L // 3  # by default the first third is never routed
    # the first generated token (position P) by hand: block 0, then K/V of 1..L-2 from that same state
    model, P = lm.model, len(prompt)
    cache = model.new_cache(1, P + 1)
    model(torch.tensor([prompt]), cache, torch.arange(P).unsqueeze(0))
    cache.advance(P)
    ctx = model.context(cache, torch.tensor([[P]]))
    h = model.layer(0, model.embed(torch.tensor([[toks[0]]])), ctx)
    for i in range(1, L - 1):
        blk = model.layers[i]
        _, k, v = blk.qkv_proj(blk.input_norm(h), ctx.cos, ctx.sin)
        assert_close_rel(state.cache.k[i][:, :, P:P + 1], k)
        assert_close_rel(state.cache.v[i][:, :, P:P + 1], v)
    h = model.layer(L - 1, h, ctx)
    assert int(model.head(h)[0, 0].argmax()) == toks[1]


def test_mod_fit_calibrates_capacity_and_files_round_trip(lm, tmp_path):
    """Fitted on a few sequences, the per-block thresholds skip about the asked fraction of held-out
    positions; save/load keeps them; another model's routers are refused; a corrupt file is an error."""
    from m2r2.errors import AdapterError
    from m2r2.baselines.mod import MoDRouters
    from m2r2.training.mod import block_updates, fit
    from m2r2.training.adapters import make_batch
    g = torch.Generator().manual_seed(0)
    recs = [{"prompt_ids": torch.randint(3, 250, (6,), generator=g).tolist(),
             "response_ids": torch.randint(3, 250, (40,), generator=g).tolist()} for _ in range(12)]
    routed = list(range(1, lm.config.num_layers - 1))
    routers, report = fit(lm, recs[:8], recs[8:], routed, ridge=1.0, progress=False)
    assert report["train_positions"] > 0 and set(report["per_layer"]) == set(routed)
    thr = routers.thresholds(0.3)
    frac = []
    for r in recs[8:]:
        ids, mask = make_batch([r], [0], 320)
        for i, (x, _) in block_updates(lm.model, ids, mask, routed).items():
            frac.append((routers.score(i, x) < thr[i]).float().mean())
    assert abs(float(torch.stack(frac).mean()) - 0.3) < 0.05  # calibrated on exactly these positions
    routers.save(tmp_path / "mod")
    back = MoDRouters.load(tmp_path / "mod", lm.source.identity, lm.config.num_layers)
    assert back.thresholds(0.3) == thr
    with pytest.raises(AdapterError, match="another model"):
        MoDRouters.load(tmp_path / "mod", "gguf:someone-else")
    (tmp_path / "mod" / "mod.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="corrupt"):
        MoDRouters.load(tmp_path / "mod")


# ---- riding: the slow row advances in the same calls as the fast row ----

def test_riding_with_an_impossible_threshold_is_plain_decoding(lm, acc):
    for kv in ("recompute", "propagate"):
        strat = EarlyExit(ConfidenceRule(1.01, first=1, every=1), "fast", acc, kv, ride=True)
        for p in PROMPTS[:2]:
            plain, _ = decode(lm.model, [p], max_new_tokens=32)
            out, st = decode(lm.model, [p], max_new_tokens=32, strategy=strat)
            assert out == plain and st.extra["exited"] == 0


@pytest.mark.parametrize("script", [[1, 3, None, 2, 2, 1, None], [1, 1, 2, 3]])
def test_riding_exits_like_the_fast_stream_alone_and_leaves_the_slow_cache(lm, acc, script):
    """The fast row computes exactly what it computes alone (same tokens, same exits), and after a flush
    the cache holds the slow stream's K/V: the slow row resumed where the fast stream stopped."""
    alone = EarlyExit(ScriptedRule(script), "fast", acc, "recompute")
    riding = EarlyExit(ScriptedRule(script), "fast", acc, "recompute", ride=True)
    prompt = PROMPTS[1]
    _, toks_alone = _run(lm, alone, prompt, 24)
    state, toks = _run(lm, riding, prompt, 24)
    assert toks == toks_alone and riding.exit_hist == alone.exit_hist and riding.exited > 0
    assert riding.extra_rows < alone.extra_rows + riding.tokens * acc.fast_layers  # resumed, not restarted
    riding.flush(state)
    committed = prompt + toks[:-1]
    T = len(committed)
    ref = lm.model.new_cache(1, T)
    lm.model(torch.tensor([committed]), ref, torch.arange(T).unsqueeze(0))
    for i in range(lm.config.num_layers):
        assert_close_rel(state.cache.k[i][:, :, :T], ref.k[i])
        assert_close_rel(state.cache.v[i][:, :, :T], ref.v[i])


def test_riding_needs_the_fast_stream(acc):
    with pytest.raises(m2r2.StrategyError, match="ride"):
        EarlyExit(FixedDepthRule(1), "slow", None, "recompute", ride=True)


def test_calm_with_one_exit_adapter_reads_out_through_it_at_its_depth(lm):
    """Threshold 0: every token exits at the adapter's depth, and its token is the read-out of the slow
    state *plus the exit adapter* there (not the plain read-out); an impossible threshold is plain."""
    from m2r2.stream.accelerator import Accelerator
    ex = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8, kind="exit")
    with torch.no_grad():
        ex.adapters[0].up.weight.copy_(torch.randn(ex.adapters[0].up.weight.shape,
                                                   generator=torch.Generator().manual_seed(1)) * 0.5)
    ex.eval()
    F_ = ex.fast_layers
    p = PROMPTS[1]
    never = EarlyExit(ConfidenceRule(1.01, first=F_, every=6), "slow", None, "recompute", exit_adapter=ex)
    assert decode(lm.model, [p], max_new_tokens=16, strategy=never)[0] == decode(lm.model, [p], max_new_tokens=16)[0]
    strat = EarlyExit(ConfidenceRule(0.0, first=F_, every=6, last=False), "slow", None, "propagate", exit_adapter=ex)
    assert strat.rule.depths(5) == (F_,)
    state, toks = _run(lm, strat, p, 3)
    assert strat.exit_hist == {F_: 2}
    model, P = lm.model, len(p)  # the first decode step's token, by hand
    cache = model.new_cache(1, P + 1)
    model(torch.tensor([p]), cache, torch.arange(P).unsqueeze(0))
    cache.advance(P)
    ctx = model.context(cache, torch.tensor([[P]]))
    h = model.embed(torch.tensor([[toks[0]]]))
    for i in range(F_):
        h = model.layer(i, h, ctx)
    with_adapter = int(model.head(h + ex.adapters[0](h))[0, 0].argmax())
    assert toks[1] == with_adapter
    with pytest.raises(m2r2.StrategyError, match="exit_adapter"):
        EarlyExit(FixedDepthRule(1), "fast", ex, "recompute", exit_adapter=ex)
