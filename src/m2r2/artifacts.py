"""The one place m2r2 writes and reads its files: every artifact, checkpoint and cache goes through here.

* ``atomic_write``: a temporary file in the target's directory, flushed to disk (fsync), then ``os.replace``d
  over the real name; the temporary file is removed if anything fails. An interrupted save never leaves a half
  file under the real name. ``write_json``, ``write_tensors`` (safetensors) and ``save_checkpoint``
  (``torch.save``) are its common forms.
* Directory artifacts (adapters, Medusa heads, draft models, routers, MoEfications, family models):
  ``<stem>.safetensors`` + ``<stem>.json`` in one directory, written by ``save_artifact`` and read back by
  ``load_artifact`` with one set of checks and messages: both files present, the config parseable, the base
  model's identity, tensor names/shapes and finite values.
* ``find_shipped``: the artifact of a kind shipped inside the package for a base model.
* The frequent-token draft vocabulary (``draft_vocab.json``) beside an artifact: ``write_draft_vocab`` and
  ``read_draft_vocab``.
* ``load_checkpoint``: the one safe reader of ``torch.save`` checkpoints; ``cache_root``: where derived files go.

The lowest layer: imports only ``errors`` and third-party libraries."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import AdapterError, M2R2Error

PACKAGE_DIR = Path(__file__).resolve().parent
DRAFT_VOCAB = "draft_vocab.json"


# ---- atomic files ---------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], fsync: bool = True) -> Path:
    """Write ``path`` atomically: ``data`` (bytes, text written as UTF-8, or a function writing the file at the
    path it is given) goes to a temporary file beside ``path``, which is synced and renamed over ``path``. On
    any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        if fd >= 0:
            os.close(fd)
            fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent))


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """A safetensors file (``dtype``, if given, converts the floating-point tensors)."""
    from safetensors.torch import save_file
    sd = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
          for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """A training checkpoint or cache, by ``torch.save`` (read back with ``load_checkpoint``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---- directory artifacts --------------------------------------------------------------------------

def save_artifact(path: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], config: dict,
                  metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                  weights_name: str | None = None, config_name: str | None = None) -> Path:
    """Write ``<stem>.safetensors`` (or ``weights_name``) and ``<stem>.json`` (or ``config_name``) into directory
    ``path``, each atomically, the weights first."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / (weights_name or f"{stem}.safetensors"), tensors, metadata, dtype)
    write_json(d / (config_name or f"{stem}.json"), config)
    return d


def load_artifact(path: str | os.PathLike, stem: str, what: str, *, parse: Callable[[dict], object] | None = None,
                  identity: str | None = None, identity_optional: bool = False,
                  validate: Callable[[object], None] | None = None,
                  expected: dict | Callable[[object], dict] | None = None,
                  weights_name: str | None = None, config_name: str | None = None,
                  error: type[M2R2Error] = AdapterError) -> tuple[object, dict[str, torch.Tensor]]:
    """Read a directory artifact: (config, tensors). ``what`` names it in messages ("adapter", "Medusa
    heads"). Checks, in order, each failure one ``error`` naming the file: both files exist; the json parses
    (``parse(raw)`` turns it into the config; its KeyError/TypeError/ValueError count as corruption); the
    config's ``base_identity`` is ``identity`` (when given; ``identity_optional``: an artifact recording none
    passes); ``validate(config)``; the weights are readable; their names and shapes are ``expected`` (a dict or
    a function of the config) and every floating-point value is finite."""
    d = Path(path)
    cfg_file, w_file = d / (config_name or f"{stem}.json"), d / (weights_name or f"{stem}.safetensors")
    if not cfg_file.is_file() or not w_file.is_file():
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise error(f"{d} is not {article} {what} directory (needs {cfg_file.name} and {w_file.name})")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError(f"holds a {type(raw).__name__}, not an object")
        saved = raw.get("base_identity")
        cfg = parse(raw) if parse is not None else raw
    except M2R2Error:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise error(f"{cfg_file} is corrupt: {e}") from e
    if identity is not None and saved != identity and not (identity_optional and not saved):
        raise error(f"the {what} in {d}: made for another model, a different base model "
                    f"({str(saved)[:24]}...) than the one loaded ({identity[:24]}...)")
    if validate is not None:
        validate(cfg)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise error(f"{w_file} is unreadable or corrupt: {e}") from e
    check_tensors(w_file, tensors, expected(cfg) if callable(expected) else expected)
    return cfg, tensors


def save_pair(path: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], config: dict,
              metadata: dict[str, str] | None = None) -> Path:
    return save_artifact(path, stem, tensors, config, metadata)


def load_pair(path: str | os.PathLike, stem: str, what: str, build, identity: str | None = None,
              identity_optional: bool = False):
    """``build(config_dict)`` -> module; its state is loaded from the weights after ``check_tensors`` against
    the module's own names and shapes. Any failure is one AdapterError naming ``what`` and the file."""
    module, sd = load_artifact(path, stem, what, parse=build, identity=identity, identity_optional=identity_optional,
                               expected=shapes_of)
    module.load_state_dict(sd)
    return module


# ---- shipped artifacts ----------------------------------------------------------------------------

def shipped_roots() -> tuple[Path, ...]:
    """The package's folders of shipped artifacts, one sub-directory per artifact."""
    return (PACKAGE_DIR / "adapters", PACKAGE_DIR / "moe" / "shipped")


