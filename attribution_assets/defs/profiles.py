"""Deployment profiles: which resource settings and which executor a deployment uses.

A profile is a YAML file (``resources/<name>.yaml`` in the project, or any path) named by
``$ATTRIBUTION_RESOURCES`` (a path or a profile name); without it, ``local``. Sections:

``storage``: :class:`StorageResource` fields (``root``); ``compute``: :class:`ComputeResource`
fields (``device``, ``precision``, ``allow_tf32``, ``autocast``, ``threads``); ``executor``: ``kind``
(``in_process`` or ``multiprocess``), for ``multiprocess`` ``max_concurrent`` (worker processes:
the runner runs that many shard ranges at once, each loading the model once), and
``max_retries`` (retries of a failed step, each shard range on its own; default 0); for
``k8s`` (Dagster's ``k8s_job_executor``: every step a Kubernetes job, needs the ``[k8s]``
extra) ``k8s``, the executor's own config (image, namespace, volumes, resource requests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import yaml

from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.spec import unknown_keys_message

PROFILE_ENV = "ATTRIBUTION_RESOURCES"
DEFAULT_PROFILE = "local"
EXECUTORS = ("in_process", "multiprocess", "k8s")
_SECTIONS = {"storage", "compute", "executor"}


class ProfileError(ValueError):
    """A deployment profile is missing or malformed; the message names the file, key and fix."""


@dataclass(frozen=True)
class DeploymentProfile:
    """A loaded profile: its name and source file, resources and executor settings."""

    name: str
    source: Path | None
    storage: StorageResource
    compute: ComputeResource
    executor: str = "in_process"
    max_concurrent: int | None = None
    max_retries: int = 0
    k8s: dict | None = None

    @property
    def workers(self) -> int:
        """Runs the runner starts at once in worker processes (shard ranges of a stage, partitions
        of an on-demand asset): ``max_concurrent`` of a ``multiprocess`` profile, else 1."""
        return (self.max_concurrent or os.cpu_count() or 1) if self.executor == "multiprocess" else 1

    def retry_policy(self) -> dg.RetryPolicy | None:
        return dg.RetryPolicy(max_retries=self.max_retries) if self.max_retries else None

    def to_json(self) -> str:
        """The profile as the YAML mapping it came from (storage root resolved), as JSON:
        :func:`profile_from_json` rebuilds it in another process."""
        executor: dict[str, Any] = {"kind": self.executor, "max_retries": self.max_retries}
        if self.max_concurrent:
            executor["max_concurrent"] = self.max_concurrent
        if self.k8s is not None:
            executor["k8s"] = self.k8s
        return json.dumps({"name": self.name, "source": str(self.source) if self.source else None,
                           "storage": {"root": self.storage.root},
                           "compute": self.compute.model_dump(exclude={"_restore"}), "executor": executor})

    def executor_definition(self) -> dg.ExecutorDefinition:
        if self.executor == "multiprocess":
            config: dict[str, Any] = {"max_concurrent": self.max_concurrent} if self.max_concurrent else {}
            return dg.multiprocess_executor.configured(config, name="multiprocess")
        if self.executor == "k8s":
            try:
                from dagster_k8s import k8s_job_executor
            except ImportError:
                raise ProfileError(f"Profile {self.name!r} uses the `k8s` executor, which needs dagster-k8s: "
                                   "`pip install -c constraints.txt '.[k8s]'`.") from None
            config = {**(self.k8s or {}), **({"max_concurrent": self.max_concurrent} if self.max_concurrent else {})}
            return k8s_job_executor.configured(config, name="k8s")
        return dg.in_process_executor.configured({}, name="in_process")


def profile_directories() -> list[Path]:
    """Where profile names are looked up: ``./resources``, then the project's ``resources/``."""
    project = Path(__file__).resolve().parents[2] / "resources"
    return [Path.cwd() / "resources", project]


