"""artifacts.py, the one place files are written and read: atomic writes, directory artifacts, shipped lookup,
draft vocabularies."""

import json

import pytest
import torch

import m2r2
from m2r2.artifacts import (atomic_write, find_shipped, load_artifact, read_draft_vocab, save_artifact,
                            shipped_roots, write_draft_vocab, write_json)


def test_atomic_write_replaces_whole_files_and_cleans_up_on_failure(tmp_path):
    f = tmp_path / "x.json"
    write_json(f, {"a": 1})
    assert json.loads(f.read_text()) == {"a": 1}
    atomic_write(f, b"\x00\x01")
    assert f.read_bytes() == b"\x00\x01"

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(f, broken)
    assert f.read_bytes() == b"\x00\x01"  # the old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary file left


def test_directory_artifact_round_trip_and_checks(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}
    save_artifact(tmp_path / "a", "thing", t, {"base_identity": "id-1", "n": 2}, dtype=torch.float16)
    cfg, back = load_artifact(tmp_path / "a", "thing", "thing", identity="id-1", expected={"w": (2, 3)})
    assert cfg["n"] == 2 and back["w"].dtype == torch.float16 and torch.equal(back["w"].float(), t["w"])
    with pytest.raises(m2r2.AdapterError, match="different base model"):
        load_artifact(tmp_path / "a", "thing", "thing", identity="id-2")
    with pytest.raises(m2r2.AdapterError, match=r"mis-shaped w \[2, 3\] \(expected \[3, 2\]\)"):
        load_artifact(tmp_path / "a", "thing", "thing", expected={"w": (3, 2)})
    with pytest.raises(m2r2.AdapterError, match="not an adapter directory"):
        load_artifact(tmp_path / "missing", "thing", "adapter")
    (tmp_path / "a" / "thing.json").write_text("{not json")
    with pytest.raises(m2r2.AdapterError, match="corrupt"):
        load_artifact(tmp_path / "a", "thing", "thing")


def test_find_shipped_and_draft_vocab(tmp_path):
    root = tmp_path / "shipped"
    save_artifact(root / "r2", "adapter", {}, {"base_identity": "m", "rate": 2})
    save_artifact(root / "x2", "adapter", {}, {"base_identity": "m", "rate": 2, "kind": "exit"})
    (root / "bad").mkdir()
    (root / "bad" / "medusa.json").write_text("{")
    assert find_shipped("m", "m2r2", lambda raw: raw["rate"] == 2, roots=(root,)) == root / "r2"
    assert find_shipped("m", "exit", roots=(root,)) == root / "x2"
    assert find_shipped("m", "m2r2", lambda raw: raw["rate"] == 3, roots=(root,)) is None
    assert find_shipped("other", "m2r2", roots=(root,)) is None
    assert find_shipped("m", "medusa", roots=(root,)) is None  # an unreadable config is skipped
    assert all(r.is_relative_to(shipped_roots()[0].parent) for r in shipped_roots())

    assert read_draft_vocab(root / "r2", 100) is None
    write_draft_vocab(root / "r2", [{"response_ids": [5, 5, 7, 9]}, {"response_ids": [7, 5]}], size=2, always=(1,))
    assert read_draft_vocab(root / "r2", 100).tolist() == [1, 5, 7]
    with pytest.raises(m2r2.AdapterError, match="outside"):
        read_draft_vocab(root / "r2", 6)
