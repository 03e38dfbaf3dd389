"""Thread count and OpenMP wait policy (m2r2.engine.threads): set before torch loads libgomp, user settings kept,
the default thread count follows the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from m2r2.engine import threads

# records the environment at the moment torch is first imported, then imports m2r2
_PROBE = textwrap.dedent("""
    import importlib.abc, json, os, sys
    seen = {}
    class Spy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "at_torch" not in seen:
                seen["at_torch"] = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
            return None
    sys.meta_path.insert(0, Spy())
    import m2r2
    m2r2.SamplingConfig  # public names load lazily: this one imports torch
    print(json.dumps({**seen, "policy": m2r2.engine.threads.spin_policy()}))
""")


def _probe(**env_extra) -> dict:
    import json
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_short_spin_is_set_before_torch_loads():
    seen = _probe()
    assert seen["at_torch"] == {"GOMP_SPINCOUNT": threads.SPIN_COUNT, "OMP_WAIT_POLICY": None}
    assert seen["policy"] == f"GOMP_SPINCOUNT={threads.SPIN_COUNT}"


def test_user_wait_policy_is_kept():
    assert _probe(GOMP_SPINCOUNT="123")["at_torch"]["GOMP_SPINCOUNT"] == "123"
    seen = _probe(OMP_WAIT_POLICY="active")
    assert seen["at_torch"] == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "active"}
    assert seen["policy"].startswith("user:")


def test_available_cpus_follows_affinity_and_quota(tmp_path, monkeypatch):
    mask = os.sched_getaffinity(0)
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    assert threads.available_cpus() == len(mask)
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: 1.5)  # 1.5 CPUs: one thread, not two
    assert threads.available_cpus() == 1
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: 0.2)
    assert threads.available_cpus() == 1


def test_cgroup_quota_files(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads._cgroup_cpus(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_cpus(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_cpus(v1) is None
    assert threads._cgroup_cpus(tmp_path / "missing") is None


class _Clock:
    """Fake time and run-queue wait for the governor: ``advance(seconds, waiting)`` moves both."""

    def __init__(self):
        self.t, self.wait_ns = 100.0, 0

    def advance(self, seconds: float, waiting: float) -> None:
        self.t += seconds
        self.wait_ns += int(waiting * seconds * 1e9)


def _governor(monkeypatch, clock: _Clock, threads_: int = 2) -> threads.ThreadGovernor:
    import torch
    monkeypatch.setattr(threads, "_now", lambda: clock.t)
    monkeypatch.setattr(threads, "_runqueue_wait_ns", lambda: clock.wait_ns)
    monkeypatch.delenv("M2R2_ADAPT_THREADS", raising=False)
    torch.set_num_threads(threads_)
    return threads.ThreadGovernor(check_s=0.05, high=0.3, probe_s=1.0, max_probe_s=4.0)


def test_governor_keeps_threads_when_the_cpus_are_free(monkeypatch):
    import torch
    clock = _Clock()
    g = _governor(monkeypatch, clock)
    for _ in range(200):
        clock.advance(0.02, waiting=0.05)  # a little scheduler noise, far below the threshold
        g.step()
    assert g.enabled and g.threads == torch.get_num_threads() == 2 and g.changes == 0


def test_governor_drops_a_thread_under_contention_probes_back_and_restores(monkeypatch):
    import torch
    clock = _Clock()
    g = _governor(monkeypatch, clock)
    clock.advance(0.06, waiting=0.9)  # another process holds a core: our threads queue
    g.step()
    assert g.threads == torch.get_num_threads() == 1
    # alone on the remaining core: no queueing; after probe_s (1 s) it tries 2 threads again
    steps = 0
    while g.threads == 1 and steps < 100:
        clock.advance(0.06, waiting=0.0)
        g.step()
        steps += 1
    assert g.threads == 2 and g._probing and 16 <= steps <= 18
    clock.advance(0.06, waiting=0.9)  # still taken: back to one, and the next probe waits twice as long
    g.step()
    assert g.threads == 1 and g.probe_s == 2.0
    for _ in range(20):  # 1.2 s < 2 s: no probe yet
        clock.advance(0.06, waiting=0.0)
        g.step()
    assert g.threads == 1
    for _ in range(20):
        clock.advance(0.06, waiting=0.0)
        g.step()
    assert g.threads == 2
    clock.advance(0.06, waiting=0.0)  # the other process left: the probe finds room and keeps the thread
    g.step()
    assert g.threads == 2 and not g._probing and g.probe_s == 1.0
    clock.advance(0.06, waiting=0.9)
    g.step()
    assert g.threads == 1
    g.close()
    assert torch.get_num_threads() == 2 and g.changes == 5


def test_governor_off_by_environment_or_with_one_thread(monkeypatch):
    import torch
    clock = _Clock()
    g = _governor(monkeypatch, clock, threads_=1)
    assert not g.enabled
    torch.set_num_threads(2)
    monkeypatch.setenv("M2R2_ADAPT_THREADS", "0")
    g = threads.ThreadGovernor()
    clock.advance(0.06, waiting=0.9)
    g.step()
    assert not g.enabled and torch.get_num_threads() == 2


def test_thread_changes_between_steps_keep_greedy_output(tiny_lm, monkeypatch):
    """A governor that changes the thread count at every step (2, 1, 2, ...) leaves greedy tokens as they are."""
    import torch
    torch.set_num_threads(2)
    ref = tiny_lm.generate([5, 6, 7, 8], max_new_tokens=24, temperature=0.0)
    flips = []

    class Flipping(threads.ThreadGovernor):
        def step(self):
            self._set(1 if self.threads == 2 else 2, 0.0)
            flips.append(self.threads)

    import m2r2.decoding.loop as gen
    monkeypatch.setattr(gen, "ThreadGovernor", Flipping)
    out = tiny_lm.generate([5, 6, 7, 8], max_new_tokens=24, temperature=0.0)
    assert out.token_ids == ref.token_ids and len(out.token_ids) > 1
    assert 1 in flips and out.stats.thread_changes == len(flips)
    assert torch.get_num_threads() == 2  # restored after the call
