"""M2R2 accelerator adapters on tiny random models: identity at init, frozen backbone, shared-cache
attention (parallel training == step-by-step inference), adapter files, and resumable training."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import m2r2
from m2r2.engine import native
from m2r2.stream.accelerator import Accelerator, LossWeights, distill_loss, slow_trace
from m2r2.training.data import generate_dataset
from m2r2.training.adapters import TrainConfig, TrainError, batch_indices, train

from conftest import FAR, assert_close_rel, interrupt_after, make_tiny, random_moefication, ulps_apart

SEQ = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-acc")
    make_tiny(d, "llama", num_hidden_layers=6)
    return m2r2.load(d)


def _perturbed(acc: Accelerator, seed: int = 0) -> Accelerator:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in acc.adapters:
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.3)
    return acc


@pytest.mark.parametrize("rate", [2, 3, 4])
def test_untrained_fast_stream_is_the_slow_stream(lm, rate):
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=rate, rank=8)
    assert acc.fast_layers == -(-6 // rate)
    T = SEQ.shape[1]
    with torch.no_grad():
        slow, _ = slow_trace(lm.model, SEQ)
        # inference path: the same call as the slow stream's, so equal bit for bit (the adapters add zeros)
        c = lm.model.new_cache(1, T)
        step = acc.fast_forward(lm.model, SEQ, lm.model.context(c, torch.arange(T).unsqueeze(0)), return_states=True)
        for l in range(acc.fast_layers + 1):
            assert torch.equal(step[l], slow[l])
        # training path (slow keys before t, own key at t): the same values up to float summation order.
        # Training always runs through PyTorch, so the slow trace it is held to does too (a short sequence
        # would otherwise take the native kernels, whose agreement with PyTorch tests/test_native.py checks)
        with native.disabled():
            slow_pt, cache_pt = slow_trace(lm.model, SEQ)
        fast = acc.parallel_fast_states(lm.model, SEQ, cache_pt.k, cache_pt.v)
    for l in range(acc.fast_layers + 1):
        assert_close_rel(fast[l], slow_pt[l])


def test_parallel_training_attention_equals_step_by_step_inference(lm):
    """Query t sees slow K/V for positions < t and its own fast K/V at t, in both paths."""
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8))
    T = SEQ.shape[1]
    with torch.no_grad():
        _, cache = slow_trace(lm.model, SEQ)
        par = acc.parallel_fast_states(lm.model, SEQ, cache.k, cache.v)
        for t in range(T):
            c = lm.model.new_cache(1, T)
            lm.model(SEQ, c, torch.arange(T).unsqueeze(0))  # the slow stream's cache for every position
            c.advance(T)
            c.crop(t)
            step = acc.fast_forward(lm.model, SEQ[:, t:t + 1], lm.model.context(c, torch.tensor([[t]])),
                                    return_states=True)
            for l in range(1, acc.fast_layers + 1):
                assert_close_rel(step[l][0, 0], par[l][0, t])
    # and the perturbation really changed the stream (the test is not vacuous)
    slow, _ = slow_trace(lm.model, SEQ)
    assert ulps_apart(par[acc.fast_layers], slow[acc.fast_layers]) > FAR


def test_loss_reaches_only_the_adapters(lm):
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = lm.model(SEQ, lm.model.new_cache(1, SEQ.shape[1]), torch.arange(SEQ.shape[1]).unsqueeze(0)).detach()
    opt = torch.optim.SGD(acc.parameters(), lr=0.5)
    valid = torch.ones_like(SEQ, dtype=torch.bool)
    loss0, stats = distill_loss(lm.model, acc, SEQ, valid, LossWeights(kl_layers=(1, 2, 3)))
    assert set(stats["agree"]) == {1, 2, 3} and len(stats["align_by_layer"]) == 3
    loss0.backward()
    assert all(p.grad is None for p in lm.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in acc.parameters())
    opt.step()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = lm.model(SEQ, lm.model.new_cache(1, SEQ.shape[1]), torch.arange(SEQ.shape[1]).unsqueeze(0))
    assert torch.equal(after, ref)  # the slow stream's outputs are untouched
    loss1, _ = distill_loss(lm.model, acc, SEQ, valid, LossWeights(kl_layers=(1, 2, 3)))
    assert float(loss1.detach()) < float(loss0.detach())


def test_adapter_files_roundtrip_and_refuse_other_models(lm, tmp_path):
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8))
    acc.save(tmp_path / "a")
    back = Accelerator.load(tmp_path / "a", lm.model, lm.source.identity)
    for (k, v), (k2, v2) in zip(acc.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(m2r2.AdapterError, match="different base model"):
        Accelerator.load(tmp_path / "a", lm.model, "gguf:someothermodel")
    with pytest.raises(m2r2.AdapterError, match="not an adapter directory"):
        Accelerator.load(tmp_path / "missing", lm.model, lm.source.identity)
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(m2r2.AdapterError, match="unreadable"):
        Accelerator.load(tmp_path / "a", lm.model, lm.source.identity)
    (tmp_path / "a" / "adapter.json").write_text("{not json")
    with pytest.raises(m2r2.AdapterError, match="corrupt"):
        Accelerator.load(tmp_path / "a", lm.model, lm.source.identity)


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(10, s, 4, seed=1) for s in range(5)]
    assert a == [batch_indices(10, s, 4, seed=1) for s in range(5)]
    flat = sum(a[:2], []) + a[2][:2]  # the first epoch: every example once
    assert sorted(flat) == list(range(10))


@pytest.fixture(scope="module")
def data_dir(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    prompts = [[(7 * i + j) % 250 + 2 for j in range(3 + i % 5)] for i in range(12)]
    generate_dataset(lm, d, None, prompts=prompts, max_new_tokens=12, batch_size=4, shard_size=6, progress=False)
    return d


def _log(d) -> list[dict]:
    return [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]


def test_training_resumes_exactly(lm, data_dir, tmp_path, monkeypatch):
    """Stopped after 3 of 6 steps (at a checkpoint), or killed after 4 (between checkpoints: steps 4.. are
    trained again), and resumed == 6 steps in one go, bit for bit, each step logged once; then refuses other
    settings."""
    base = dict(data=str(data_dir), rate=2, rank=4, steps=6, batch_size=3, max_len=24, lr=1e-2, warmup_steps=2,
                checkpoint_every=3, kl_layers=(1, 3))
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **base), lm=lm, progress=False)
    assert whole["done"]
    part = train(TrainConfig(out=str(tmp_path / "part"), **base), lm=lm, progress=False, stop_after=3)
    assert not part["done"] and not (tmp_path / "part" / "adapter.safetensors").exists()
    train(TrainConfig(out=str(tmp_path / "part"), **base), lm=lm, progress=False)
    with monkeypatch.context() as mp:
        interrupt_after(mp, importlib.import_module("m2r2.training.adapters"), "make_batch", 4)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "killed"), **base), lm=lm, progress=False)
    assert [r["step"] for r in _log(tmp_path / "killed")] == [1, 2, 3, 4]  # the checkpoint is step 3's
    train(TrainConfig(out=str(tmp_path / "killed"), **base), lm=lm, progress=False)
    a = Accelerator.load(tmp_path / "whole", lm.model, lm.source.identity)
    assert any(p.abs().sum() > 0 for n, p in a.named_parameters() if n.endswith("up.weight"))
    meta = json.loads((tmp_path / "whole" / "adapter.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["base_identity"] == lm.source.identity
    assert [r["step"] for r in _log(tmp_path / "whole")] == list(range(1, 7))
    for d in ("part", "killed"):
        b = Accelerator.load(tmp_path / d, lm.model, lm.source.identity)
        for (k, v), (_, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, v2), (d, k)
        resumed = json.loads((tmp_path / d / "adapter.json").read_text())
        assert resumed["training"]["tokens_seen"] == meta["training"]["tokens_seen"] > 0
        assert _log(tmp_path / d) == _log(tmp_path / "whole"), d  # each step once, with the same values
    with pytest.raises(TrainError, match="other settings"):
        train(TrainConfig(out=str(tmp_path / "part"), **{**base, "rank": 8}), lm=lm, progress=False)


def test_train_config_validation(data_dir):
    with pytest.raises(TrainError, match="--rate"):
        TrainConfig(data=str(data_dir), rate=5)
    with pytest.raises(TrainError, match="--steps"):
        TrainConfig(data=str(data_dir), steps=0)


def test_analyze_untrained_fast_equals_slow(lm, tmp_path):
    from m2r2.bench.analyze import analyze, plot
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=4)
    res = analyze(lm, [[5, 6, 7, 8], [9, 10, 11]], acc, max_new_tokens=8, progress=False)
    slow, fast = res["streams"]["slow"], res["streams"]["fast"]
    assert slow["agreement"][-1] == 1.0 and abs(slow["cos_to_final"][-1] - 1) < 1e-5
    assert len(fast["agreement"]) == acc.fast_layers + 1
    for k in ("agreement", "cos_to_final"):
        for a, b in zip(fast[k], slow[k][: acc.fast_layers + 1]):
            assert abs(a - b) < 1e-4, k
    doc = {"meta": {"rate": 2, "model": "tiny", "prompts": "x", "n_prompts": 2}, **res}
    plot(doc, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_load_accelerator_errors(lm, tmp_path):
    with pytest.raises(m2r2.AdapterError, match="no m2r2 adapter with rate 2 ships"):
        lm.load_accelerator()
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=3, rank=4)
    acc.save(tmp_path / "r3")
    assert lm.load_accelerator(tmp_path / "r3").cfg.rate == 3


def test_exit_adapter_peer(lm, tmp_path):
    """The Kangaroo/DEED-style peer: the unchanged slow stream to depth F plus one exit adapter. Untrained it
    is the slow stream; parallel (training) == step-by-step (inference); the loss reaches only the adapter;
    the kind survives a save/load and the shipped-adapter lookup keeps kinds apart."""
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8, kind="exit")
    assert len(acc.adapters) == 1 and acc.fast_layers == 3
    T = SEQ.shape[1]
    with torch.no_grad():
        slow, cache = slow_trace(lm.model, SEQ)
        c = lm.model.new_cache(1, T)
        step = acc.fast_forward(lm.model, SEQ, lm.model.context(c, torch.arange(T).unsqueeze(0)))
        assert torch.equal(step, slow[3])
    _perturbed(acc)
    with torch.no_grad():
        par = acc.parallel_fast_states(lm.model, SEQ, cache.k, cache.v)
        c = lm.model.new_cache(1, T)
        step = acc.fast_forward(lm.model, SEQ, lm.model.context(c, torch.arange(T).unsqueeze(0)))
    assert_close_rel(step, par[3])
    assert ulps_apart(par[3], slow[3]) > FAR
    loss, stats = distill_loss(lm.model, acc, SEQ, torch.ones_like(SEQ, dtype=torch.bool))
    loss.backward()
    assert len(stats["align_by_layer"]) == 1
    assert all(p.grad is None for p in lm.model.parameters())
    assert acc.adapters[0].up.weight.grad.abs().sum() > 0
    acc.save(tmp_path / "exit")
    assert Accelerator.load(tmp_path / "exit", lm.model, lm.source.identity).cfg.kind == "exit"
    with pytest.raises(m2r2.AdapterError, match="exit adapter, not a m2r2"):
        lm.load_accelerator(tmp_path / "exit", kind="m2r2")


def test_arla_router_trains_ships_with_the_adapter_and_drives_exits(lm, data_dir, tmp_path):
    """ARLA: causal over depth (layer l's decision reads layers 1..l only), trained by m2r2 train-router
    into the adapter directory, loaded with it, and usable as the m2r2-exit rule (an impossible threshold
    is plain decoding, a zero threshold exits every token at the first allowed layer)."""
    from m2r2.cli import main as cli_main
    from m2r2.stream.router import ARLARouter, RouterConfig
    from m2r2.decoding.loop import decode

    r = ARLARouter(RouterConfig(hidden_size=64, fast_layers=3, latent=8))
    s = torch.randn(5, 3, 64)
    full = r(s)
    for l in (1, 2):
        assert_close_rel(r(s[:, :l])[:, -1], full[:, l - 1])
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=4))
    acc.save(tmp_path / "ad")
    assert cli_main(["train-router", "--model", str(lm.source.hf_dir), "--data", str(data_dir), "--adapter",
                     str(tmp_path / "ad"), "--sequences", "8", "--positions", "4", "--epochs", "3",
                     "--no-progress"]) == 0
    back = lm.load_accelerator(tmp_path / "ad")
    assert back.router is not None and back.router.cfg.training["positions"] > 0
    assert not any(k.startswith("router") for k in back.state_dict())  # never saved into the adapter weights
    back.save(tmp_path / "again")
    Accelerator.load(tmp_path / "again")
    never = lm.strategy("m2r2-exit", adapter=tmp_path / "ad", threshold=1.01)
    always = lm.strategy("m2r2-exit", adapter=tmp_path / "ad", threshold=0.0)
    p = [5, 17, 33, 99, 4]
    plain, _ = decode(lm.model, [p], max_new_tokens=16)
    out, st = decode(lm.model, [p], max_new_tokens=16, strategy=never)
    assert out == plain and st.extra["exited"] == 0
    out, st = decode(lm.model, [p], max_new_tokens=16, strategy=always)
    assert st.extra["exit_depths"] == {2: st.extra["tokens"]}  # ARLA's first allowed layer
    assert st.extra["head_calls"] == st.extra["tokens"]  # one LM-head read per token, at the exit
    with pytest.raises(m2r2.AdapterError, match="no ARLA router"):
        acc.save(tmp_path / "bare")
        lm.strategy("m2r2-exit", adapter=tmp_path / "bare")


def test_router_fit_keeps_the_best_validation_epoch():
    """fit() returns the router of the epoch with the lowest held-out BCE, not the last one: on labels that
    are noise the router can only overfit, so a later epoch is worse on validation and must not be kept."""
    from m2r2.stream.router import ARLARouter, RouterConfig
    from m2r2.training.router import evaluate, fit

    torch.manual_seed(0)
    r = ARLARouter(RouterConfig(hidden_size=16, fast_layers=3, latent=8))
    train = {"states": torch.randn(64, 3, 16), "labels": (torch.rand(64, 3) < 0.5).float()}
    val = {"states": torch.randn(64, 3, 16), "labels": (torch.rand(64, 3) < 0.5).float()}
    res = fit(r, train, val, epochs=30, lr=3e-2, batch=16, progress=False)
    bces = [h["val_bce"] for h in res["history"]]
    assert res["final"]["val_bce"] == min(bces) and bces[-1] > min(bces)  # overfitting happened
    assert_close_rel(evaluate(r, val)["val_bce"], min(bces))  # and its best state was restored


def _killed_and_resumed(trainer, argv, lm, tmp_path, monkeypatch) -> None:
    """Run ``trainer`` (a module with ``_add_args`` and ``main``) with ``argv`` + ``--out`` to completion ("whole"), and
    again killed after step 3 (the checkpoint is step 2's) then re-run ("killed"): the two logs must be the same, each
    of 4 steps logged once, and every weights file the same bits."""
    import argparse

    from safetensors.torch import load_file
    monkeypatch.setattr(importlib.import_module("m2r2.api"), "load", lambda **kw: lm)
    p = argparse.ArgumentParser()
    trainer._add_args(p)

    def run(out: str) -> int:
        return trainer.main(p.parse_args([*argv, "--out", str(tmp_path / out)]))

    frozen = [p.requires_grad for p in lm.model.parameters()]
    try:
        assert run("whole") == 0
        with monkeypatch.context() as mp:
            interrupt_after(mp, importlib.import_module("m2r2.training.adapters"), "make_batch", 3)
            with pytest.raises(KeyboardInterrupt):
                run("killed")
        assert [r["step"] for r in _log(tmp_path / "killed")] == [1, 2, 3]
        assert run("killed") == 0
    finally:
        for q, f in zip(lm.model.parameters(), frozen):
            q.requires_grad_(f)
    assert [r["step"] for r in _log(tmp_path / "whole")] == [1, 2, 3, 4]
    assert _log(tmp_path / "killed") == _log(tmp_path / "whole")
    files = sorted((tmp_path / "whole").rglob("*.safetensors"))
    assert files
    for f in files:
        a, b = load_file(str(f)), load_file(str(tmp_path / "killed" / f.relative_to(tmp_path / "whole")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_peer_training_resumes_with_each_step_logged_once(lm, data_dir, tmp_path, monkeypatch):
    """python -m m2r2.training.peers killed between checkpoints and re-run == one uninterrupted run: the same Medusa
    heads and draft, and each step logged once with the same values."""
    from m2r2.training import peers as peer_train
    _killed_and_resumed(peer_train, ["--data", str(data_dir), "--steps", "4", "--warmup-steps", "1", "--batch-size",
                                     "2", "--max-len", "24", "--medusa-heads", "2", "--draft-layers", "0,5",
                                     "--draft-rank", "4", "--draft-vocab", "64", "--checkpoint-every", "2",
                                     "--no-progress"], lm, tmp_path, monkeypatch)


def test_eagle_training_resumes_with_each_step_logged_once(lm, data_dir, tmp_path, monkeypatch):
    """python -m m2r2.training.eagle killed between checkpoints and re-run == one uninterrupted run (the same head,
    each step logged once); the trained head loads and drafts lossless output."""
    from m2r2.artifacts import read_draft_vocab
    from m2r2.decoding.drafters.eagle import EagleDrafter, EagleHead
    from m2r2.decoding.loop import decode
    from m2r2.decoding.speculative import Speculative
    from m2r2.training import eagle as eagle_train
    _killed_and_resumed(eagle_train, ["--data", str(data_dir), "--steps", "4", "--warmup-steps", "1", "--batch-size",
                                      "2", "--max-len", "24", "--draft-vocab", "64", "--checkpoint-every", "2",
                                      "--no-progress"], lm, tmp_path, monkeypatch)
    vocab = read_draft_vocab(tmp_path / "whole", lm.config.vocab_size)
    head = EagleHead.load(tmp_path / "whole", lm.model, vocab, lm.source.identity)
    prompt = [5, 17, 33, 99, 4]
    plain, _ = decode(lm.model, [prompt], max_new_tokens=16)
    out, st = decode(lm.model, [prompt], max_new_tokens=16, strategy=Speculative(EagleDrafter(head), gamma=2))
    assert out == plain and st.extra["drafted"] > 0


def test_moe_recovery_resumes_and_folds_into_the_experts(lm, data_dir, tmp_path, monkeypatch):
    """python -m m2r2.moe.recover killed between checkpoints and re-run == one uninterrupted run; the saved deltas,
    folded into the experts by moefy.apply, compute what the trainer's masked forward computes with them."""
    import copy

    from m2r2.moe import recover
    from m2r2.moe.moefy import MoEfyArtifacts, apply
    random_moefication(lm, 4, 2, seed=0, random_bias=True).save(tmp_path / "moefied")
    _killed_and_resumed(recover, ["--moe", str(tmp_path / "moefied"), "--data", str(data_dir), "--steps", "4",
                                  "--warmup-steps", "1", "--batch-size", "2", "--max-len", "24", "--rank", "4",
                                  "--lr", "0.05", "--checkpoint-every", "2", "--no-progress"], lm, tmp_path, monkeypatch)
    rec_art = MoEfyArtifacts.load(tmp_path / "whole", lm.source.identity)
    assert rec_art.lora and all(v.dtype == torch.float16 for v in rec_art.lora.values())
    assert rec_art.info["recovery"]["steps"] == 4 and float(rec_art.lora["gu_b"].abs().sum()) > 0
    ids = torch.tensor([[5, 17, 33, 99, 4, 8, 61]])
    trainer_view = recover.Recovery(lm.model, rec_art, rank=4, top_k=2)
    with torch.no_grad():
        for k, p in trainer_view.deltas().items():
            p.copy_(rec_art.lora[k].float())
        want = trainer_view.logits(ids, sparse=True)
    moe = apply(copy.deepcopy(lm.model), rec_art)
    got = moe.model(ids, moe.model.new_cache(1, 8), torch.arange(7).view(1, -1))
    assert_close_rel(got, want)
    # a recovered MoEfication is not recovered twice
    with pytest.raises(Exception, match="already recovered"):
        _killed_and_resumed(recover, ["--moe", str(tmp_path / "whole"), "--data", str(data_dir), "--steps", "1",
                                      "--no-progress"], lm, tmp_path / "again", monkeypatch)


def _seeing(lm, seed: int = 1) -> Accelerator:
    """A rate-2 fast stream that sees the slow stream, its adapters and seer perturbed."""
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8, sees_slow=True), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        acc.seer.up.weight.copy_(torch.randn(acc.seer.up.weight.shape, generator=g) * 0.3)
    return acc


def test_seeing_fast_stream_reads_the_previous_slow_state_in_training_and_inference(lm):
    """m2r2-eagle's fast stream: position t's input reads the slow final state at t-1, the same in the parallel
    training pass and the step-by-step inference pass; untrained (seer up = 0) it is the plain fast stream."""
    T = SEQ.shape[1]
    plain = Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8, sees_slow=True)
    with torch.no_grad():
        slow, cache = slow_trace(lm.model, SEQ)
        prev = torch.cat([torch.zeros_like(slow[-1][:, :1]), slow[-1][:, :-1]], 1)
        assert torch.equal(plain.embed(lm.model, SEQ, prev), lm.model.embed(SEQ))
        acc = _seeing(lm)
        par = acc.parallel_fast_states(lm.model, SEQ, cache.k, cache.v, prev=prev)
        blind = acc.parallel_fast_states(lm.model, SEQ, cache.k, cache.v)
        assert ulps_apart(par[-1], blind[-1]) > FAR  # the seer changes the stream
        for t in range(T):
            c = lm.model.new_cache(1, T)
            lm.model(SEQ, c, torch.arange(T).unsqueeze(0))
            c.advance(T)
            c.crop(t)
            step = acc.fast_forward(lm.model, SEQ[:, t:t + 1], lm.model.context(c, torch.tensor([[t]])),
                                    prev=prev[:, t:t + 1])
            assert_close_rel(step[0, 0], par[-1][0, t])
    # the loss trains the seer too
    loss, _ = distill_loss(lm.model, acc, SEQ, torch.ones_like(SEQ, dtype=torch.bool))
    loss.backward()
    assert acc.seer.up.weight.grad is not None and acc.seer.up.weight.grad.abs().sum() > 0


