"""Deployment profiles: which resource settings, executor, run launcher and instance a deployment uses.

A profile is a YAML file (``resources/<name>.yaml`` in the project, or any path) named by
``$ATTRIBUTION_RESOURCES`` (a path or a profile name); without it, ``local``. Sections:

``storage``: :class:`StorageResource` fields (``root``); ``compute``: :class:`ComputeResource`
fields (``device``, ``precision``, ``allow_tf32``, ``autocast``, ``threads``; a torchrun group:
``processes_per_shard`` per node, ``fsdp``, and for a c10d rendezvous ``rdzv_endpoint``,
``rdzv_id``, ``nnodes``, validated together).

``executor``: ``kind`` says where runs execute:

- ``in_process``: every run in the launching process (the ``local`` default);
- ``multiprocess``: runs go through the instance's run queue (Dagster's ``QueuedRunCoordinator``
  and daemon) and each executes in its own process on this machine;
- ``ray``: runs go through the same queue and each executes as a Ray job on a Ray cluster
  (dagster-ray's ``RayRunLauncher``; ``ray``: its config, e.g. ``address``);
- ``k8s``: every step a Kubernetes job (Dagster's ``k8s_job_executor``; ``k8s``: its config, with
  a pinned ``job_image``; ``pipelines_config_map``: the ConfigMap of the user's pipelines;
  ``pool_k8s_config``: each pool's step pods, ``gpu`` and ``default``: see ``defs/kubernetes.py``).

``max_concurrent``: runs at once (the queue's ``max_concurrent_runs``; steps at once for ``k8s``);
``shards_per_run``: shards per run of a partitioned asset (its ``BackfillPolicy.multi_run``, for
the CLI, a UI backfill, a schedule and automation alike; unset: all shards in one run);
``max_retries``: Dagster retries of a failed run (queued kinds) or step; ``devices``: GPUs per
machine (the ``gpu`` pool's limit; unset: the CUDA devices this machine has, else
``max_concurrent``).

``instance``: the Dagster instance's storage: ``storage: sqlite`` (one machine; the default) or
``postgres`` (run, event and schedule storage shared by processes and nodes; ``postgres``: its
connection settings, the password from an environment variable).
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
EXECUTORS = ("in_process", "multiprocess", "ray", "k8s")
#: Executor kinds whose runs go through the instance's run queue (a daemon launches them).
QUEUED = ("multiprocess", "ray")
INSTANCE_STORAGES = ("sqlite", "postgres")
_SECTIONS = {"storage", "compute", "executor", "instance"}


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
    shards_per_run: int | None = None
    devices: int | None = None
    k8s: dict | None = None
    ray: dict | None = None
    pipelines_config_map: str | None = None
    pool_k8s_config: dict | None = None
    instance: dict | None = None

    @property
    def queued(self) -> bool:
        """Runs go through the instance's run queue (``multiprocess``, ``ray``)."""
        return self.executor in QUEUED

    @property
    def workers(self) -> int:
        """Runs at once: ``max_concurrent`` of a queued profile (default: the cores), else 1."""
        return (self.max_concurrent or os.cpu_count() or 1) if self.queued else 1

    @property
    def instance_storage(self) -> str:
        """``sqlite`` or ``postgres`` (the ``instance`` section's ``storage``)."""
        return (self.instance or {}).get("storage", "sqlite")

    def backfill_policy(self) -> dg.BackfillPolicy:
        """The policy of every shard-partitioned asset: ``shards_per_run`` shards a run."""
        if self.shards_per_run is None:
            return dg.BackfillPolicy.single_run()
        return dg.BackfillPolicy.multi_run(max_partitions_per_run=self.shards_per_run)

    def retry_policy(self) -> dg.RetryPolicy | None:
        """Step retries of the stage jobs: ``max_retries``, except under a queued profile, where
        Dagster's run retries re-execute a failed run instead (not both)."""
        return dg.RetryPolicy(max_retries=self.max_retries) if self.max_retries and not self.queued else None

    def to_json(self) -> str:
        """The profile as the YAML mapping it came from (storage root resolved), as JSON:
        :func:`profile_from_json` rebuilds it in another process."""
        executor: dict[str, Any] = {"kind": self.executor, "max_retries": self.max_retries}
        for name in ("max_concurrent", "shards_per_run", "devices", "k8s", "ray", "pipelines_config_map",
                     "pool_k8s_config"):
            if getattr(self, name) is not None:
                executor[name] = getattr(self, name)
        raw = {"name": self.name, "source": str(self.source) if self.source else None,
               "storage": {"root": self.storage.root},
               "compute": self.compute.model_dump(exclude={"_restore"}), "executor": executor}
        if self.instance is not None:
            raw["instance"] = self.instance
        return json.dumps(raw)

    def executor_definition(self) -> dg.ExecutorDefinition:
        """How a run executes its steps: one after another in the run's process, except ``k8s``
        (a Kubernetes job per step). Queued kinds get their parallelism from concurrent runs."""
        if self.executor == "k8s":
            try:
                import dagster_k8s  # noqa: F401
            except ImportError:
                raise ProfileError(f"Profile {self.name!r} uses the `k8s` executor, which needs dagster-k8s: "
                                   "`pip install -c constraints.txt '.[k8s]'`.") from None
            from attribution_assets.defs.kubernetes import k8s_executor

            return k8s_executor(self)  # pinned image, pipelines ConfigMap, each pool's pod resources
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


EXECUTOR_KEYS = {"kind", "max_concurrent", "max_retries", "shards_per_run", "devices", "k8s", "ray",
                 "pipelines_config_map", "pool_k8s_config"}


