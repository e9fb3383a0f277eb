"""Deployment profiles in resources/: each loads and validates; bad ones name the key and fix."""

from pathlib import Path

import dagster as dg
import pytest

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.profiles import ProfileError, load_profile
from attribution_assets.spec import demo_spec

PROFILES = sorted((Path(__file__).resolve().parents[2] / "resources").glob("*.yaml"))


def test_the_repository_ships_local_gpu_and_multiprocess_profiles():
    assert {p.stem for p in PROFILES} >= {"local", "gpu", "multiprocess"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads_and_its_definitions_validate(path):
    profile = load_profile(str(path))
    defs = build_definitions([demo_spec()], profile)
    dg.Definitions.validate_loadable(defs)
    assert defs.executor.name == profile.executor
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
