"""What every ``m2r2 bench`` command shares on its command line (model, prompts, threads, warm-up, output)
and the prompts those options select: tokenized, validated, with a warm-up prompt outside the set.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import PromptFileError
from .arms import BenchPrompt, validate_prompts

WARMUP_TEXT = "Write two sentences about why benchmarks need a warm-up run."  # not in any shipped set


def add_common_args(p, *, out: str, prompts: str = "mt-bench", max_new_tokens: int = 128) -> None:
    """Model, prompts, threads, warm-up, output and progress options of every ``m2r2 bench`` command."""
    from ..options import int_at_least

    p.add_argument("--model", default=None, help="model directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=prompts, help="built-in set (mt-bench, spec-bench, koala) or JSONL path "
                                                      f"(first turn; default: {prompts})")
    p.add_argument("--prompt-ids", default=None, help="JSONL of already tokenized prompts "
                                                      "({'id', 'category', 'token_ids'}); overrides --prompts")
    p.add_argument("--limit", type=int_at_least("--limit", 1), default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=max_new_tokens,
                   help=f"(default: {max_new_tokens})")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None,
                   help="CPU threads for every arm (default: all cores)")
    p.add_argument("--warmup", type=int_at_least("--warmup", 0), default=1, help="untimed warm-up runs per arm")
    p.add_argument("--out", default=out, help=f"result name: <out-dir>/<out>.json/.md/.png (default: {out})")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--bandwidth-mb", type=int_at_least("--bandwidth-mb", 1), default=256,
                   help="tensor size for the memory bandwidth measurement (default 256 MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_prompt_ids(path: str | os.PathLike, limit: int | None = None) -> list[BenchPrompt]:
    """Prompts already tokenized: JSONL records with ``token_ids`` (or ``prompt_token_ids``), optional
    ``id`` and ``category``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptFileError(f"prompt id file {p} not found")
    from ..prompts import iter_jsonl

    out: list[BenchPrompt] = []
    for lineno, r in iter_jsonl(p):
        ids = r.get("token_ids", r.get("prompt_token_ids")) if isinstance(r, dict) else None
        if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
            raise PromptFileError(f"{p}:{lineno}: needs a non-empty list of non-negative integer token ids "
                                  "in 'token_ids'")
        out.append(BenchPrompt(str(r.get("id", lineno)), str(r.get("category", "all")), tuple(ids)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PromptFileError(f"prompt id file {p} has no prompts")
    return out


def build_prompts(lm, args: argparse.Namespace) -> tuple[list[BenchPrompt], BenchPrompt]:
    """The measured prompts and the warm-up prompt (a text outside the set, or the first prompt)."""
    from ..prompts import load_prompts

    if args.prompt_ids:
        prompts = load_prompt_ids(args.prompt_ids, args.limit)
        warm = prompts[0]
    else:
        recs = load_prompts(args.prompts, limit=args.limit)
        prompts = [BenchPrompt(r.id, r.category, tuple(lm.encode(r.text)), r.text) for r in recs]
        warm = BenchPrompt("warmup", "warmup", tuple(lm.encode(WARMUP_TEXT)), WARMUP_TEXT)
    validate_prompts(prompts, lm.config, args.prompt_ids or args.prompts)  # before any arm is built
    return prompts, warm
