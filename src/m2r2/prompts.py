"""Prompt sets: the shipped evaluation sets by name, or any JSONL file (UTF-8, one JSON object a line) in one
of these formats, tried in this order; every one keeps all of its prompt text:

* MT-Bench / Spec-Bench: ``turns``, a list of strings; the first turn is the prompt;
* ``prompt``: a string (the shipped Koala set, most chat sets);
* Alpaca: ``instruction`` and optional ``input``, joined as ``instruction + "\n\n" + input`` when the input
  is not empty (the reference answer: ``output``);
* self-instruct / Super-NaturalInstructions: ``instruction`` and ``instances``, a list of objects with
  ``input`` (and ``output``); the first instance's input is joined to the instruction the same way;
* Koala (original release): ``Instruction``, with an optional ``Input`` joined the same way.
"""

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
INPUT_FIELDS = {"instruction": "input", "Instruction": "Input"}  # the task's input kept beside an instruction


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
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                      f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _text(v) -> str | None:
    """A prompt field's text: a string, or the first of a list of strings (``turns``)."""
    if isinstance(v, list) and v and isinstance(v[0], str):
        return v[0]
    return v if isinstance(v, str) else None


def _task_input(r: dict, key: str) -> tuple[str, object]:
    """The input (and reference output) that goes with an instruction: ``input`` / ``Input`` beside it, else the
    first of its ``instances``."""
    inp = r.get(INPUT_FIELDS[key])
    if isinstance(inp, str) and inp.strip():
        return inp, None
    inst = r.get("instances")
    if isinstance(inst, list) and inst and isinstance(inst[0], dict):
        inp = inst[0].get("input")
        return (inp if isinstance(inp, str) else ""), inst[0].get("output")
    return "", None


def record_text(r: dict) -> tuple[str | None, object]:
    """The prompt of one record (see the module doc) and the reference answer it carries in its prompt
    fields, if any."""
    for key in PROMPT_FIELDS:
        text = _text(r.get(key))
        if not text:
            continue
        ref = None
        if key in INPUT_FIELDS:
            inp, ref = _task_input(r, key)
            if inp.strip():
                text = f"{text}\n\n{inp}"
        return text, ref
    return None, None


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
        text, inst_ref = record_text(r)
        if not text or not text.strip():
            raise PromptFileError(f"{path}:{lineno}: no prompt in any of the fields {', '.join(PROMPT_FIELDS)}")
        rid = str(r.get("question_id", r.get("id", lineno)))
        ref = r.get("reference") or r.get("output") or r.get("answer") or inst_ref
        records.append(PromptRecord(rid, str(r.get("category", "all")), text,
                                    ref[0] if isinstance(ref, list) and ref else (ref if isinstance(ref, str) else None)))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise PromptFileError(f"prompt file {path} has no prompts")
    return records
