"""Running a benchmark: ``run_benchmark`` runs every arm on every prompt, interleaved per prompt so that
machine noise (other processes, thermal state) hits all arms alike, each arm in its own worker process so
that no engine's threads (llama.cpp's, or a shared OpenMP pool spinning differently) slow another arm down.
Returns one record per (arm, prompt).
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import traceback
from typing import Sequence

from ..provenance import pin_threads, pinned_threads
from .arms import Arm, ArmResult, ArmSpec, ArmUnavailable, BenchPrompt


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
