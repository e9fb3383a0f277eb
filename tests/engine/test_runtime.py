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


def test_claim_slot_gives_each_holder_its_own_slot_and_frees_it_on_release(tmp_path):
    from attribution_assets.engine.runtime import claim_slot

    first, release_first = claim_slot(tmp_path, 2)
    second, release_second = claim_slot(tmp_path, 2)
    assert (first, second) == (0, 1)
    with pytest.raises(BlockingIOError, match="all 2 slots"):
        claim_slot(tmp_path, 2, wait=False)
    release_first()
    again, release_again = claim_slot(tmp_path, 2, wait=False)
    assert again == 0
    release_again()
    release_second()


def test_a_dead_holder_frees_its_slot(tmp_path):
    import subprocess
    import sys

    from attribution_assets.engine.runtime import claim_slot

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from attribution_assets.engine.runtime import claim_slot; "
        f"held = claim_slot({str(tmp_path)!r}, 1); print(held[0], flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        with pytest.raises(BlockingIOError):
            claim_slot(tmp_path, 1, wait=False)
    finally:
        holder.kill()
        holder.wait()
    slot, release = claim_slot(tmp_path, 1, wait=False)  # the kill freed it
    assert slot == 0
    release()


def test_concurrent_runs_on_a_multi_gpu_machine_take_one_gpu_each(monkeypatch, tmp_path):
    import tempfile

    import dagster as dg
    import torch

    from attribution_assets.defs.resources import ComputeResource

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    runs = [ComputeResource(device="auto", threads=1) for _ in range(2)]
    for run in runs:
        run.setup_for_execution(dg.build_init_resource_context())
    assert [run._claimed for run in runs] == ["cuda:0", "cuda:1"]
    runs[0].teardown_after_execution(dg.build_init_resource_context())
    again = ComputeResource(device="cuda", threads=1)
    again.setup_for_execution(dg.build_init_resource_context())
    assert again._claimed == "cuda:0"  # the first run's GPU, freed when it ended
    for run in (runs[1], again):
        run.teardown_after_execution(dg.build_init_resource_context())
    pinned = ComputeResource(device="cuda:1", threads=1)
    pinned.setup_for_execution(dg.build_init_resource_context())
    assert pinned._claimed is None  # an explicit device is the user's choice
    pinned.teardown_after_execution(dg.build_init_resource_context())
