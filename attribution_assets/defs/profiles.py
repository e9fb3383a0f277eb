"""Deployment profiles: which resource settings and which executor a deployment uses.

A profile is a YAML file (``resources/<name>.yaml`` in the project, or any path) named by
``$ATTRIBUTION_RESOURCES`` (a path or a profile name); without it, ``local``. Sections:

``storage``: :class:`StorageResource` fields (``root``); ``compute``: :class:`ComputeResource`
fields (``device``, ``precision``, ``allow_tf32``, ``autocast``, ``threads``); ``executor``: ``kind``
(``in_process`` or ``multiprocess``) and, for ``multiprocess``, ``max_concurrent``.
"""

from __future__ import annotations

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
EXECUTORS = ("in_process", "multiprocess")
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

    def executor_definition(self) -> dg.ExecutorDefinition:
        if self.executor == "multiprocess":
            config: dict[str, Any] = {"max_concurrent": self.max_concurrent} if self.max_concurrent else {}
            return dg.multiprocess_executor.configured(config, name="multiprocess")
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
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a mapping with sections {sorted(_SECTIONS)}.")
    unknown = sorted(set(raw) - _SECTIONS, key=str)
    if unknown:
        raise ProfileError(f"{where}: " + unknown_keys_message(unknown, _SECTIONS, "the profile"))
    executor = _section(raw, "executor", where)
    bad = sorted(set(executor) - {"kind", "max_concurrent"}, key=str)
    if bad:
        raise ProfileError(f"{where}: " + unknown_keys_message(bad, {"kind", "max_concurrent"}, "`executor`"))
    kind = executor.get("kind", "in_process")
    if kind not in EXECUTORS:
        raise ProfileError(f"{where}: `executor.kind` is {kind!r}; choose one of {list(EXECUTORS)}.")
    max_concurrent = executor.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise ProfileError(f"{where}: `executor.max_concurrent` must be an integer >= 1, got {max_concurrent!r}.")
    return DeploymentProfile(
        name=path.stem, source=path,
        storage=_resource(StorageResource, _section(raw, "storage", where), "storage", where),
        compute=_resource(ComputeResource, _section(raw, "compute", where), "compute", where),
        executor=kind, max_concurrent=max_concurrent)