def _check_count(value: Any, key: str, low: int, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ProfileError(f"{where}: `executor.{key}` must be an integer >= {low}, got {value!r}.")


#: ``instance.postgres`` keys (``params``: extra libpq connection parameters, e.g. ``sslmode``).
POSTGRES_KEYS = {"hostname", "port", "db_name", "username", "password_env", "params"}
POSTGRES_REQUIRED = ("hostname", "db_name", "username", "password_env")
INSTANCE_KEYS = {"storage", "postgres"}
_POSTGRES_EXAMPLE = ("e.g. `postgres: {hostname: db.example.org, port: 5432, db_name: dagster, "
                     "username: dagster, password_env: ATTRIBUTION_PG_PASSWORD}`")


def _check_instance_postgres(instance: dict, storage: str, where: str) -> None:
    """The ``instance`` section's keys, and ``instance.postgres``: the connection settings that
    ``storage: postgres`` needs; the password comes from the environment variable named by
    ``password_env`` (read when the instance is created), never from the profile."""
    unknown = sorted(set(instance) - INSTANCE_KEYS, key=str)
    if unknown:
        raise ProfileError(f"{where}: " + unknown_keys_message(unknown, INSTANCE_KEYS, "`instance`"))
    postgres = instance.get("postgres")
    if storage != "postgres":
        if postgres is not None:
            raise ProfileError(f"{where}: `instance.postgres` applies only with `instance.storage: postgres` "
                               f"(storage is {storage!r}); remove it or set `storage: postgres`.")
        return
    if not isinstance(postgres, dict):
        raise ProfileError(f"{where}: `instance.storage: postgres` needs an `instance.postgres` mapping "
                           f"with {', '.join(f'`{k}`' for k in POSTGRES_REQUIRED)}; {_POSTGRES_EXAMPLE}.")
    if "password" in postgres:
        raise ProfileError(f"{where}: `instance.postgres.password`: a profile never holds a password; set "
                           "`password_env` to the name of the environment variable that holds it "
                           "(e.g. `password_env: ATTRIBUTION_PG_PASSWORD`).")
    unknown = sorted(set(postgres) - POSTGRES_KEYS, key=str)
    if unknown:
        raise ProfileError(f"{where}: " + unknown_keys_message(unknown, POSTGRES_KEYS, "`instance.postgres`"))
    missing = [k for k in POSTGRES_REQUIRED if postgres.get(k) is None]
    if missing:
        raise ProfileError(f"{where}: `instance.postgres` lacks {', '.join(f'`{k}`' for k in missing)}; "
                           f"{_POSTGRES_EXAMPLE}.")
    for name in ("hostname", "db_name", "username", "password_env"):
        if not isinstance(postgres[name], str) or not postgres[name].strip():
            raise ProfileError(f"{where}: `instance.postgres.{name}` must be a non-empty string, got "
                               f"{postgres[name]!r} (quote it in YAML).")
    variable = postgres["password_env"]
    if not (variable.replace("_", "a").isalnum() and variable.isascii() and not variable[0].isdigit()):
        raise ProfileError(f"{where}: `instance.postgres.password_env` is the NAME of an environment variable "
                           f"(letters, digits, _), e.g. ATTRIBUTION_PG_PASSWORD, got {variable!r}; export the "
                           "password in that variable.")
    port = postgres.get("port", 5432)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProfileError(f"{where}: `instance.postgres.port` must be an integer from 1 to 65535, got {port!r}.")
    params = postgres.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, (str, int, float)) for v in params.values()):
        raise ProfileError(f"{where}: `instance.postgres.params` must map libpq connection parameters to "
                           f"strings or numbers (e.g. `sslmode: require`), got {params!r}.")


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
    for count in ("shards_per_run", "devices"):
        _check_count(executor.get(count), count, 1, where)
    for section, what in (("k8s", "the k8s_job_executor's config"), ("ray", "the RayRunLauncher's config")):
        value = executor.get(section)
        if value is not None and (kind != section or not isinstance(value, dict)):
            raise ProfileError(f"{where}: `executor.{section}` is {what}: a mapping, and only with "
                               f"`kind: {section}` (kind is {kind!r}).")
    from attribution_assets.defs.kubernetes import k8s_executor_problem

    problem = k8s_executor_problem(executor, kind, where)  # pinned image, pipelines ConfigMap, pools
    if problem:
        raise ProfileError(problem)
    instance = raw.get("instance")
    if instance is not None:
        instance = _section(raw, "instance", where)
        storage = instance.get("storage", "sqlite")
        if storage not in INSTANCE_STORAGES:
            raise ProfileError(f"{where}: `instance.storage` is {storage!r}; choose one of "
                               f"{list(INSTANCE_STORAGES)}.")
        _check_instance_postgres(instance, storage, where)
    return DeploymentProfile(
        name=name, source=source,
        storage=_resource(StorageResource, _section(raw, "storage", where), "storage", where),
        compute=_resource(ComputeResource, _section(raw, "compute", where), "compute", where),
        executor=kind, max_concurrent=max_concurrent, max_retries=max_retries or 0,
        shards_per_run=executor.get("shards_per_run"), devices=executor.get("devices"),
        k8s=executor.get("k8s"), ray=executor.get("ray"), instance=instance,
        pipelines_config_map=executor.get("pipelines_config_map"), pool_k8s_config=executor.get("pool_k8s_config"))


def profile_from_json(text: str) -> DeploymentProfile:
    """The profile that :meth:`DeploymentProfile.to_json` wrote."""
    raw = json.loads(text)
    name, source = raw.pop("name"), raw.pop("source")
    return profile_from_mapping(raw, f"profile {name!r}", name, Path(source) if source else None)
