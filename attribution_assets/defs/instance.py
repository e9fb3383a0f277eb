"""The Dagster instance a deployment profile needs: its ``dagster.yaml`` settings, written under
``$DAGSTER_HOME``.

Every instance: telemetry off, run monitoring on (runs whose worker died are marked failed and
their pool slots freed). A queued profile (``multiprocess``, ``ray``) adds Dagster's run queue:
the ``QueuedRunCoordinator`` with ``max_concurrent`` runs at once, the ``gpu`` pool limited to
the machine's devices, and run retries (``max_retries``); the daemon (``dagster dev``, or the one
``attribution materialize`` runs for its lifetime) dequeues, launches and retries them.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from attribution_assets.defs.profiles import DeploymentProfile, ProfileError, load_profile

#: Settings every instance gets (a profile's own settings are added by :func:`instance_settings`).
BASE_SETTINGS = {
    "telemetry": {"enabled": False},
    "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "poll_interval_seconds": 30,
                       "max_resume_run_attempts": 0, "free_slots_after_run_end_seconds": 30},
}
#: Seconds between two passes of the daemon over the run queue.
DEQUEUE_INTERVAL_SECONDS = 1


def gpu_slots(profile: DeploymentProfile) -> int:
    """Slots of the ``gpu`` pool: ``devices`` of the profile, else this machine's CUDA devices,
    else the profile's concurrent runs (CPU steps are then limited by runs alone)."""
    if profile.devices:
        return profile.devices
    if profile.executor == "ray":  # the cluster's GPUs, not this machine's: one run, one GPU
        return profile.workers
    import torch

    return torch.cuda.device_count() or profile.workers


def queue_settings(profile: DeploymentProfile) -> dict:
    """Run queue, pool limits and run retries of a queued profile (``{}`` for the others, whose
    runs execute in the launching process: two runs and two ``gpu`` steps at once under
    ``dagster dev``)."""
    if not profile.queued:
        return {"concurrency": {"pools": {"default_limit": 2}, "runs": {"max_concurrent_runs": 2}}}
    return {
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": DEQUEUE_INTERVAL_SECONDS}},
        "concurrency": {"pools": {"default_limit": gpu_slots(profile)},
                        "runs": {"max_concurrent_runs": profile.workers}},
        "run_retries": {"enabled": profile.max_retries > 0, "max_retries": profile.max_retries,
                        "retry_on_asset_or_op_failure": True},
    }


#: What installs dagster-postgres (the ``postgres`` extra).
POSTGRES_INSTALL = "pip install -c constraints.txt '.[postgres]'"
#: The SQLAlchemy URL scheme of the driver dagster-postgres installs (psycopg2): SQLAlchemy 2.1
#: maps a bare ``postgresql://`` to psycopg 3, which is not installed.
POSTGRES_SCHEME = "postgresql+psycopg2"


def storage_settings(profile: DeploymentProfile) -> dict:
    """Run, event-log and schedule storage: ``{}`` for ``sqlite`` (Dagster's default: SQLite files
    under ``$DAGSTER_HOME``, for one machine); for ``postgres``, dagster-postgres's storage on the
    profile's ``instance.postgres`` server. ``dagster.yaml`` names the password's environment
    variable (``password: {env: <password_env>}``), never the password: every process that opens
    the instance (daemon, run workers, webserver) reads it from its own environment.

    Raises :class:`ProfileError` when dagster-postgres is not installed or the variable is unset.
    """
    if profile.instance_storage != "postgres":
        return {}
    where = f"Profile {profile.name!r}" + (f" ({profile.source})" if profile.source else "")
    try:
        import dagster_postgres  # noqa: F401
    except ImportError:
        raise ProfileError(f"{where} keeps the Dagster instance in Postgres (`instance.storage: postgres`), "
                           f"which needs dagster-postgres: `{POSTGRES_INSTALL}`.") from None
    postgres = profile.instance["postgres"]
    variable = postgres["password_env"]
    if not os.environ.get(variable):
        raise ProfileError(f"{where} keeps the Dagster instance in Postgres and reads the password of "
                           f"{postgres['username']}@{postgres['hostname']} from ${variable} "
                           f"(`instance.postgres.password_env`), which is unset or empty: "
                           f"`export {variable}=...` before starting.")
    db = {"username": postgres["username"], "password": {"env": variable}, "hostname": postgres["hostname"],
          "db_name": postgres["db_name"], "port": postgres.get("port", 5432), "scheme": POSTGRES_SCHEME}
    if postgres.get("params"):
        db["params"] = dict(postgres["params"])
    return {"storage": {"postgres": {"postgres_db": db}}}


