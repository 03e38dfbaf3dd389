"""Loading never runs code from a user's file and never accepts the wrong thing: checkpoints are read
with ``weights_only=True``, model weights must match config.json, directory identities hash the full
content, saved artifacts are validated, and first-load GGUF conversion leaves no junk behind."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

import m2r2
from m2r2.cli import main
from m2r2.errors import M2R2Error
from m2r2.artifacts import load_checkpoint

from conftest import make_tiny

SRC = Path(m2r2.__file__).parent


class _Planted:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with a full unpickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {}, "step": 1, "payload": _Planted(marker)}, path)


# ---- 1. checkpoints and feature caches: no code runs --------------------------------------------


def test_no_full_unpickle_in_the_package():
    """Every torch.load in the package reads weights only; np.load never allows pickles."""
    bad = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        bad += [f"{f.name}: {m.group(0)}" for m in re.finditer(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True"
                                                                 r"|pickle\.loads?\(", text)]
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                bad.append(f"{f.name}: {call.group(0)}")
    assert not bad, bad


def test_planted_pickle_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("checkpoint.pt", "router_features.pt"):
        _plant(tmp_path / name, marker)
        with pytest.raises(M2R2Error, match="objects other than tensors") as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
        assert not marker.exists()
    (tmp_path / "short.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(M2R2Error, match="unreadable"):
        load_checkpoint(tmp_path / "short.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(M2R2Error, match="not an m2r2 checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-safety")
    make_tiny(d, "llama", num_hidden_layers=2)
    return d


def test_train_resume_from_planted_checkpoint_via_cli(tiny_model_dir, tmp_path, capsys):
    """`m2r2 train` resuming from a crafted checkpoint.pt: one error line, exit 2, the payload never ran."""
    from m2r2.training.data import generate_dataset
    lm = m2r2.load(tiny_model_dir)
    data = tmp_path / "data"
    prompts = [[(5 * i + j) % 250 + 2 for j in range(3 + i % 3)] for i in range(4)]
    generate_dataset(lm, data, None, prompts=prompts, max_new_tokens=4, batch_size=4, shard_size=4, progress=False)
    out, marker = tmp_path / "run", tmp_path / "pwned"
    _plant(out / "checkpoint.pt", marker)
    capsys.readouterr()
    rc = main(["train", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--rank", "4",
               "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert not marker.exists()
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2r2: error: ") and "checkpoint.pt" in err[0], err


# ---- 2. weights must match config.json ---------------------------------------------------------


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 2}, r"unexpected layers\.2\.\S+, .*\(9 in all\)"),
    ({"num_hidden_layers": 4}, r"missing layers\.3\.\S+, .*\(9 in all\)"),
    ({"hidden_size": 128, "head_dim": 16},
     r"mis-shaped embed_tokens\.weight \[256, 64\] \(expected \[256, 128\]\), .*\(30 in all\)"),
    ({"intermediate_size": 96}, r"mis-shaped layers\.0\.mlp\.gate_proj\.weight \[128, 64\] .*\(9 in all\)"),
])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, changes, match):
    make_tiny(tmp_path, "llama")
    _edit_config(tmp_path, **changes)
    with pytest.raises(m2r2.UnsupportedModelError, match=match) as e:
        m2r2.load(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("arch, tie", [("llama", True), ("qwen2", True), ("llama", False)])
def test_matching_checkpoints_still_load(tmp_path, arch, tie):
    hf = make_tiny(tmp_path, arch, tie_word_embeddings=tie)
    lm = m2r2.load(tmp_path)
    assert torch.equal(lm.model.embed_tokens.weight, hf.model.embed_tokens.weight)


# ---- 3. a directory's identity is its full content, hashed once ---------------------------------


def test_dir_identity_hashes_full_content_once(tmp_path, monkeypatch):
    from m2r2.engine import loading
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny(a, "llama")
    b.mkdir()
    body = bytearray((a / "model.safetensors").read_bytes() + b"\0" * (3 << 20))  # > 2 MB: a middle exists
    (a / "model.safetensors").write_bytes(bytes(body))
    body[len(body) // 2] ^= 1  # one byte outside the first and last MB: same names and sizes
    (b / "model.safetensors").write_bytes(bytes(body))
    ia, ib = loading._dir_identity(a), loading._dir_identity(b)
    assert ia.startswith("hf:") and ia != ib

    calls = []
    real = loading.sha256_file
    monkeypatch.setattr(loading, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert loading._dir_identity(a) == ia and loading._dir_identity(b) == ib
    assert calls == []  # both read from the cache
    f = b / "model.safetensors"
    body = bytearray(f.read_bytes())
    body[-1] ^= 1
    f.write_bytes(bytes(body))  # same size, new content: the mtime changes, so it is hashed again
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert loading._dir_identity(b) not in (ia, ib) and calls == [f.resolve()]


# ---- 4. saved artifacts are validated on load ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm2(tiny_model_dir):
    return m2r2.load(tiny_model_dir)


def _edit_weights(f: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _nan_first(sd: dict) -> None:
    k = sorted(k for k in sd if sd[k].is_floating_point())[0]
    sd[k].view(-1)[0] = float("nan")


def test_adapter_weights_shapes_and_draft_vocab_are_validated(tiny_lm2, tmp_path):
    from m2r2.stream.accelerator import Accelerator
    lm, ident = tiny_lm2, tiny_lm2.source.identity
    good = Accelerator.for_model(lm.model, ident, rate=2, rank=4)
    cases = {
        "nan": (lambda d: _edit_weights(d / "adapter.safetensors", _nan_first), "non-finite values in adapters"),
        "rank": (lambda d: _edit_json(d / "adapter.json", rank=8), r"mis-shaped adapters\.0\.down\.weight \[4, 64\]"),
        "rate": (lambda d: _edit_json(d / "adapter.json", rate=1), r"missing adapters\.1\."),
        "negative": (lambda d: (d / "draft_vocab.json").write_text('{"token_ids": [-1, 3]}'), r"outside .*\[-1, 3\]"),
        "too big": (lambda d: (d / "draft_vocab.json").write_text('{"token_ids": [3, 256]}'), "outside"),
        "float": (lambda d: (d / "draft_vocab.json").write_text('{"token_ids": [3, 4.5]}'), "integer token ids"),
        "repeated": (lambda d: (d / "draft_vocab.json").write_text('{"token_ids": [3, 3]}'), "repeated"),
    }
    good.save(tmp_path / "ok")
    (tmp_path / "ok" / "draft_vocab.json").write_text('{"token_ids": [0, 1, 255]}')
    assert Accelerator.load(tmp_path / "ok", lm.model, ident).draft_vocab.tolist() == [0, 1, 255]
    for name, (edit, match) in cases.items():
        d = tmp_path / name
        good.save(d)
        edit(d)
        with pytest.raises(m2r2.AdapterError, match=match) as e:
            Accelerator.load(d, lm.model, ident)
        assert str(d) in str(e.value) and "\n" not in str(e.value), name


def test_peer_router_and_mod_files_are_validated(tiny_lm2, tmp_path):
    from m2r2.decoding.drafters.draft_model import DraftModel
    from m2r2.artifacts import read_draft_vocab
    from m2r2.decoding.drafters.medusa import MedusaHeads
    from m2r2.baselines.mod import MoDConfig, MoDRouters
    from m2r2.stream.router import ARLARouter, RouterConfig
    lm, ident = tiny_lm2, tiny_lm2.source.identity
    MedusaHeads(64, 2, ident).save(tmp_path / "medusa")
    _edit_weights(tmp_path / "medusa" / "medusa.safetensors", _nan_first)
    with pytest.raises(m2r2.AdapterError, match="non-finite"):
        MedusaHeads.load(tmp_path / "medusa", ident)
    _edit_json(tmp_path / "medusa" / "medusa.json", heads=3)
    with pytest.raises(m2r2.AdapterError, match=r"missing blocks\.2\."):
        MedusaHeads.load(tmp_path / "medusa", ident)
    (tmp_path / "medusa" / "draft_vocab.json").write_text('{"token_ids": [-2, 5]}')
    with pytest.raises(m2r2.AdapterError, match="outside"):
        read_draft_vocab(tmp_path / "medusa", lm.config.vocab_size)

    DraftModel(lm.model, [0], 4, ident).save(tmp_path / "draft")
    assert DraftModel.build(tmp_path / "draft", lm.model, ident).cfg.num_layers == 1
    _edit_json(tmp_path / "draft" / "draft.json", rank=2)
    with pytest.raises(m2r2.AdapterError, match=r"mis-shaped model\.layers\.0\.qkv\.a \[4, 64\] \(expected \[2, 64\]"):
        DraftModel.build(tmp_path / "draft", lm.model, ident)
    _edit_json(tmp_path / "draft" / "draft.json", rank=4, layers=[0, 1])
    with pytest.raises(m2r2.AdapterError, match=r"missing model\.layers\.1\."):
        DraftModel.build(tmp_path / "draft", lm.model, ident)

    MoDRouters(MoDConfig(64, 2, [0, 1], base_identity=ident)).save(tmp_path / "mod")
    assert MoDRouters.load(tmp_path / "mod", ident, 2).cfg.routed == [0, 1]
    _edit_weights(tmp_path / "mod" / "mod.safetensors", lambda sd: sd["bias"].fill_(float("inf")))
    with pytest.raises(m2r2.AdapterError, match="non-finite values in bias"):
        MoDRouters.load(tmp_path / "mod", ident, 2)
    MoDRouters(MoDConfig(64, 2, [0, 1], base_identity=ident)).save(tmp_path / "mod")
    _edit_json(tmp_path / "mod" / "mod.json", routed=[0, 5])
    with pytest.raises(m2r2.AdapterError, match="not distinct blocks"):
        MoDRouters.load(tmp_path / "mod", ident, 2)

    ARLARouter(RouterConfig(64, 1, 8)).save(tmp_path / "router")
    _edit_weights(tmp_path / "router" / "router.safetensors", _nan_first)
    with pytest.raises(m2r2.AdapterError, match="non-finite"):
        ARLARouter.load(tmp_path / "router")


# ---- 5. first-load GGUF conversion: no junk, one converter, versioned cache ---------------------


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    """A file with GGUF magic and an empty cache."""
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return f, tmp_path / "cache"


@pytest.fixture
def fake_gguf(gguf_file, monkeypatch):
    """``gguf_file`` and a stand-in for transformers' conversion that records its calls."""
    from m2r2.engine import loading
    calls = []

    def convert(path, tmp, digest, weights=True, hook=None):
        calls.append(tmp.name)
        if weights:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        if hook:
            hook()
        (tmp / "m2r2-cache.json").write_text(json.dumps({"format": loading.CACHE_FORMAT, "sha256": digest,
                                                         "weights": weights}))

    monkeypatch.setattr(loading, "_convert_into", convert)
    return (*gguf_file, calls)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(".tmp-*"))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_conversion_leaves_no_temp_folder(gguf_file, monkeypatch, how):
    """Interrupted inside transformers' conversion: the temporary folder goes (``except Exception`` missed it)."""
    import signal
    import transformers
    from m2r2.engine import loading
    f, cache = gguf_file
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(_leftovers(cache))
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; never reached

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else SystemExit) as e:
        loading.convert_gguf(f)
    assert len(seen) == 1 and len(seen[0]) == 1  # it was interrupted while its temporary folder existed
    assert _leftovers(cache) == [] and not list(cache.glob("gguf-*"))
    if how == "sigterm":
        assert e.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before


