"""Self-speculative decoding with M2R2 drafts on tiny random models: lossless by equality (greedy) and by
distribution (sampling)."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.accelerator import Accelerator
from m2r2.generate import decode
from m2r2.sampling import SamplingConfig
from m2r2.speculative import SelfSpeculative

from conftest import make_tiny

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


def test_speculative_stops_at_eos_and_budget(lm):
    acc = _acc(lm, 0.0)
    plain, _ = decode(lm.model, [PROMPTS[0]], max_new_tokens=40)
    eos = plain[0][17]
    spec, _ = decode(lm.model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=40, eos_token_ids=(eos,),
                     strategy=SelfSpeculative(acc, gamma=5))
    assert spec[0] == plain[0][:plain[0].index(eos) + 1]
    assert len(spec[1]) <= 40


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
    with torch.no_grad():
        def dist(ids):
            return s.probs(model(torch.tensor([ids]), model.new_cache(1, len(ids)),
                                 torch.arange(len(ids)).unsqueeze(0))[0, -1])
        # condition on the first sampled token (from prefill, identical in both paths): take the likeliest
        t0 = int(dist(prompt).argmax())
        p1 = dist(prompt + [t0])
        exact = {}
        for a in p1.nonzero()[:, 0].tolist():
            p2 = dist(prompt + [t0, a])
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