#: Environment variables every Ray run gets, by name: dagster-ray reads their values from the
#: process that launches the run (the daemon), so the run on a Ray node sees the same instance,
#: profile, storage, pipelines, the command's recipe (``ATTRIBUTION_RECIPE``: a file under
#: ``$DAGSTER_HOME``) and offline Hugging Face settings; the profile's own
#: ``executor.ray.env_vars`` are added. Never a secret: dagster-ray puts the values into the Ray
#: job's ``runtime_env``, which Ray's job list (the dashboard) shows, and run monitoring copies
#: the job's details into the failure event of a run whose Ray job died. The Postgres password
#: (``instance.postgres.password_env``) comes from the nodes' own environment (docs/ray.md).
RAY_ENV_VARS = ("DAGSTER_HOME", "ATTRIBUTION_RESOURCES", "ATTRIBUTION_STORAGE", "ATTRIBUTION_PIPELINES",
                "ATTRIBUTION_RECIPE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                "TOKENIZERS_PARALLELISM")
#: Where the Ray cluster's dashboard (its Jobs API) is when the profile names no ``address``.
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def launcher_settings(profile: DeploymentProfile) -> dict:
    """The run launcher of a ``ray`` profile (``{}`` for the others, which keep Dagster's default
    launcher): dagster-ray's ``RayRunLauncher``, which submits each run as a Ray job (entrypoint
    ``dagster api execute_run``) to the cluster's Jobs API at ``executor.ray.address`` (default:
    ``$RAY_ADDRESS``, read by the daemon). The rest of ``executor.ray`` is the launcher's config
    (``num_cpus``, ``num_gpus``, ``memory``, ``resources``, ``runtime_env``, ``env_vars``, ...).

    ``num_cpus`` defaults to 1: a job that asks for no resource runs on the head node, one that
    asks for a CPU runs on any node with one free, so ``max_concurrent`` runs spread over the
    nodes and a node runs as many at once as it has CPUs. ``num_gpus: 1`` gives each run its own
    GPU: Ray sets ``CUDA_VISIBLE_DEVICES`` of the run's process to the GPU it assigned, so
    ``cuda`` in the run is that device and runs on a node with N GPUs use N different devices
    (without ``num_gpus`` Ray leaves ``CUDA_VISIBLE_DEVICES`` alone and every run sees every GPU,
    so a ``cuda`` profile must ask for one; :class:`ProfileError` says so).
    """
    if profile.executor != "ray":
        return {}
    config = dict(profile.ray or {})
    config.setdefault("address", {"env": RAY_ADDRESS_ENV})
    config.setdefault("num_cpus", 1)
    if profile.compute.device.startswith("cuda") and not config.get("num_gpus"):
        where = f"Profile {profile.name!r}" + (f" ({profile.source})" if profile.source else "")
        raise ProfileError(f"{where} runs on `compute.device: {profile.compute.device}` under Ray but its runs "
                           "ask Ray for no GPU, so every run would see every GPU and use the first: set "
                           "`executor.ray.num_gpus: 1` (Ray then gives each run its own device through "
                           "CUDA_VISIBLE_DEVICES).")
    entries = {name: name for name in RAY_ENV_VARS}  # NAME (value from the daemon) or NAME=value
    for entry in config.get("env_vars") or []:
        entries[str(entry).split("=", 1)[0]] = str(entry)
    config["env_vars"] = list(entries.values())
    return {"run_launcher": {"module": "dagster_ray", "class": "RayRunLauncher", "config": {"ray": config}}}


def instance_settings(profile: DeploymentProfile) -> dict:
    """The ``dagster.yaml`` mapping ``profile`` needs."""
    return {**BASE_SETTINGS, **storage_settings(profile), **queue_settings(profile), **launcher_settings(profile)}


def persistent_instance(home: str | os.PathLike | None = None,
                        profile: DeploymentProfile | None = None) -> dg.DagsterInstance:
    """The instance under ``home`` (default ``$DAGSTER_HOME``, else ``./.dagster_home``) with the
    settings ``profile`` (default: ``$ATTRIBUTION_RESOURCES``'s) needs; the profile's settings
    replace the same top-level keys of an existing ``dagster.yaml``, other keys stay."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    current = (yaml.safe_load(config.read_text()) or {}) if config.exists() else {}
    wanted = instance_settings(profile or load_profile())
    # a queued, Ray or Postgres profile's settings that this profile does not want
    stale = {"run_coordinator", "run_retries", "run_launcher", "storage"} - set(wanted)
    merged = {**{k: v for k, v in current.items() if k not in stale}, **wanted}
    if merged != current:
        temporary = config.with_suffix(".yaml.tmp")
        temporary.write_text(yaml.safe_dump(merged, sort_keys=False))
        temporary.replace(config)
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()