def test_seeing_adapter_trains_from_a_plain_one_and_drafts_losslessly(lm, data_dir, tmp_path):
    base = dict(data=str(data_dir), rate=2, rank=4, batch_size=3, max_len=24, lr=1e-2, warmup_steps=1)
    train(TrainConfig(out=str(tmp_path / "plain"), steps=2, **base), lm=lm, progress=False)
    train(TrainConfig(out=str(tmp_path / "sees"), steps=2, sees_slow=True, init_from=str(tmp_path / "plain"),
                      **base), lm=lm, progress=False)
    with pytest.raises(TrainError, match="add --sees-slow"):
        train(TrainConfig(out=str(tmp_path / "back"), steps=1, init_from=str(tmp_path / "sees"), **base), lm=lm,
              progress=False)
    with pytest.raises(TrainError, match="rank"):
        train(TrainConfig(out=str(tmp_path / "r8"), steps=1, init_from=str(tmp_path / "plain"),
                          **{**base, "rank": 8}), lm=lm, progress=False)
    acc = Accelerator.load(tmp_path / "sees", lm.model, lm.source.identity)
    plain = Accelerator.load(tmp_path / "plain", lm.model, lm.source.identity)
    assert acc.cfg.sees_slow and acc.seer.up.weight.abs().sum() > 0
    # the plain adapter's weights moved on from where they started (training continued from them)
    assert any(not torch.equal(a, b) for (k, a), (_, b) in zip(plain.state_dict().items(), acc.state_dict().items()))
    prompt = [5, 17, 23, 4, 99, 31, 8]
    ref = lm.generate(prompt, max_new_tokens=24, strategy="plain")
    out = lm.generate(prompt, max_new_tokens=24, strategy=lm.strategy("m2r2-eagle", adapter=str(tmp_path / "sees")))
    assert out.token_ids == ref.token_ids and out.stats.extra["drafted"] > 0
    with pytest.raises(m2r2.AdapterError, match="does not see the slow stream"):
        lm.strategy("m2r2-eagle", adapter=str(tmp_path / "plain"))


