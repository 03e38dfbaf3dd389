"""CPU threads: how many m2r2 may use, and how an idle OpenMP thread waits.

A decode step of a small model is hundreds of short parallel regions (every block's products, attention,
norms), each ending at a barrier. libgomp's default is to spin at a barrier for up to 300,000 pause
instructions (milliseconds on current x86 cores) before it sleeps. That is right when every thread owns a
core, and ruinous when another busy process shares the cores: a thread spins away its whole time slice
waiting for a sibling that the scheduler has taken off the CPU, so every barrier costs a scheduler slice.
Measured on 2 cores (``benchmarks/results/concurrency.json``): two ``m2r2 generate`` processes at once kept
22% of their solo speed each with libgomp's default, 56% with this module's two fixes.

The fix is at that root: before PyTorch loads libgomp (which reads its settings once, at load), m2r2 sets
a short spin (``GOMP_SPINCOUNT``, :data:`SPIN_COUNT`): long enough to cover a barrier whose threads are all
running (they arrive within microseconds), short enough that a thread waiting for a descheduled sibling
gives its core up almost at once. Values the user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) are
kept. It has no effect if ``torch`` was imported before ``m2r2`` (:func:`spin_policy` says so).

:func:`available_cpus` is the thread count m2r2 uses by default: the CPUs this process may run on
(affinity mask), capped by a cgroup CPU quota (containers), not ``os.cpu_count()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from pathlib import Path

SPIN_COUNT = "1000"  # pause iterations before a waiting OpenMP thread sleeps (libgomp default: 300000)
_USER_SET = [k for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ]
_TORCH_FIRST = "torch" in sys.modules  # libgomp already initialised with whatever the environment said


def configure_openmp() -> None:
    """Set m2r2's OpenMP wait policy in the environment, unless the user chose one (idempotent). Called when
    ``m2r2`` is imported, before anything imports torch; worker processes inherit it."""
    if not _USER_SET:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def spin_policy() -> str:
    """A short description of the OpenMP wait policy in force (for logs and benchmark metadata)."""
    if _TORCH_FIRST and not _USER_SET:
        return "libgomp default (torch was imported before m2r2)"
    if _USER_SET:
        return "user: " + ", ".join(f"{k}={os.environ.get(k)}" for k in _USER_SET)
    return f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None if none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded down, >= 1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _runqueue_wait_ns() -> int | None:
    """Nanoseconds this process's threads have spent runnable but not running (summed over its threads,
    from ``/proc/self/task/*/schedstat``), or None where the kernel does not report it."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total


def governor_enabled() -> bool:
    """Whether the decode loop adapts its thread count (``M2R2_ADAPT_THREADS=0`` turns it off)."""
    return os.environ.get("M2R2_ADAPT_THREADS", "1") != "0"


class ThreadGovernor:
    """Adapts a decode loop's thread count to the CPUs it actually gets.

    Decoding is hundreds of short parallel regions per token; with more threads than the cores that are
    free (another process busy), each region waits for a thread the scheduler has parked, and two threads
    can decode slower than one. Every ``check_s`` the governor reads how long this process's threads sat in
    the run queue; when that exceeds ``high`` of the wall time it drops one thread, and every ``probe_s`` (doubling after each probe
    that finds the CPUs still taken, up to ``max_probe_s``) it tries one more, up to the thread count the
    loop started with, which it restores at the end. Alone on the machine the run-queue wait stays near
    zero and nothing changes. ``M2R2_ADAPT_THREADS=0`` turns it off; so does a kernel without schedstat.
    Thread counts change only between steps, so results are as with any fixed count (the kernels' rows do
    not depend on the thread count beyond float32 summation order). The thread count is the process's: while
    another decode runs in this process (two requests on one model, each in its own thread), no governor
    moves it, so no call changes the threads another is running with."""

    def __init__(self, *, check_s: float = 0.05, high: float = 0.3, probe_s: float = 1.0,
                 max_probe_s: float = 8.0) -> None:
        import torch
        self._torch = torch
        self.max_threads = self.threads = torch.get_num_threads()
        self.enabled = self.max_threads > 1 and governor_enabled() and _runqueue_wait_ns() is not None
        self.check_s, self.high, self.base_probe_s, self.max_probe_s = check_s, high, probe_s, max_probe_s
        self.probe_s = probe_s
        self.changes = 0  # how often the count changed (for statistics)
        self._t = self._changed = 0.0
        self._wait = 0
        self._probing = False
        if self.enabled:
            self._t = self._changed = _now()
            self._wait = _runqueue_wait_ns() or 0

    def step(self) -> None:
        """Call once per decode step: cheap unless a check is due."""
        if not self.enabled or _decodes > 1:
            return
        t = _now()
        if t - self._t < self.check_s:
            return
        wait = _runqueue_wait_ns()
        if wait is None:
            return
        frac = (wait - self._wait) / 1e9 / (t - self._t)
        self._t, self._wait = t, wait
        if frac > self.high and self.threads > 1:
            if self._probing:  # the CPUs are still taken: probe less often
                self.probe_s = min(self.probe_s * 2, self.max_probe_s)
            self._set(self.threads - 1, t)
        elif self._probing:  # the probe found room: keep the thread, probe promptly again
            self.probe_s = self.base_probe_s
            self._probing = False
        elif self.threads < self.max_threads and t - self._changed >= self.probe_s:
            self._set(self.threads + 1, t)
            self._probing = True

    def _set(self, n: int, t: float) -> None:
        self._torch.set_num_threads(n)
        self.threads, self._changed, self._probing = n, t, False
        self.changes += 1

    def close(self) -> None:
        """Restore the thread count the loop started with."""
        if self.enabled and self.threads != self.max_threads:
            self._torch.set_num_threads(self.max_threads)
            self.threads = self.max_threads


_decodes = 0  # decode loops running in this process (``decoding``)
_decodes_lock = threading.Lock()


@contextlib.contextmanager
def decoding():
    """Count a decode loop as running for the block (the governors stand still while more than one runs)."""
    global _decodes
    with _decodes_lock:
        _decodes += 1
    try:
        yield
    finally:
        with _decodes_lock:
            _decodes -= 1

_now = time.perf_counter  # the governor's clock (a module name, so tests can replace it)