# kind -> (the config file naming it, the kind a config of that name without a "kind" field has)
SHIPPED_KINDS = {"m2r2": ("adapter.json", "m2r2"), "exit": ("adapter.json", "m2r2"),
                 "medusa": ("medusa.json", None), "draft-model": ("draft.json", None), "eagle": ("eagle.json", None),
                 "mod": ("mod.json", "mod"), "moefy": ("moe.json", "moefy")}


def find_shipped(identity: str, kind: str, where: Callable[[dict], bool] | None = None,
                 roots: tuple[Path, ...] | None = None) -> Path | None:
    """The directory of the artifact of ``kind`` (a key of ``SHIPPED_KINDS``) shipped inside the package for the
    base model ``identity`` whose config also satisfies ``where`` (e.g. the rate), if any; unreadable configs
    are skipped."""
    name, default = SHIPPED_KINDS[kind]
    for root in roots if roots is not None else shipped_roots():
        for f in sorted(root.glob(f"*/{name}")) if root.is_dir() else []:
            try:
                raw = json.loads(f.read_text(encoding="utf-8"))
                if isinstance(raw, dict) and raw.get("base_identity") == identity \
                        and raw.get("kind", default) == kind and (where is None or where(raw)):
                    return f.parent
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return None


# ---- draft vocabularies ---------------------------------------------------------------------------

def write_draft_vocab(path: str | os.PathLike, records: list[dict], size: int = 4096,
                      always: tuple[int, ...] = ()) -> Path:
    """Write ``draft_vocab.json`` into an artifact directory: the ``size`` most frequent response tokens of
    the self-distillation records (the model's own outputs), plus ``always`` (e.g. EOS). Drafting over it
    reads a fraction of the LM head; tokens outside it cannot be drafted but are never wrong."""
    from collections import Counter
    counts = Counter()
    for r in records:
        counts.update(r["response_ids"])
    ids = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    ids = sorted(set(ids) | set(always))
    covered = sum(counts[t] for t in ids) / max(1, sum(counts.values()))
    return write_json(Path(path) / DRAFT_VOCAB, {"size": len(ids), "requested": size,
                                                "train_token_coverage": round(covered, 5), "token_ids": ids},
                      indent=None)


def read_draft_vocab(path: str | os.PathLike, vocab_size: int | None) -> torch.Tensor | None:
    """The draft vocabulary written beside an artifact (``draft_vocab.json``), checked, or None without one."""
    f = Path(path) / DRAFT_VOCAB
    if not f.is_file():
        return None
    try:
        ids = json.loads(f.read_text(encoding="utf-8"))["token_ids"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterError(f"{f} is corrupt: {e}") from e
    return check_token_ids(f, ids, vocab_size)


# ---- checks ---------------------------------------------------------------------------------------

def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes a module's saved state must have."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def shape_mismatches(expected: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]],
                     optional: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """What differs between the tensor names/shapes a file holds and those expected (``optional`` ones may be
    absent), one short phrase per kind naming the first three and the count: "missing a, b, c, ... (9 in all)"."""
    shapes = {**(optional or {}), **expected}
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in shapes]
    misshaped = [f"{k} {list(have[k])} (expected {list(v)})" for k, v in shapes.items()
                 if k in have and tuple(have[k]) != tuple(v)]
    return [f"{what} {_few(names)}" for what, names in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]


def check_tensors(where: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """A saved artifact's tensors must be exactly ``expected`` (names and shapes, as its metadata and the model
    imply) and finite: NaN adapter weights would otherwise load and turn every output into token 0."""
    problems = [] if expected is None else shape_mismatches(expected, {k: tuple(t.shape) for k, t in tensors.items()})
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        problems.append(f"non-finite values in {_few(bad)}")
    if problems:
        raise AdapterError(f"{where} does not match what it was saved for: " + "; ".join(problems))


def check_token_ids(where: str | os.PathLike, ids, vocab_size: int | None) -> torch.Tensor:
    """A draft vocabulary: a non-empty list of unique integer token ids in [0, vocab_size) (a negative id
    would index the LM head from its end; a float would silently truncate)."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise AdapterError(f"{where} must hold a non-empty list of integer token ids")
    t = torch.tensor(ids, dtype=torch.long)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise AdapterError(f"{where} holds token ids outside this model's vocabulary "
                           f"(range [{lo}, {hi}], vocabulary size {vocab_size})")
    if t.unique().numel() != t.numel():
        raise AdapterError(f"{where} holds repeated token ids")
    return t


def load_checkpoint(path: str | os.PathLike, error: type[M2R2Error] = M2R2Error) -> dict:
    """A training checkpoint or feature cache written by ``torch.save``, read with ``weights_only=True``:
    only tensors and plain containers/numbers/strings come back, so a crafted file cannot run code (a full
    unpickle would). Anything else, including files from older formats that pickled other objects, is one
    ``error`` naming the file."""
    p = Path(path)
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal to build anything but tensors and plain data
        raise error(f"{p} holds objects other than tensors and plain data (an older or unknown format, or not "
                    "an m2r2 file); it was not loaded: delete it to start over") from e
    except Exception as e:  # RuntimeError/EOFError/OSError when truncated or damaged
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise error(f"{p} is unreadable ({first}); delete it to start over") from e
    if not isinstance(ck, dict):
        raise error(f"{p} is not an m2r2 checkpoint (holds a {type(ck).__name__}); delete it to start over")
    return ck


def cache_root() -> Path:
    """Where m2r2 keeps what it derives (converted models, built kernels): $M2R2_CACHE, else the XDG cache."""
    root = os.environ.get("M2R2_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "m2r2"
