"""Provenance of a run, for training logs and benchmark results alike: the command line, the git state of the
source tree, the machine (CPU, cores, load, memory bandwidth) and the pinned thread count."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

LOAD_WARNING = 1.5  # 1-minute load average at the start above which a run is flagged as not quiet
_pinned: dict[str, int] = {}
_run: dict[str, dict] = {}  # provenance of the current run, read at its start (``run_start``)


def _warn(msg: str) -> None:
    print(f"m2r2 bench: {msg}", file=sys.stderr, flush=True)


def pin_threads(n: int) -> int:
    """Fix torch's intra-op thread count for the whole benchmark and remember it for the metadata."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    _pinned["threads"] = n
    return n


def pinned_threads() -> int:
    return _pinned.get("threads", torch.get_num_threads())


def measure_bandwidth(size_mb: int = 256, repeats: int = 9, warmup: int = 2) -> float:
    """Memory read bandwidth in GB/s (1e9 bytes/s): median over ``repeats`` timed ``torch.sum`` of a
    ``size_mb`` fp32 tensor, far larger than any cache, at the current thread count."""
    x = torch.ones(size_mb * (1 << 20) // 4)  # ones, not empty: every page is touched before timing
    for _ in range(warmup):
        float(x.sum())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def roofline(cfg, bandwidth_gbps: float, bytes_per_param: float = 4.0) -> dict:
    """The batch-1 decode ceiling: every step reads all weights once, so tokens/s <= bandwidth / bytes."""
    per_token = cfg.weight_bytes_per_token(bytes_per_param)
    return {"bandwidth_gbps": bandwidth_gbps, "bytes_per_param": bytes_per_param,
            "weight_bytes_per_token": per_token, "tokens_per_s": bandwidth_gbps * 1e9 / per_token}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


RESULTS_PREFIX = "benchmarks/results/"  # outputs of earlier runs: not part of the source state


def _git_state() -> dict:
    """Commit and dirty state of the source tree this code runs from: modified tracked files, and untracked
    files under ``src/`` (code the run imports that no commit holds); up to 20 of them are named. Result
    files under ``benchmarks/results/`` are outputs, not source: a run that follows another (whose results
    are not committed yet) is not dirty for them; they are listed apart (``results_changed``)."""
    here = Path(__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=5)  # noqa: E731
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        top = git("rev-parse", "--show-toplevel").stdout.strip()
        changed = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
        untracked = git("ls-files", "--others", "--exclude-standard", "--full-name", "--",
                        str(Path(top) / "src")).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    paths = [line[3:] for line in changed]
    results = [f for f in paths if f.startswith(RESULTS_PREFIX)]
    files = [f for f in paths if not f.startswith(RESULTS_PREFIX)] + [f"{f} (untracked)" for f in untracked]
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(files), "git_dirty_count": len(files),
            "git_dirty_files": files[:20], "results_changed": results[:20]}


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_start(bandwidth_mb: int = 256) -> dict:
    """Provenance read at the start of a run (before anything is loaded): git commit and dirty state, the
    command line, load average and memory bandwidth. Kept for ``machine_info`` and returned (``meta.start``);
    a dirty tree or a 1-minute load above ``LOAD_WARNING`` gets one warning line on stderr."""
    start = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command_line(),
             **_git_state(), "loadavg": _loadavg(), "bandwidth_gbps": measure_bandwidth(bandwidth_mb)}
    _run.clear()
    _run["start"] = start
    why = []
    if start.get("git_dirty"):
        why.append(f"the source tree is dirty ({start['git_dirty_count']} changed files)")
    if start["loadavg"] and start["loadavg"][0] > LOAD_WARNING:
        why.append(f"the machine is busy (load {start['loadavg'][0]:.2f} > {LOAD_WARNING})")
    if why:
        _warn(f"warning: {' and '.join(why)}; the results will say so")
    return start


def run_end(bandwidth_mb: int = 256) -> dict:
    """Load average and memory bandwidth right after the measured runs (``meta.end``): with ``run_start``'s,
    they bracket the conditions the numbers were taken under."""
    end = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg": _loadavg(),
           "bandwidth_gbps": measure_bandwidth(bandwidth_mb)}
    _run["end"] = end
    return end


def command_line() -> str:
    """How this run was started: ``python -m pkg.mod ...`` or ``m2r2 bench ...`` rather than a full path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name != "__main__" else Path(sys.argv[0]).name
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def machine_info() -> dict:
    """The machine and software; command, commit and dirty state as ``run_start`` read them at the start of
    the run (read now only when the run never called it), plus ``start`` / ``end`` where recorded."""
    from .engine.threads import available_cpus, governor_enabled, spin_policy
    cores = os.cpu_count()
    usable = available_cpus()
    start = _run.get("start")
    git = ({k: v for k, v in start.items() if k.startswith("git_") or k == "results_changed"}
           if start else _git_state())
    return {
        "cpu": _cpu_model(), "cores": cores, "usable_cores": usable, "threads": pinned_threads(),
        "loadavg": _loadavg(), "openmp_wait": spin_policy(),
        "thread_governor": governor_enabled(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": _version("transformers"), "m2r2": _version("m2r2"),
        "xllamacpp": _version("xllamacpp"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": start["command"] if start else command_line(), **git,
        **({"start": start} if start else {}), **({"end": _run["end"]} if "end" in _run else {}),
    }
