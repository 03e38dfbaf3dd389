"""Small weight files that ship beside a model (routers, adapters): ``<stem>.safetensors`` + ``<stem>.json``.

Written atomically (temporary files, then ``os.replace``), so an interrupted save never leaves a half
file under the real name; read back with one clear error for a missing or corrupt pair."""

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
    """``build(config_dict)`` -> module; its state is loaded from the weights. Any failure is one
    AdapterError naming ``what`` and the directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    d = Path(path)
    try:
        module = build(json.loads((d / f"{stem}.json").read_text()))
        module.load_state_dict(load_file(str(d / f"{stem}.safetensors")))
    except (OSError, json.JSONDecodeError, TypeError, SafetensorError, RuntimeError) as e:
        raise AdapterError(f"{what} in {d}: missing or corrupt ({e})") from e
    return module


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
