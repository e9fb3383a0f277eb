"""Deployment profiles in resources/: each loads and validates; bad ones name the key and fix."""

from pathlib import Path

import dagster as dg
import pytest

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.profiles import ProfileError, load_profile
from attribution_assets.spec import demo_spec

PROFILES = sorted((Path(__file__).resolve().parents[2] / "resources").glob("*.yaml"))


def test_the_repository_ships_local_gpu_multiprocess_and_kubernetes_profiles():
    assert {p.stem for p in PROFILES} >= {"local", "gpu", "multiprocess", "kubernetes"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads_and_its_definitions_validate(path):
    profile = load_profile(str(path))
    if profile.executor == "k8s":
        pytest.importorskip("dagster_k8s", reason="the kubernetes profile's executor needs the [k8s] extra")
    defs = build_definitions([demo_spec()], profile)
    dg.Definitions.validate_loadable(defs)
    # runs are the parallelism (the run queue); inside a run steps go one after another, except on k8s
    assert defs.executor.name == ("k8s" if profile.executor == "k8s" else "in_process")
    assert set(defs.resources) == {"storage", "compute"}


def test_profile_by_name_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_RESOURCES", "multiprocess")
    profile = load_profile()
    assert (profile.name, profile.executor, profile.max_concurrent, profile.compute.threads) == \
        ("multiprocess", "multiprocess", 2, 1)
    monkeypatch.delenv("ATTRIBUTION_RESOURCES")
    assert load_profile().name == "local"


@pytest.mark.parametrize("body, message", [
    ("compute: {devise: cuda}\n", r"`devise` \(did you mean `device`\?\) in `compute`"),
    ("executor: {kind: celery}\n", r"`executor.kind` is 'celery'; choose one of"),
    ("executor: {kind: multiprocess, max_concurrent: 0}\n", r"`executor.max_concurrent` must be an integer >= 1"),
    ("compute: {threads: -1}\n", r"`compute.threads`"),
    ("compute: {fsdp: true}\n", r"set processes_per_shard >= 2"),
    ("compute: {processes_per_shard: 0}\n", r"`compute.processes_per_shard`"),
    ("executor: {max_retries: -1}\n", r"`executor.max_retries` must be an integer >= 0"),
    ("storage: [1]\n", r"`storage` must be a mapping"),
    ("executer: {}\n", r"`executer` \(did you mean `executor`\?\)"),
    ("compute: {device: [\n", r"not valid YAML"),
])
def test_bad_profiles_name_the_key_and_the_fix(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ProfileError, match=message):
        load_profile(str(path))


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ProfileError, match=r"No deployment profile named 'nope'; known profiles: .*'gpu'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/no/such/profile.yaml")


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_dagster_definitions_validate_accepts_every_profile(path, tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    if load_profile(str(path)).executor == "k8s" and importlib.util.find_spec("dagster_k8s") is None:
        pytest.skip("the kubernetes profile's executor needs the [k8s] extra")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ATTRIBUTION_RESOURCES": str(path), "DAGSTER_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m",
                           "attribution_assets.definitions"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_profile_requests_a_gpu_for_gpu_steps_only_and_a_shared_volume():
    profile = load_profile("kubernetes")
    assert (profile.executor, profile.max_retries) == ("k8s", 2)
    step = profile.pool_k8s_config["gpu"]["container_config"]["resources"]
    assert step["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(profile.pool_k8s_config["default"])  # CPU steps get CPU pods
    assert profile.storage.root.startswith(profile.k8s["volume_mounts"][0]["mount_path"])


def test_k8s_settings_only_with_the_k8s_executor(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("executor: {kind: multiprocess, k8s: {job_image: x}}\n")
    with pytest.raises(ProfileError, match="only with `kind: k8s`"):
        load_profile(str(path))
