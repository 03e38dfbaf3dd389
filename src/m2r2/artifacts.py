"""Small weight files that ship beside a model (routers, adapters): ``<stem>.safetensors`` + ``<stem>.json``.

Written atomically (temporary files, then ``os.replace``), so an interrupted save never leaves a half
file under the real name; read back with one clear error for a missing or corrupt pair. Also the checks every
saved artifact passes on load (names, shapes, finite values, draft-vocabulary ids) and the one safe reader of
``torch.save`` checkpoints."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from .errors import AdapterError, M2R2Error


def save_pair(path: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], config: dict,
              metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = d / f".{stem}.safetensors.tmp", d / f".{stem}.json.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_w), metadata=metadata)
    tmp_c.write_text(json.dumps(config, indent=1))
    os.replace(tmp_w, d / f"{stem}.safetensors")
    os.replace(tmp_c, d / f"{stem}.json")
    return d


def load_pair(path: str | os.PathLike, stem: str, what: str, build):
    """``build(config_dict)`` -> module; its state is loaded from the weights after ``check_tensors`` against
    the module's own names and shapes. Any failure is one AdapterError naming ``what`` and the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    d = Path(path)
    try:
        module = build(json.loads((d / f"{stem}.json").read_text()))
        sd = load_file(str(d / f"{stem}.safetensors"))
    except (OSError, json.JSONDecodeError, TypeError, ValueError, SafetensorError, RuntimeError) as e:
        raise AdapterError(f"{what} in {d}: missing or corrupt ({e})") from e
    check_tensors(d / f"{stem}.safetensors", sd, shapes_of(module))
    module.load_state_dict(sd)
    return module


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
