"""Self-speculative decoding with M2R2 drafts on tiny random models: lossless by equality (greedy) and by
distribution (sampling)."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.stream.accelerator import Accelerator
from m2r2.decoding.loop import decode
from m2r2.engine.sampling import SamplingConfig
from m2r2.decoding.speculative import SelfSpeculative

from conftest import assert_close_rel, make_tiny, next_token_probs

PROMPTS = [[5, 17, 33, 99, 4], [7, 8], [200, 13, 13, 13, 54, 66, 71, 2, 9, 120, 33], [42]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-spec")
    make_tiny(d, "llama", num_hidden_layers=6, eos_token_id=None)
    return m2r2.load(d)


def _acc(lm, scale: float, rate: int = 2, seed: int = 0) -> Accelerator:
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=rate, rank=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in acc.adapters:
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * scale)
    return acc.eval()


@pytest.mark.parametrize("scale,rate,gamma,stop", [(0.0, 2, 4, 0.0), (0.3, 2, 3, 0.0), (0.1, 3, 6, 0.3),
                                                   (0.0, 4, 1, 0.0)])
def test_greedy_speculative_equals_plain(lm, scale, rate, gamma, stop):
    acc = _acc(lm, scale, rate)
    for p in PROMPTS:
        plain, _ = decode(lm.model, [p], max_new_tokens=128)
        spec, st = decode(lm.model, [p], max_new_tokens=128,
                          strategy=SelfSpeculative(acc, gamma=gamma, max_gamma=8, stop_below=stop))
        assert spec == plain
        assert st.extra["verify_steps"] == st.steps and st.extra["drafted"] > 0


def test_greedy_speculative_batch_ragged(lm):
    """Rows accept different numbers of drafts per step; each row still equals its own plain output."""
    acc = _acc(lm, 0.05)
    plain = [decode(lm.model, [p], max_new_tokens=128)[0][0] for p in PROMPTS]
    spec, st = decode(lm.model, PROMPTS, max_new_tokens=128, strategy=SelfSpeculative(acc, gamma=4))
    assert spec == plain
    assert 0 < st.extra["acceptance"] < 1  # ragged acceptance really happened
    # per depth: every kept draft counted once at its depth; depth 1 checked on every live row of a step with drafts;
    # a deeper draft checked only where every draft before it was kept
    x = st.extra
    reached, kept = x["depth_reached"], x["depth_kept"]
    assert sum(kept) == x["accepted"] and reached[0] >= x["verify_steps"] and reached[0] <= len(PROMPTS) * x["verify_steps"]
    assert all(reached[d + 1] <= kept[d] for d in range(len(reached) - 1))
    assert x["acceptance_by_depth"][0] == kept[0] / reached[0]
    assert sum(n for n, _ in x["verify_by_rows"].values()) == x["verify_steps"]


def test_speculative_stops_at_eos_and_budget(lm):
    acc = _acc(lm, 0.0)
    plain, _ = decode(lm.model, [PROMPTS[0]], max_new_tokens=40)
    eos = plain[0][17]
    spec, _ = decode(lm.model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=40, eos_token_ids=(eos,),
                     strategy=SelfSpeculative(acc, gamma=5))
    assert spec[0] == plain[0][:plain[0].index(eos) + 1]
    plain1, _ = decode(lm.model, [PROMPTS[1]], max_new_tokens=40, eos_token_ids=(eos,))
    assert spec[1] == plain1[0] and 0 < len(spec[1]) <= 40  # the other row: its own stop, the same tokens


def test_identity_adapter_drafts_are_early_exit_read_outs(lm):
    """An untrained fast stream drafts the layer-F read-out of the slow stream (its acceptance is what
    early exit without adapters gets); a perfect drafter (R=1: the whole model) is always accepted."""
    full = Accelerator.for_model(lm.model, lm.source.identity, rate=1, rank=4)
    out, st = decode(lm.model, [PROMPTS[0]], max_new_tokens=64, strategy=SelfSpeculative(full, gamma=4))
    assert st.extra["acceptance"] == 1.0
    assert st.extra["verify_steps"] < 64 / 3


def test_lm_generate_m2r2_needs_an_adapter(lm):
    with pytest.raises(m2r2.AdapterError):
        lm.generate([5, 6], max_new_tokens=4, strategy="m2r2")


def test_rejection_sampling_keeps_the_model_distribution(lm):
    """Under sampling, the joint law of the first two decode-step tokens equals the model's own (computed
    exactly from its logits), whatever the drafter: total variation within sampling noise (fixed seeds)."""
    s = SamplingConfig(temperature=0.8, top_k=4)
    prompt = PROMPTS[0]
    model = lm.model
    # condition on the first sampled token (from prefill, identical in both paths): take the likeliest
    t0 = int(next_token_probs(model, prompt, s).argmax())
    p1 = next_token_probs(model, prompt + [t0], s)
    exact = {}
    for a in p1.nonzero()[:, 0].tolist():
        p2 = next_token_probs(model, prompt + [t0, a], s)
        for b in p2.nonzero()[:, 0].tolist():
            exact[(a, b)] = float(p1[a] * p2[b])
    acc = _acc(lm, 0.3)  # a poor drafter: many rejections, residual sampling exercised
    counts: dict = {}
    n = 0
    for seed in range(3000):
        out, st = decode(model, [prompt], max_new_tokens=3, sampling=SamplingConfig(0.8, 4, 1.0, seed),
                         strategy=SelfSpeculative(acc, gamma=2, adaptive=False))
        if out[0][0] != t0:
            continue
        key = (out[0][1], out[0][2])
        counts[key] = counts.get(key, 0) + 1
        n += 1
    assert n > 300
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - v) for k, v in exact.items())
    assert set(counts) <= set(exact)
    assert tv < 0.08, tv


# ---- the verifier on hand-written logits ----

from m2r2.decoding.speculative import (Draft, DraftHead, PromptLookupDrafter, Speculative, StreamDrafter,  # noqa: E402
                              verify)

P = torch.tensor([0.5, 0.3, 0.2, 0.0])
S = SamplingConfig(temperature=1.0, seed=0)


def _logits(p: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
    return p.clamp_min(1e-30).log().expand(rows, positions, -1).clone()


def _first_tokens(drafts: torch.Tensor, q: torch.Tensor | None, n: int, seed: int):
    """Verify n rows that all draft the same thing against P; return (accepted, first emitted token)."""
    g = torch.Generator().manual_seed(seed)
    acc, nxt = verify(_logits(P, n, drafts.shape[1] + 1), Draft(drafts.expand(n, -1), None if q is None else
                                                                 q.expand(n, *q.shape[1:])), S, g)
    first = torch.where(acc > 0, drafts[0, 0].expand(n), nxt)
    return acc, first


def _freq(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=4).double() / len(tokens)


def test_verify_always_accepts_when_the_drafter_is_the_model():
    q = P.view(1, 1, 4).expand(1, 3, 4)
    drafts = torch.tensor([[0, 1, 2]])
    acc, _ = _first_tokens(drafts, q, 2000, seed=1)
    assert bool((acc == 3).all())


def test_verify_never_accepts_an_impossible_draft_and_samples_the_model():
    q = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4)  # all mass where the model has none
    acc, first = _first_tokens(torch.tensor([[3]]), q, 20000, seed=2)
    assert bool((acc == 0).all())
    assert (_freq(first) - P.double()).abs().max() < 0.015


@pytest.mark.parametrize("q", [torch.tensor([0.2, 0.6, 0.2, 0.0]), torch.tensor([0.1, 0.1, 0.1, 0.7])])
def test_verify_sometimes_accepts_and_the_residual_restores_the_model(q):
    """Draft sampled from q, accepted with min(1, p/q), residual max(0, p-q): the emitted token is
    distributed as p (checked per draft token and overall), and acceptance is sum(min(p, q))."""
    n = 40000
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).view(n, 1)
    acc, nxt = verify(_logits(P, n, 2), Draft(drafts, q.view(1, 1, 4).expand(n, 1, 4)), S, g)
    first = torch.where(acc > 0, drafts[:, 0], nxt)
    assert (_freq(first) - P.double()).abs().max() < 0.01
    assert abs(float(acc.double().mean()) - float(torch.minimum(P, q).sum())) < 0.01
    rejected = acc == 0
    resid = (P - q).clamp_min(0)
    assert (_freq(nxt[rejected]) - (resid / resid.sum()).double()).abs().max() < 0.015


def test_verify_point_mass_drafts_accept_with_the_model_probability():
    acc, first = _first_tokens(torch.tensor([[1]]), None, 40000, seed=4)
    assert abs(float(acc.double().mean()) - 0.3) < 0.01
    assert (_freq(first) - P.double()).abs().max() < 0.01


def test_verify_greedy_is_the_matching_prefix_plus_the_model_token():
    logits = torch.full((3, 4, 6), -5.0)
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    logits.scatter_(2, target.unsqueeze(-1), 5.0)
    drafts = torch.tensor([[1, 2, 3], [1, 5, 3], [0, 2, 3]])
    acc, nxt = verify(logits, Draft(drafts), SamplingConfig())
    assert acc.tolist() == [3, 1, 0] and nxt.tolist() == [4, 2, 1]


# ---- the peers' drafters: lossless on the same loop ----

REPETITIVE = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12], [3, 4]]


def test_prompt_lookup_finds_the_latest_ngram():
    d = PromptLookupDrafter(max_ngram=2)
    assert d.lookup([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 3) == [4, 8, 1]
    assert d.lookup([1, 2, 3, 7, 3], 2) == [7, 3]  # falls back to a 1-gram
    assert d.lookup([1, 2, 3], 2) == []


@pytest.mark.parametrize("make", [
    lambda acc: PromptLookupDrafter(),
    lambda acc: StreamDrafter(None, depth=2),
    lambda acc: StreamDrafter(acc, vocab=torch.arange(0, 256, 2)),  # reduced draft vocabulary
])
def test_peer_drafters_greedy_equal_plain(lm, make):
    acc = _acc(lm, 0.05)
    prompts = REPETITIVE + PROMPTS
    plain = [decode(lm.model, [p], max_new_tokens=96)[0][0] for p in prompts]
    spec, st = decode(lm.model, prompts, max_new_tokens=96, strategy=Speculative(make(acc), gamma=3))
    assert spec == plain
    assert st.extra["drafted"] > 0 and st.extra["verify_steps"] == st.steps


def test_draft_head_over_a_subset_equals_the_full_head_restricted(lm):
    vocab = torch.tensor([3, 17, 40, 41, 200])
    h = torch.randn(2, lm.config.hidden_size)
    full = lm.model.head(h)[:, vocab]
    assert_close_rel(DraftHead(lm.model, vocab).logits(h), full)
