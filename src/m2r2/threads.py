"""CPU threads: how many m2r2 may use, and how an idle OpenMP thread waits.

A decode step of a small model is hundreds of short parallel regions (every block's products, attention,
norms), each ending at a barrier. libgomp's default is to spin at a barrier for up to 300,000 pause
instructions (milliseconds on current x86 cores) before it sleeps. That is right when every thread owns a
core, and ruinous when another busy process shares the cores: a thread spins away its whole time slice
waiting for a sibling that the scheduler has taken off the CPU, so every barrier costs a scheduler slice.
Measured on 2 cores: two ``m2r2 generate`` processes at once fell from ~70 to 0.3-0.6 tokens/s each.

The fix is at that root: before PyTorch loads libgomp (which reads its settings once, at load), m2r2 sets
a short spin (``GOMP_SPINCOUNT``, :data:`SPIN_COUNT`): long enough to cover a barrier whose threads are all
running (they arrive within microseconds), short enough that a thread waiting for a descheduled sibling
gives its core up almost at once. Values the user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) are
kept. It has no effect if ``torch`` was imported before ``m2r2`` (:func:`spin_policy` says so).

:func:`available_cpus` is the thread count m2r2 uses by default: the CPUs this process may run on
(affinity mask), capped by a cgroup CPU quota (containers), not ``os.cpu_count()``.
"""

from __future__ import annotations

import math
import os
import sys
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
