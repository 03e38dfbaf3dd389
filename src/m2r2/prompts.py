"""Prompt sets: the shipped evaluation sets by name, or any JSONL file whose records carry a prompt in
``turns`` (first turn), ``prompt``, ``instruction`` or ``Instruction``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import PromptFileError

BUILTIN = {
    "mt-bench": "mt_bench_questions.jsonl",
    "spec-bench": "spec_bench_questions.jsonl",
    "koala": "koala_test_set.jsonl",
}
PROMPT_FIELDS = ("turns", "prompt", "instruction", "Instruction")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    category: str
    text: str
    reference: str | None = None  # a reference answer, where the set has one


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("m2r2") / "data" / BUILTIN[name]))


def iter_jsonl(path: Path):
    """(line number, parsed value) for every non-blank line of a JSONL file; invalid JSON is a
    ``PromptFileError`` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def load_prompts(source: str | Path = "mt-bench", limit: int | None = None) -> list[PromptRecord]:
    """Load prompts from a built-in set name (mt-bench, spec-bench, koala) or a JSONL path."""
    name = str(source)
    path = builtin_path(name) if name in BUILTIN else Path(name).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} not found (built-in sets: {', '.join(BUILTIN)})")
    records: list[PromptRecord] = []
    for lineno, r in iter_jsonl(path):
        if not isinstance(r, dict):
            raise PromptFileError(f"{path}:{lineno}: each line must be a JSON object")
        text = None
        for key in PROMPT_FIELDS:
            v = r.get(key)
            if isinstance(v, list) and v and isinstance(v[0], str):
                text = v[0]
            elif isinstance(v, str):
                text = v
            if text:
                break
        if not text or not text.strip():
            raise PromptFileError(f"{path}:{lineno}: no prompt in any of the fields {', '.join(PROMPT_FIELDS)}")
        rid = str(r.get("question_id", r.get("id", lineno)))
        ref = r.get("reference") or r.get("output") or r.get("answer")
        records.append(PromptRecord(rid, str(r.get("category", "all")), text,
                                    ref[0] if isinstance(ref, list) and ref else (ref if isinstance(ref, str) else None)))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise PromptFileError(f"prompt file {path} has no prompts")
    return records