def test_stale_temp_folders_are_swept(fake_gguf):
    from m2r2.engine import loading
    f, cache, calls = fake_gguf
    cache.mkdir()
    now = time.time()
    stale = {".tmp-gguf-aaaa-99999999": None,  # its process is gone
             f".tmp-gguf-bbbb-{os.getppid()}": now - 2 * loading.REUSED_PID_SECONDS,  # far too old: a reused pid
             ".tmp-gguf-cccc": now - 2 * loading.STALE_TMP_SECONDS}  # no pid, old
    live = f".tmp-gguf-dddd-{os.getppid()}"  # a conversion running right now in another process
    for name in [*stale, live]:
        (cache / name).mkdir()
        (cache / name / "model.safetensors").write_bytes(b"partial")
        if stale.get(name):
            os.utime(cache / name, (stale[name], stale[name]))
    target = loading.convert_gguf(f)
    assert _leftovers(cache) == [live] and (target / "model.safetensors").is_file() and len(calls) == 1


def test_cache_format_is_checked_on_read(fake_gguf):
    from m2r2.engine import loading
    f, cache, calls = fake_gguf
    target = loading.convert_gguf(f)
    assert loading.convert_gguf(f) == target and len(calls) == 1  # cached
    meta = target / "m2r2-cache.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": loading.CACHE_FORMAT - 1}))
    (target / "leftover-from-old-format").write_text("x")
    assert loading.convert_gguf(f) == target and len(calls) == 2  # another format: converted again
    assert json.loads(meta.read_text())["format"] == loading.CACHE_FORMAT
    assert not (target / "leftover-from-old-format").exists() and _leftovers(cache) == []


def test_config_only_entry_is_completed_when_weights_are_asked_for(fake_gguf):
    """A GGUF run as its blocks converts only its config and tokenizer; an ordinary checkpoint asked for later
    (source.hf_dir) converts the weights into the same entry, once."""
    from m2r2.engine import loading
    f, cache, calls = fake_gguf
    target = loading.convert_gguf(f, weights=False)
    assert not (target / "model.safetensors").exists() and len(calls) == 1
    assert loading.convert_gguf(f, weights=False) == target and len(calls) == 1  # cached
    assert loading.convert_gguf(f) == target and (target / "model.safetensors").is_file() and len(calls) == 2
    assert loading.convert_gguf(f, weights=False) == target and loading.convert_gguf(f) == target
    assert len(calls) == 2  # a full entry serves both


def test_concurrent_first_loads_convert_once(fake_gguf, monkeypatch):
    import threading
    from m2r2.engine import loading
    f, cache, calls = fake_gguf
    real = loading._convert_into
    monkeypatch.setattr(loading, "_convert_into", lambda *a: real(*a, hook=lambda: time.sleep(0.5)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.convert_gguf(f))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1 and _leftovers(cache) == []
