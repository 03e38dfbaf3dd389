"""The benchmark harness every ``m2r2 bench`` command uses.

An *arm* is one way of generating (an m2r2 strategy or an external engine) behind one small protocol.
``run_benchmark`` runs every arm on every prompt, interleaved per prompt so that machine noise (other
processes, thermal state) hits all arms alike, each arm in its own worker process so that no engine's
threads (llama.cpp's, or a shared OpenMP pool spinning differently) slow another arm down; ``summarize``
turns the per-(arm, prompt) records into medians, per-prompt speed ratios and output-equality counts;
``write_results`` writes one JSON file with a fixed schema plus a markdown table and a chart rendered
from it. ``run_start`` / ``run_end`` record the provenance (commit, dirty state, load, bandwidth).

Every arm counts the same thing: new tokens generated for the prompt (the first one included, an EOS
included when produced) over the wall time of the whole call (prefill + decode).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch

SCHEMA_VERSION = 1

from ..provenance import (LOAD_WARNING, RESULTS_PREFIX, command_line, machine_info, measure_bandwidth, pin_threads,
                          pinned_threads, roofline, run_end, run_start)



# ---------------------------------------------------------------- prompts, arms, results

@dataclass(frozen=True)
class BenchPrompt:
    """One measured prompt. Arms consume ``token_ids`` (already chat-templated), so all see identical input."""
    id: str
    category: str
    token_ids: tuple[int, ...]
    text: str | None = None


@dataclass
class ArmResult:
    new_tokens: int  # generated tokens, first included, EOS included when produced
    seconds: float  # wall time of the call: prefill + decode
    token_ids: list[int] | None = None  # the new tokens, where the arm can report them
    forward_passes: int | None = None  # full-model forward calls (prefill included), where known
    extra: dict = field(default_factory=dict)  # arm-specific numbers (decode-only timing, ...)


class ArmUnavailable(Exception):
    """Raised by ``Arm.setup`` when the arm cannot run here (missing package, no GGUF, ...): it is skipped."""


@runtime_checkable
class Arm(Protocol):
    name: str
    kind: Literal["m2r2", "external"]

    def setup(self) -> None: ...

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ArmSpec:
    """A picklable description of an arm: ``factory(**kwargs)`` builds it, inside the arm's worker process
    (so a heavy engine is only ever loaded there)."""
    name: str
    kind: Literal["m2r2", "external"]
    factory: Callable[..., Arm]
    kwargs: dict = field(default_factory=dict)
    group: str | None = None  # arms of one group share a worker process (default: a worker of its own)

    def build(self) -> Arm:
        return self.factory(**self.kwargs)


_lms: dict = {}


def worker_lm(model: str | None):
    """``m2r2.load(model)`` in float32, loaded once per process: an arm factory's model (a worker holds one
    arm; in-process runs share one model among arms, as before)."""
    key = str(model) if model is not None else None
    if key not in _lms:
        import m2r2
        _lms[key] = m2r2.load(model, dtype="float32")
    return _lms[key]


def validate_prompts(prompts: Sequence[BenchPrompt], cfg, source: str) -> None:
    """Raise ``PromptFileError`` (one line, naming the prompt) unless every prompt has token ids in the
    model's vocabulary and leaves room in its context window for a new token: checked before any arm is
    built, so a bad input file costs no setup."""
    from ..errors import PromptFileError

    if not prompts:
        raise PromptFileError(f"{source}: no prompts")
    ctx = cfg.max_position_embeddings
    for p in prompts:
        bad = [t for t in p.token_ids if type(t) is not int or not 0 <= t < cfg.vocab_size]
        if bad:
            raise PromptFileError(f"{source}: prompt {p.id} has token id {bad[0]!r} outside the model's vocabulary "
                                  f"[0, {cfg.vocab_size})")
        if not p.token_ids:
            raise PromptFileError(f"{source}: prompt {p.id} is empty")
        if len(p.token_ids) >= ctx:
            raise PromptFileError(f"{source}: prompt {p.id} has {len(p.token_ids)} tokens; the model's context "
                                  f"window is {ctx} (at most {ctx - 1} prompt tokens)")


# ---------------------------------------------------------------- command-line arguments every benchmark shares

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


# ---------------------------------------------------------------- running

def _log(msg: str) -> None:
    print(f"m2r2 bench: {msg}", file=sys.stderr, flush=True)


class ArmWorkerError(RuntimeError):
    """An arm failed inside its worker process (an exception, or the process died)."""


def _exception_message(e: BaseException) -> tuple[str, str, tuple[str, str] | None]:
    """What the main process needs of a worker's exception: a one-line summary, the traceback, and, for a
    user error (an ``m2r2.errors`` class), its class name and message, so that it is raised again as itself
    (rebuilt by name: nothing from the worker is unpickled into an exception object)."""
    from .. import errors
    user = None
    if isinstance(e, errors.M2R2Error) and getattr(errors, type(e).__name__, None) is type(e):
        user = (type(e).__name__, str(e))
    return f"{type(e).__name__}: {e}", traceback.format_exc(), user


def _worker(conn, specs: list, threads: int) -> None:
    """A worker process: pin the threads, build and set up its arm(s) (one report each, in order), then run
    prompts as the main process asks, one at a time (blocked on the pipe in between, so only one engine is
    ever busy), until "close"."""
    arms: dict[int, Arm] = {}
    try:
        pin_threads(threads)
        for i, spec in enumerate(specs):
            try:
                arm = spec.build() if isinstance(spec, ArmSpec) else spec
                arm.setup()
            except ArmUnavailable as e:
                conn.send(("unavailable", str(e)))
                continue
            except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises
                conn.send(("error", *_exception_message(e)))
                return
            arms[i] = arm
            conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            try:
                conn.send(("ok", arms[msg[1]].run(msg[2], msg[3])))
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", *_exception_message(e)))
    except EOFError:  # the main process went away
        pass
    finally:
        for arm in arms.values():
            arm.close()


class _Worker:
    """One worker process ("spawn": a fresh interpreter, no engine state or thread pool inherited) and the
    pipe to it; it holds the arms of one ``ArmSpec.group`` (usually one arm)."""

    def __init__(self, specs: list, threads: int, label: str):
        ctx = multiprocessing.get_context("spawn")
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, specs, threads), daemon=True, name=f"m2r2-bench-{label}")
        self._child = child

    def start(self) -> None:
        """Start the process (once). Workers start one after another, as their first arm is set up, so
        no two engines load at the same time (18 loading at once overran 2 cores and 24 GiB)."""
        if self._child is not None:
            self.proc.start()
            self._child.close()  # the worker holds the other end: its death is an EOF here
            self._child = None

    def receive(self, arm: str, doing: str):
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise ArmWorkerError(f"arm {arm}: its worker process died (exit code {self.proc.exitcode}) "
                                 f"while {doing}") from None
        if msg[0] == "error":
            summary, tb, user = msg[1:]
            if user is not None:
                from .. import errors
                raise getattr(errors, user[0])(user[1])
            raise ArmWorkerError(f"arm {arm} failed in its worker process while {doing}: {summary}\n"
                                 f"worker traceback:\n{tb}")
        return msg

    def close(self) -> None:
        if self._child is not None:  # never started (an earlier arm's setup failed)
            self._child.close()
            self.conn.close()
            return
        if self.proc.is_alive():
            try:
                self.conn.send(("close",))
            except OSError:
                pass
        self.proc.join(30)
        if self.proc.is_alive():  # stuck in an engine's shutdown
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class ProcessArm:
    """The main process's handle on an arm that lives in a worker process: ``setup`` waits for the worker's
    report on it, ``run`` sends one prompt and waits for its ``ArmResult``; the worker is closed by
    ``run_benchmark``."""

    def __init__(self, worker: _Worker, index: int, name: str, kind: str):
        self.worker, self.index, self.name, self.kind = worker, index, name, kind

    def setup(self) -> None:
        self.worker.start()
        kind, payload = self.worker.receive(self.name, "setting up")
        if kind == "unavailable":
            raise ArmUnavailable(payload)

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        self.worker.conn.send(("run", self.index, prompt, max_new_tokens))
        return self.worker.receive(self.name, f"running prompt {prompt.id}")[1]

    def close(self) -> None:
        pass  # the worker closes its arms when it is closed


def _start_workers(arms: Sequence["Arm | ArmSpec"], threads: int) -> tuple[list[ProcessArm], list[_Worker]]:
    """One worker per arm, or per ``ArmSpec.group`` (arms of one engine sharing a model, where one model per
    arm would not fit in memory); each starts when its first arm is set up, so engines load one at a time."""
    groups: dict[object, list[int]] = {}
    for i, a in enumerate(arms):
        groups.setdefault(getattr(a, "group", None) or ("arm", i), []).append(i)
    handles: dict[int, ProcessArm] = {}
    workers = []
    for members in groups.values():
        w = _Worker([arms[i] for i in members], threads, arms[members[0]].name)
        workers.append(w)
        for j, i in enumerate(members):
            handles[i] = ProcessArm(w, j, arms[i].name, arms[i].kind)
    return [handles[i] for i in range(len(arms))], workers


def run_benchmark(arms: Sequence["Arm | ArmSpec"], prompts: Sequence[BenchPrompt], max_new_tokens: int,
                  warmup: int = 1, repeats: int = 1, progress: bool = True, *, warmup_prompt: BenchPrompt | None = None,
                  skipped: dict[str, str] | None = None, isolate: bool = True) -> list[dict]:
    """Set up the arms (skipping unavailable ones with a one-line notice, recorded in ``skipped``), warm
    each up ``warmup`` times untimed on ``warmup_prompt`` (default: the first prompt), then for each prompt
    run every arm ``repeats`` times and keep the median time. The arm order rotates from prompt to prompt
    so no arm always runs first (right after another arm's allocations) or last. Returns one record per
    (arm, prompt); arms are closed at the end.

    With ``isolate`` (the default), every arm lives in its own worker process (``ProcessArm``; an
    ``ArmSpec`` is built there, an ``Arm`` object is pickled there before its setup; arms of one
    ``ArmSpec.group`` share one), at the pinned thread count; this process sends one prompt to one worker
    at a time and waits, so exactly one engine works at any moment and no arm's threads outlive its turn.
    ``isolate=False`` runs the arms here (unit tests)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("no prompts to benchmark")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    workers: list[_Worker] = []
    if isolate:
        arms, workers = _start_workers(arms, pinned_threads())
    else:
        arms = [a.build() if isinstance(a, ArmSpec) else a for a in arms]
    ready: list[Arm] = []
    try:
        for arm in arms:  # reports in arm order (a worker's arms report in that order too)
            try:
                arm.setup()
            except ArmUnavailable as e:
                _log(f"skipping arm {arm.name}: {e}")
                if skipped is not None:
                    skipped[arm.name] = str(e)
                continue
            ready.append(arm)
        if not ready:
            raise ValueError("no arm could be set up")

        wp = warmup_prompt or prompts[0]
        for arm in tqdm(ready * warmup, desc="warm-up", unit="run", file=sys.stderr, disable=not progress or not warmup):
            arm.run(wp, max_new_tokens)

        records: list[dict] = []
        bar = tqdm(total=len(prompts) * len(ready), desc="benchmark", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for i, prompt in enumerate(prompts):
                k = i % len(ready)
                for arm in ready[k:] + ready[:k]:
                    bar.set_postfix_str(f"{prompt.id} {arm.name}", refresh=False)
                    records.append(_measure(arm, prompt, max_new_tokens, repeats))
                    bar.update(1)
        # records in (arm, prompt) order, independent of the rotation
        order = {arm.name: j for j, arm in enumerate(ready)}
        pos = {p.id: j for j, p in enumerate(prompts)}
        records.sort(key=lambda r: (order[r["arm"]], pos[r["prompt_id"]]))
        return records
    finally:
        for arm in ready:
            arm.close()
        for w in workers:
            w.close()


def _measure(arm: Arm, prompt: BenchPrompt, max_new_tokens: int, repeats: int) -> dict:
    results = [arm.run(prompt, max_new_tokens) for _ in range(repeats)]
    first = results[0]
    seconds = statistics.median(r.seconds for r in results)
    extra = dict(first.extra)
    if repeats > 1:
        extra["seconds_all"] = [r.seconds for r in results]
        if len({r.new_tokens for r in results}) > 1:
            extra["new_tokens_all"] = [r.new_tokens for r in results]
    return {
        "arm": arm.name, "kind": arm.kind, "prompt_id": prompt.id, "category": prompt.category,
        "prompt_tokens": len(prompt.token_ids), "new_tokens": first.new_tokens, "seconds": seconds,
        "tokens_per_s": first.new_tokens / seconds if seconds > 0 else 0.0,
        "forward_passes": first.forward_passes,
        "token_ids": list(first.token_ids) if first.token_ids is not None else None,
        "extra": extra,
    }


# ---------------------------------------------------------------- summarizing

def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _group_stats(rows: list[dict], baselines: dict[str, dict[str, dict]]) -> dict:
    tps = [r["tokens_per_s"] for r in rows]
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    passes = [r["forward_passes"] for r in rows]
    out = {
        "n": len(rows), "total_tokens": tokens, "total_seconds": seconds,
        "median_tokens_per_s": statistics.median(tps), "mean_tokens_per_s": statistics.fmean(tps),
        "aggregate_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "tokens_per_forward_pass": (tokens / sum(passes)) if all(p for p in passes) else None,
        "ratios": {},
    }
    for base, by_prompt in baselines.items():
        if rows[0]["arm"] == base:
            continue
        # per prompt first (same prompt, same machine moment), then aggregated
        ratios = [r["tokens_per_s"] / by_prompt[r["prompt_id"]]["tokens_per_s"] for r in rows
                  if r["prompt_id"] in by_prompt and by_prompt[r["prompt_id"]]["tokens_per_s"] > 0
                  and r["tokens_per_s"] > 0]
        if ratios:
            out["ratios"][base] = {"geomean": geomean(ratios), "median": statistics.median(ratios), "n": len(ratios)}
    return out


def _equality(rows: list[dict], ref: dict[str, dict]) -> dict:
    compared, identical, mismatches = 0, 0, []
    for r in rows:
        other = ref.get(r["prompt_id"])
        if r["token_ids"] is None or other is None or other["token_ids"] is None:
            continue
        compared += 1
        diff = first_difference(r["token_ids"], other["token_ids"])
        if diff is None:
            identical += 1
        else:
            mismatches.append({"prompt_id": r["prompt_id"], "first_diff": diff,
                               "tokens": len(r["token_ids"]), "reference_tokens": len(other["token_ids"])})
    return {"compared": compared, "identical": identical, "mismatches": mismatches}


def summarize(records: Sequence[dict], baseline_arm: str, *, reference_arm: str | None = None,
              also_against: Sequence[str] = (), roofline_tokens_per_s: float | None = None,
              arm_rooflines: Mapping[str, float] | None = None) -> dict:
    """Per arm, overall and per category: median/mean tokens/s, total tokens / total seconds, speed ratio
    to ``baseline_arm`` (and to each of ``also_against``) computed per prompt then geometric-mean and
    median; tokens per forward pass; fraction of the roofline (``arm_rooflines`` overrides it for arms
    that read a different number of bytes per token, e.g. a quantised GGUF); and, where both arms
    returned token ids, how many outputs equal ``reference_arm``'s."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    categories = list(dict.fromkeys(r["category"] for r in records))
    baselines = {b: {r["prompt_id"]: r for r in records if r["arm"] == b}
                 for b in dict.fromkeys([baseline_arm, *also_against]) if b in arms}
    ref = {r["prompt_id"]: r for r in records if r["arm"] == reference_arm} if reference_arm in arms else None
    summary: dict = {"baseline_arm": baseline_arm, "also_against": list(also_against),
                     "reference_arm": reference_arm, "roofline_tokens_per_s": roofline_tokens_per_s,
                     "categories": categories, "arms": {}}
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        entry = {"kind": rows[0]["kind"], "all": _group_stats(rows, baselines), "by_category": {}}
        for c in categories:
            crow = [r for r in rows if r["category"] == c]
            if crow:
                entry["by_category"][c] = _group_stats(crow, baselines)
        roof = (arm_rooflines or {}).get(arm, roofline_tokens_per_s)
        entry["roofline_tokens_per_s"] = roof
        entry["roofline_fraction"] = entry["all"]["median_tokens_per_s"] / roof if roof else None
        if ref is not None and arm != reference_arm:
            entry["equality"] = _equality(rows, ref)
        summary["arms"][arm] = entry
    return summary


# ---------------------------------------------------------------- reporting

def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def output_text(lm, ids: list[int]) -> str:
    """An output's text for Rouge-L; without a tokenizer, its token ids as words."""
    t = lm.decode_text(ids)
    return t if t is not None else " ".join(map(str, ids))


def rouge_l(scorer, ref_text: str, text: str, ref_ids: Sequence[int] | None = None,
            ids: Sequence[int] | None = None) -> float:
    """Rouge-L F-measure of ``text`` against ``ref_text``, such that identical outputs score exactly 1.0:
    identical token ids (or identical texts) short-circuit to 1.0, and where ``rouge-score``'s tokenizer
    leaves no word in either text (all emoji, say, which it drops) the score is taken on the token ids
    as words (token-id level) instead of scoring 0."""
    if (ids is not None and ref_ids is not None and list(ids) == list(ref_ids)) or text == ref_text:
        return 1.0
    from rouge_score import tokenize
    words = tokenize.tokenize(ref_text, None) and tokenize.tokenize(text, None)
    if ids is not None and ref_ids is not None and not words:
        ref_text, text = " ".join(map(str, ref_ids)), " ".join(map(str, ids))
    return scorer.score(ref_text, text)["rougeL"].fmeasure


def add_rouge_l(summary: dict, records: list[dict], lm) -> None:
    """Mean Rouge-L (``rouge-score``, via ``rouge_l``) of each arm's output text against the reference arm's,
    per prompt, into ``summary["arms"][arm]["rouge_l"]``: how far a lossy arm's output drifts, where token
    equality only says that it does."""
    from rouge_score import rouge_scorer

    ref_arm = summary.get("reference_arm")
    ref = {r["prompt_id"]: r["token_ids"] for r in records if r["arm"] == ref_arm and r.get("token_ids") is not None}
    if not ref:
        return
    ref_text = {pid: output_text(lm, ids) for pid, ids in ref.items()}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for arm, e in summary["arms"].items():
        rows = [r for r in records if r["arm"] == arm and r.get("token_ids") is not None and r["prompt_id"] in ref]
        if arm != ref_arm and rows:
            e["rouge_l"] = statistics.fmean(
                rouge_l(scorer, ref_text[r["prompt_id"]], output_text(lm, r["token_ids"]), ref[r["prompt_id"]],
                        r["token_ids"]) for r in rows)


NEAR_TIE_FACTOR = 4.0


def top2_gaps(hf_dir, contexts: Sequence[Sequence[int]]) -> list[dict]:
    """For each context (prompt + the reference output up to the first differing token), the reference
    model's top-2 logit gap at the next position in float64 (transformers, the same weights), and the
    float32 rounding noise there: the largest |float32 - float64| logit of that model, measured."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = []
    models = {dt: AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt).eval()
              for dt in (torch.float64, torch.float32)}
    with torch.inference_mode():
        for ctx in contexts:
            ids = torch.tensor([list(ctx)], dtype=torch.long)
            l64 = models[torch.float64](ids).logits[0, -1]
            l32 = models[torch.float32](ids).logits[0, -1].double()
            top = torch.topk(l64, 2).values
            out.append({"gap": float(top[0] - top[1]), "float32_noise": float((l32 - l64).abs().max())})
    return out


def add_near_ties(summary: dict, records: list[dict], prompts: Sequence[BenchPrompt], lm) -> None:
    """Give every output that differs from the reference arm's the reference model's top-2 logit gap at the
    first differing position (``top2_gaps``; float64), and count it as a *near-tie divergence* when that gap
    is below ``NEAR_TIE_FACTOR`` times the measured float32 noise there. Why that bound: two float32
    implementations (different kernels, summation orders) each land within about the noise of the exact
    logits, so their difference reaches up to twice it, and the other implementation's noise is not the one
    measured (another factor 2); a divergence at a gap that small is an argmax flip between nearly equal
    tokens, not a defect. Exact identity stays ``equality.identical``; this is the separate allowance,
    ``equality.near_ties``. Runs after the benchmark, in this process (the workers are gone by then)."""
    ref_arm = summary.get("reference_arm")
    ref = {r["prompt_id"]: r for r in records if r["arm"] == ref_arm}
    by_id = {p.id: p for p in prompts}
    todo: dict[tuple[str, int], list[dict]] = {}
    for e in summary["arms"].values():
        eq = e.get("equality")
        if not eq:
            continue
        eq["near_ties"] = 0
        for m in eq["mismatches"]:
            r = ref.get(m["prompt_id"])
            # a prefix of the other's output (one stopped early) has no differing position to explain
            if r is None or m["first_diff"] >= len(r["token_ids"]) or m["first_diff"] >= m["tokens"]:
                continue
            todo.setdefault((m["prompt_id"], m["first_diff"]), []).append(m)
    if not todo:
        return
    keys = list(todo)
    gaps = top2_gaps(lm.source.hf_dir, [list(by_id[pid].token_ids) + ref[pid]["token_ids"][:d] for pid, d in keys])
    for key, g in zip(keys, gaps):
        for m in todo[key]:
            m["top2_gap"], m["float32_noise"] = g["gap"], g["float32_noise"]
            m["near_tie"] = g["gap"] < NEAR_TIE_FACTOR * g["float32_noise"]
    for e in summary["arms"].values():
        eq = e.get("equality")
        if eq:
            eq["near_ties"] = sum(bool(m.get("near_tie")) for m in eq["mismatches"])
    summary["near_tie_rule"] = (f"top-2 logit gap of the reference model (float64) at the first differing token "
                                f"< {NEAR_TIE_FACTOR:g} x its measured float32 logit noise there")


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by markdown and the terminal)."""
    bases = list(dict.fromkeys([summary["baseline_arm"], *summary["also_against"]]))
    ref = summary.get("reference_arm")
    header = ["arm", "kind", "prompts", "tok/s median", "tok/s mean", "tok/s total"]
    header += [f"x {b} (geo/med)" for b in bases] + ["% roofline", "tok/pass"]
    header += [f"same as {ref}"] if ref else []
    near = any("near_ties" in e.get("equality", {}) for e in summary["arms"].values())
    header += ["near-tie divergences"] if ref and near else []
    rouge = any("rouge_l" in e for e in summary["arms"].values())
    header += [f"Rouge-L vs {ref}"] if rouge else []
    rows = []
    for arm, e in summary["arms"].items():
        a = e["all"]
        row = [arm, e["kind"], str(a["n"]), _fmt(a["median_tokens_per_s"]), _fmt(a["mean_tokens_per_s"]),
               _fmt(a["aggregate_tokens_per_s"])]
        for b in bases:
            r = a["ratios"].get(b)
            row.append("1 (base)" if arm == b else (f"{r['geomean']:.2f} / {r['median']:.2f}" if r else "-"))
        frac = e["roofline_fraction"]
        own = e["roofline_tokens_per_s"] != summary["roofline_tokens_per_s"]
        row.append(_fmt(None if frac is None else 100 * frac, ".0f", "%" + ("*" if own else "")))
        row.append(_fmt(a["tokens_per_forward_pass"], ".2f"))
        if ref:
            eq = e.get("equality")
            row.append("ref" if arm == ref else (f"{eq['identical']}/{eq['compared']}" if eq and eq["compared"] else "-"))
            if near:
                row.append("ref" if arm == ref else (f"{eq['near_ties']}/{len(eq['mismatches'])}" if eq and "near_ties"
                                                     in eq else "-"))
        if rouge:
            row.append("ref" if arm == ref else _fmt(e.get("rouge_l"), ".3f"))
        rows.append(row)
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def provenance_lines(meta: dict) -> list[str]:
    """Markdown lines for the commit (dirty or clean) and the conditions at the start and end of the run."""
    def cond(d: dict) -> str:
        load = d.get("loadavg")
        bw = d.get("bandwidth_gbps")
        return (f"load {'/'.join(f'{x:.2f}' for x in load) if load else '?'}, "
                f"bandwidth {'?' if bw is None else f'{bw:.1f}'} GB/s ({d.get('date')})")
    lines = []
    if meta.get("git_commit"):
        dirty = meta.get("git_dirty_files") or []
        more = meta.get("git_dirty_count", len(dirty)) - 5
        lines.append(f"- commit {meta['git_commit'][:10]}, " + (
            f"**dirty tree** ({', '.join(dirty[:5])}{f' and {more} more' if more > 0 else ''})" if meta.get("git_dirty")
            else "clean tree"))
    if meta.get("start"):
        end = f"; at end: {cond(meta['end'])}" if meta.get("end") else ""
        lines.append(f"- at start: {cond(meta['start'])}{end}")
    return lines


def render_markdown(doc: dict) -> str:
    meta, summary = doc["meta"], doc["summary"]
    roof = meta.get("roofline") or {}
    lines = [f"# Benchmark: {doc['benchmark']}", "",
             f"- machine: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('threads')} threads; "
             f"torch {meta.get('torch')}, transformers {meta.get('transformers')}",
             f"- date: {meta.get('date')}; command: `{meta.get('command')}`", *provenance_lines(meta)]
    for key in ("model", "prompts", "max_new_tokens", "repeats", "isolation"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    if roof:
        lines.append(f"- memory bandwidth {roof['bandwidth_gbps']:.1f} GB/s; roofline "
                     f"{roof['tokens_per_s']:.1f} tokens/s ({roof['weight_bytes_per_token'] / 1e6:.0f} MB of "
                     f"weights per token at {roof['bytes_per_param']:g} bytes/param)")
    for arm, e in summary["arms"].items():
        if e["roofline_tokens_per_s"] != summary["roofline_tokens_per_s"] and e["roofline_tokens_per_s"]:
            lines.append(f"- \\* {arm}: fraction of its own roofline, {e['roofline_tokens_per_s']:.1f} tokens/s")
    if meta.get("skipped_arms"):
        lines.append("- skipped: " + "; ".join(f"{a} ({why})" for a, why in meta["skipped_arms"].items()))
    lines += ["", "Tokens/s = new tokens (EOS included) / wall time of the call (prefill + decode). Ratios are "
              "computed per prompt, then geometric mean / median.", "", _md_table(*summary_table(summary))]
    cats = summary["categories"]
    if len(cats) > 1:
        arms = list(summary["arms"])
        lines += ["", "## Median tokens/s by category", "",
                  _md_table(["category", *arms], [[c, *(_fmt(summary["arms"][a]["by_category"].get(c, {}).get(
                      "median_tokens_per_s")) for a in arms)] for c in cats])]
    spec = summary.get("speculative")
    if spec:
        def cell(d: dict, key: str, spec_: str) -> str:
            return _fmt(d.get(key), spec_)
        lines += ["", "## Speculative decoding: drafting and verification", "",
                  "Tokens per verification = (accepted drafts + 1) per full forward; draft cost = seconds per draft "
                  "token over seconds per plain decode token (measured), and weight bytes a draft token reads over "
                  "a full forward's.", "",
                  _md_table(["arm", "tokens/verify", "acceptance", "draft cost (time)", "draft cost (bytes)",
                             "verify cost (time)"],
                            [[a, cell(e["all"], "tokens_per_verify", ".2f"), cell(e["all"], "acceptance", ".2f"),
                              cell(e["all"], "draft_cost_measured", ".2f"), _fmt(e.get("draft_cost_bytes"), ".2f"),
                              cell(e["all"], "verify_cost_measured", ".2f")] for a, e in spec.items()])]
        cats = summary["categories"]
        if len(cats) > 1:
            arms_ = list(spec)
            lines += ["", "## Tokens per verification by category", "",
                      _md_table(["category", *arms_], [[c, *(_fmt(spec[a]["by_category"].get(c, {}).get(
                          "tokens_per_verify"), ".2f") for a in arms_)] for c in cats])]
    mism = [(a, m) for a, e in summary["arms"].items() for m in e.get("equality", {}).get("mismatches", [])]
    if mism:
        lines += ["", f"## Outputs differing from {summary['reference_arm']}", "",
                  *([f"Near-tie: {summary['near_tie_rule']}.", ""] if summary.get("near_tie_rule") else []),
                  _md_table(["arm", "prompt", "first differing token", "tokens", "reference tokens",
                             "top-2 gap (fp64)", "fp32 noise", "near-tie"],
                            [[a, m["prompt_id"], str(m["first_diff"]), str(m["tokens"]), str(m["reference_tokens"]),
                              _fmt(m.get("top2_gap"), ".2e"), _fmt(m.get("float32_noise"), ".1e"),
                              {True: "yes", False: "no"}.get(m.get("near_tie"), "-")] for a, m in mism])]
    return "\n".join(lines) + "\n"


def render_chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    arms = list(summary["arms"])
    cats = summary["categories"]
    colors = {"m2r2": "tab:blue", "external": "tab:gray"}
    ncols = 2 if len(cats) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 + 6 * (ncols - 1), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2][:ncols]})
    ax = axes[0][0]
    med = [summary["arms"][a]["all"]["median_tokens_per_s"] for a in arms]
    bars = ax.bar(arms, med, color=[colors.get(summary["arms"][a]["kind"], "tab:orange") for a in arms])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    roof = summary["roofline_tokens_per_s"]
    if roof:
        ax.axhline(roof, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"roofline {roof:.1f} tok/s", (0, roof), xytext=(2, 3), textcoords="offset points",
                    xycoords=("axes fraction", "data"), color="tab:red", fontsize=8)
    for bar, a in zip(bars, arms):  # arms with their own ceiling (fewer bytes per weight) get a short tick
        own = summary["arms"][a]["roofline_tokens_per_s"]
        if own and own != roof:
            x0, w = bar.get_x(), bar.get_width()
            ax.hlines(own, x0, x0 + w, color="tab:red", linestyle=":", linewidth=1.5)
            ax.annotate(f"own {own:.0f}", (x0 + w / 2, own), xytext=(0, 3), textcoords="offset points",
                        ha="center", color="tab:red", fontsize=7)
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title(f"{doc['benchmark']}: tokens/s per arm", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if ncols == 2:
        ax2 = axes[0][1]
        width = 0.8 / len(arms)
        for j, a in enumerate(arms):
            vals = [summary["arms"][a]["by_category"].get(c, {}).get("median_tokens_per_s", 0.0) for c in cats]
            ax2.bar([i + j * width for i in range(len(cats))], vals, width, label=a)
        if roof:
            ax2.axhline(roof, color="tab:red", linestyle="--", linewidth=1)
        ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right", fontsize=8)
        ax2.set_title("by category", fontsize=10)
        ax2.legend(fontsize=7)
    meta = doc["meta"]
    fig.suptitle(f"{meta.get('cpu')} · {meta.get('threads')} threads · {meta.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(name: str, meta: dict, records: Sequence[dict], summary: dict,
                  out_dir: str | os.PathLike = "benchmarks/results", *, keep_token_ids: bool = False) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (schema: benchmark, meta, records, summary), render ``<name>.md`` and
    ``<name>.png`` from it, print the table to stderr and one JSON summary line to stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = [r if keep_token_ids else {k: v for k, v in r.items() if k != "token_ids"} for r in records]
    doc = {"benchmark": name, "meta": {"schema_version": SCHEMA_VERSION, **machine_info(), **meta},
           "records": recs, "summary": summary}
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(doc), encoding="utf-8")
    render_chart(doc, paths["png"])

    print("\n" + _text_table(*summary_table(summary)), file=sys.stderr)
    roof = summary.get("roofline_tokens_per_s")
    if roof:
        print(f"roofline {roof:.1f} tokens/s; results in {paths['json']} (.md, .png)", file=sys.stderr)
    line = {"benchmark": name, "roofline_tokens_per_s": roof, "json": str(paths["json"]),
            "arms": {a: {"median_tokens_per_s": e["all"]["median_tokens_per_s"],
                         "ratios_geomean": {b: r["geomean"] for b, r in e["all"]["ratios"].items()},
                         **({"identical": f"{e['equality']['identical']}/{e['equality']['compared']}"}
                            if "equality" in e else {})}
                     for a, e in summary["arms"].items()}}
    print(json.dumps(line), flush=True)
    return paths
