"""The process's share of the machine: cores from affinity and cgroup quotas, peak RSS windows,
and thread pools that sleep instead of spinning."""

import os
import subprocess
import sys

import numpy as np
import pytest

from attribution_assets.engine import runtime


def _tree(tmp_path, proc_line, files):
    for rel, text in files.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cgroup").write_text(proc_line)
    return tmp_path / "cg", tmp_path / "cgroup"


def test_cgroup_v2_quota_of_the_process_and_its_parents(tmp_path):
    root, proc = _tree(tmp_path, "0::/job/step\n", {"job/cpu.max": "150000 100000\n",
                                                     "job/step/cpu.max": "max 100000\n",
                                                     "cpu.max": "400000 100000\n"})
    assert runtime.cgroup_cpu_limit(root, proc) == 1.5
    root, proc = _tree(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert runtime.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    files = {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "250000", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"}
    root, proc = _tree(tmp_path, "4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n", files)
    assert runtime.cgroup_cpu_limit(root, proc) == 2.5
    files = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    root, proc = _tree(tmp_path / "unlimited", "1:cpu:/\n", files)
    assert runtime.cgroup_cpu_limit(root, proc) is None


def test_available_cores_is_affinity_capped_by_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.available_cores() == affinity
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 0.5)
    assert runtime.available_cores() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: affinity + 7.0)
    assert runtime.available_cores() == affinity


def test_peak_window_forgets_earlier_peaks():
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    high = runtime.peak_rss_mb()
    del block
    if runtime._status_mib("VmRSS") > high - 48:
        pytest.skip("the allocator kept the freed block resident: no lower peak to observe")
    if not runtime.reset_peak_rss():
        pytest.skip("this kernel keeps VmHWM on clear_refs: the peak covers the process's life")
    assert runtime.peak_rss_mb() < high - 48


def test_importing_the_package_makes_pools_sleep():
    code = ("import os; import attribution_assets; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "0"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "0"]
