"""Thread count and OpenMP wait policy (m2r2.threads): set before torch loads libgomp, user settings kept,
the default thread count follows the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from m2r2 import threads

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
    print(json.dumps({**seen, "policy": m2r2.threads.spin_policy()}))
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
