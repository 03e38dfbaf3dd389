"""Shared fixtures: tiny random Hugging Face checkpoints written to temp dirs (logic tests), and the
embedded model (a few integration tests)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def make_tiny(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random checkpoint of ``arch`` to ``path`` and return the HF model."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=common.pop("tie_word_embeddings", False), **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=common.pop("tie_word_embeddings", True), **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny(d, "llama")
    return d


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    import m2r2
    return m2r2.load(tiny_dir)


@pytest.fixture(scope="session")
def embedded_lm():
    import m2r2
    try:
        return m2r2.load()
    except m2r2.ModelNotFoundError as e:  # CI installs it; a bare checkout may not have it
        pytest.skip(str(e))


def next_token_probs(model, ids: list[int], sampling) -> torch.Tensor:
    """The sampling distribution (V,) of the token after ``ids``, from a fresh full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), model.new_cache(1, len(ids)), torch.arange(len(ids)).unsqueeze(0))
    return sampling.probs(logits[0, -1])


def greedy_reference(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=hf_model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def assert_same_tokens(ours: list[int], ref: list[int], hf_model, prompt: list[int], tie_gap: float = 1e-3):
    """Token equality; a divergence is accepted only where the reference's top-2 logits are a float tie
    (k tokens at once vs one at a time differ by ~1e-6, so argmax can flip on a true tie)."""
    n = min(len(ours), len(ref))
    for i in range(n):
        if ours[i] != ref[i]:
            with torch.no_grad():
                logits = hf_model(torch.tensor([prompt + ref[:i]])).logits[0, -1]
            top2 = logits.topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < tie_gap, f"token {i} differs ({ours[i]} vs {ref[i]}) with a top-2 gap of {gap}"
            return
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"