def resolve_profile(name_or_path: str) -> Path | None:
    """The file a profile name or path refers to (None for the built-in default ``local``)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not candidate.is_file():
            raise ProfileError(f"Deployment profile {candidate} does not exist; point "
                               f"${PROFILE_ENV} at a YAML file or a profile name.")
        return candidate
    for directory in profile_directories():
        path = directory / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    if name_or_path == DEFAULT_PROFILE:
        return None
    known = sorted({p.stem for d in profile_directories() if d.is_dir() for p in d.glob("*.yaml")})
    raise ProfileError(f"No deployment profile named {name_or_path!r}; known profiles: {known}. "
                       f"Set ${PROFILE_ENV} to one of them or to a YAML file.")


def _section(raw: dict, name: str, where: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: `{name}` must be a mapping, got {type(value).__name__}.")
    return value


def _resource(cls, values: dict, section: str, where: str):
    fields = set(cls.model_fields) - {"_restore"}
    unknown = sorted(set(values) - fields, key=str)
    if unknown:
        raise ProfileError(f"{where}: " + unknown_keys_message(unknown, fields, f"`{section}`"))
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ProfileError(f"{where}: `{section}.{key}`: {first['msg']}.") from None


def load_profile(name_or_path: str | None = None) -> DeploymentProfile:
    """The profile ``name_or_path`` (default: ``$ATTRIBUTION_RESOURCES``, else ``local``), validated."""
    name_or_path = name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    path = resolve_profile(name_or_path)
    if path is None:
        return DeploymentProfile(DEFAULT_PROFILE, None, StorageResource(), ComputeResource())
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{where}: not valid YAML ({exc}).") from None
    return profile_from_mapping(raw, where, name=path.stem, source=path)


EXECUTOR_KEYS = {"kind", "max_concurrent", "max_retries", "k8s"}


def _check_count(value: Any, key: str, low: int, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ProfileError(f"{where}: `executor.{key}` must be an integer >= {low}, got {value!r}.")


def profile_from_mapping(raw: Any, where: str, name: str, source: Path | None = None) -> DeploymentProfile:
    """Validate a profile mapping (the YAML's sections) and build the profile."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a mapping with sections {sorted(_SECTIONS)}.")
    unknown = sorted(set(raw) - _SECTIONS, key=str)
    if unknown:
        raise ProfileError(f"{where}: " + unknown_keys_message(unknown, _SECTIONS, "the profile"))
    executor = _section(raw, "executor", where)
    bad = sorted(set(executor) - EXECUTOR_KEYS, key=str)
    if bad:
        raise ProfileError(f"{where}: " + unknown_keys_message(bad, EXECUTOR_KEYS, "`executor`"))
    kind = executor.get("kind", "in_process")
    if kind not in EXECUTORS:
        raise ProfileError(f"{where}: `executor.kind` is {kind!r}; choose one of {list(EXECUTORS)}.")
    max_concurrent = executor.get("max_concurrent")
    _check_count(max_concurrent, "max_concurrent", 1, where)
    max_retries = executor.get("max_retries", 0)
    _check_count(max_retries, "max_retries", 0, where)
    k8s = executor.get("k8s")
    if k8s is not None and (kind != "k8s" or not isinstance(k8s, dict)):
        raise ProfileError(f"{where}: `executor.k8s` is the k8s_job_executor's config: a mapping, and only "
                           f"with `kind: k8s` (kind is {kind!r}).")
    return DeploymentProfile(
        name=name, source=source,
        storage=_resource(StorageResource, _section(raw, "storage", where), "storage", where),
        compute=_resource(ComputeResource, _section(raw, "compute", where), "compute", where),
        executor=kind, max_concurrent=max_concurrent, max_retries=max_retries or 0, k8s=k8s)


def profile_from_json(text: str) -> DeploymentProfile:
    """The profile that :meth:`DeploymentProfile.to_json` wrote."""
    raw = json.loads(text)
    name, source = raw.pop("name"), raw.pop("source")
    return profile_from_mapping(raw, f"profile {name!r}", name, Path(source) if source else None)
