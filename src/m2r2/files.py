"""Small weight files that ship beside a model (routers, adapters): ``<stem>.safetensors`` + ``<stem>.json``.

Written atomically (temporary files, then ``os.replace``), so an interrupted save never leaves a half
file under the real name; read back with one clear error for a missing or corrupt pair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import AdapterError


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
