"""Sampling: validation, reproducibility, and the warped distributions checked statistically."""

from __future__ import annotations

import math

import pytest
import torch

import m2r2
from m2r2.engine.sampling import SamplingConfig


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5), dict(seed=-3)])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(m2r2.SamplingError):
        SamplingConfig(**kwargs)


def test_seeded_sampling_is_reproducible(tiny_lm):
    a = tiny_lm.generate([5, 6, 7], max_new_tokens=30, temperature=1.0, seed=11).token_ids
    b = tiny_lm.generate([5, 6, 7], max_new_tokens=30, temperature=1.0, seed=11).token_ids
    c = tiny_lm.generate([5, 6, 7], max_new_tokens=30, temperature=1.0, seed=12).token_ids
    assert a == b
    assert a != c


def test_top_k_1_is_greedy(tiny_lm):
    g = tiny_lm.generate([5, 6, 7], max_new_tokens=20).token_ids
    s = tiny_lm.generate([5, 6, 7], max_new_tokens=20, temperature=0.7, top_k=1, seed=1).token_ids
    assert g == s


def _empirical(cfg: SamplingConfig, logits: torch.Tensor, n: int = 20000) -> torch.Tensor:
    g = cfg.generator()
    draws = cfg.sample(logits.expand(n, -1), g)
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / n


def test_temperature_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    cfg = SamplingConfig(temperature=0.5, seed=0)
    p = torch.softmax(logits / 0.5, -1)
    emp = _empirical(cfg, logits)
    # 5 standard errors
    tol = 5 * torch.sqrt(p * (1 - p) / 20000) + 1e-3
    assert bool(((emp - p).abs() <= tol).all()), (emp, p)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.8, seed=0)
    probs = cfg.probs(logits)
    assert probs[2] == 0 and probs[3] == 0  # 0.5 + 0.3 reaches 0.8: the tail is cut
    assert math.isclose(float(probs[0]), 0.5 / 0.8, rel_tol=1e-5)
    emp = _empirical(cfg, logits)
    assert emp[2] == 0 and emp[3] == 0
    assert abs(float(emp[0]) - 0.625) < 0.02


def test_top_k_renormalises():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    probs = SamplingConfig(temperature=1.0, top_k=2).probs(logits)
    ref = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(probs[:2], ref)
    assert probs[2:].sum() == 0
