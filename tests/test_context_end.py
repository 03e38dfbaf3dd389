"""Lossless strategies near the end of the context window: a prompt ending k tokens before the model's
limit gets exactly plain decoding's k tokens and ``finish_reason="length"`` (speculative strategies shrink
their drafts to the room left, or verify the pending token alone, instead of stopping early)."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.stream.accelerator import Accelerator
from m2r2.decoding.drafters.draft_model import DraftModelDrafter
from m2r2.decoding.drafters.eagle import EagleDrafter
from m2r2.decoding.loop import decode
from m2r2.decoding.drafters.lookahead import LookaheadDrafter
from m2r2.decoding.drafters.medusa import MedusaDrafter
from m2r2.engine.model import lowp_available
from m2r2.decoding.speculative import PromptLookupDrafter, Speculative, StreamDrafter

from conftest import make_tiny
from test_peers import _draft, _eagle, _medusa

CTX = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-ctx-end")
    make_tiny(d, "llama", num_hidden_layers=4, eos_token_id=None)
    return m2r2.load(d)


def _acc(lm) -> Accelerator:
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=4)
    return acc.eval()


DRAFTERS = {
    "m2r2": lambda lm, tmp: StreamDrafter(_acc(lm)),
    "early-exit": lambda lm, tmp: StreamDrafter(None, depth=2),
    "quant-draft": lambda lm, tmp: StreamDrafter(None, depth=lm.config.num_layers, weights="int8"),
    "prompt-lookup": lambda lm, tmp: PromptLookupDrafter(),
    "lookahead": lambda lm, tmp: LookaheadDrafter(window=4, ngram=4),
    "medusa": lambda lm, tmp: MedusaDrafter(_medusa(lm)),
    "draft-model": lambda lm, tmp: DraftModelDrafter(_draft(lm, tmp)),
    "eagle": lambda lm, tmp: EagleDrafter(_eagle(lm)),
}


def _prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(2, 256, (length // 2 + 1,), generator=g).tolist()
    return (half + half)[:length]  # a repeat, so the lookup drafters find n-grams and draft


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_lossless_strategies_fill_the_context_like_plain(lm, tmp_path, name):
    if name == "quant-draft" and not lowp_available():
        pytest.skip("no int8 kernels on this CPU")
    strategy = Speculative(DRAFTERS[name](lm, tmp_path), gamma=4, max_gamma=8)
    for k in (1, 2, 3, 5, 8, 12):
        prompt = _prompt(CTX - k, seed=k)
        plain = lm.generate(prompt, max_new_tokens=64)
        out = lm.generate(prompt, max_new_tokens=64, strategy=strategy)
        assert len(plain.token_ids) == k and plain.finish_reason == "length"
        assert out.token_ids == plain.token_ids, k
        assert out.finish_reason == "length"
    # a ragged batch: rows at different distances from the end, each equal to its own plain output
    prompts = [_prompt(CTX - k, seed=k) for k in (2, 9, 5)]
    plain, _ = decode(lm.model, prompts, max_new_tokens=64)
    spec, _ = decode(lm.model, prompts, max_new_tokens=64, strategy=strategy)
    assert spec == plain and [len(o) for o in spec] == [2, 9, 5]