@pytest.mark.parametrize("rate", [2, 3])
def test_fast_stream_in_one_native_call_equals_layer_by_layer(lm, rate):
    """A draft step's fast stream runs as one C call (blocks and adapters, ``native.fast_blocks``) where the kernels
    are built: the same states as the layer-by-layer pass, by the relative bound, and the same cache writes."""
    if not native.available():
        pytest.skip("no native kernels here")
    acc = _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=rate, rank=8)).eval()
    T = SEQ.shape[1]
    outs, caches = [], []
    with torch.no_grad():
        for layerwise in (False, True):
            c = lm.model.new_cache(1, T + 2)
            lm.model(SEQ, c, torch.arange(T).unsqueeze(0))
            c.advance(T)
            ctx = lm.model.context(c, torch.tensor([[T]]))
            f = acc.fast_forward(lm.model, torch.tensor([[7]]), ctx, return_states=layerwise)
            outs.append(f[-1] if layerwise else f)
            caches.append(c)
    assert "_native_adapters" in acc.__dict__  # the one-call path ran
    assert_close_rel(outs[0], outs[1])
    for layer in range(acc.fast_layers):
        assert_close_rel(caches[0].k[layer][0, :, T], caches[1].k[layer][0, :, T])
    assert ulps_apart(outs[0], lm.model.embed(torch.tensor([[7]]))) > FAR  # (not vacuous: the stream moved)


def test_fast_stream_native_call_takes_adapters_loaded_in_inference_mode(lm, tmp_path):
    """A server loads and runs strategies under torch.inference_mode: adapters loaded there (inference tensors, no
    version counter) still run the one-call fast stream."""
    if not native.available():
        pytest.skip("no native kernels here")
    _perturbed(Accelerator.for_model(lm.model, lm.source.identity, rate=2, rank=8)).save(tmp_path / "a")
    T = SEQ.shape[1]
    with torch.inference_mode():
        acc = Accelerator.load(tmp_path / "a", lm.model, lm.source.identity)
        c = lm.model.new_cache(1, T + 2)
        lm.model(SEQ, c, torch.arange(T).unsqueeze(0))
        c.advance(T)
        one = acc.fast_forward(lm.model, torch.tensor([[7]]), lm.model.context(c, torch.tensor([[T]])))
        c.crop(T)
        ref = acc.fast_forward(lm.model, torch.tensor([[7]]), lm.model.context(c, torch.tensor([[T]])),
                               return_states=True)[-1]
    assert "_native_adapters" in acc.__dict__
    assert_close_rel(one, ref)
