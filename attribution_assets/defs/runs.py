"""What the runner and the run queue share about runs: the code location they belong to, the
recipe that rebuilds the definitions in another process, run labels and partition tags, and which
step of a run failed."""

from __future__ import annotations

import os
import socket
import sys

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

#: The code location's name and module (``workspace.yaml``'s): runs carry its origin, so the UI
#: lists them under their jobs and can re-execute them.
LOCATION, MODULE = "attribution_assets", "attribution_assets.definitions"
#: Definitions metadata key of the recipe (specs + profile, JSON) that rebuilds them elsewhere.
RECIPE_KEY = "attribution/recipe"
#: The environment variable naming a recipe file: the code location (``definitions.py``) then
#: serves exactly the definitions of the command that queued the runs.
RECIPE_ENV = "ATTRIBUTION_RECIPE"
#: Run tags: the host and process that execute a run (a run whose process is gone is released),
#: its pipeline and stage, and whether it recomputes what it could reuse.
HOST_TAG, PID_TAG = "attribution/host", "attribution/pid"
#: The run whose process set the host and pid tags: a retry inherits its parent's tags, and they
#: name its own process only once it set them itself (absent: set by the run's creator).
PID_OF_TAG = "attribution/pid_of"
PIPELINE_TAG, STAGE_TAG, FORCE_TAG = "attribution/pipeline", "attribution/stage", "attribution/force"


def process_tags(run_id: str | None = None) -> dict[str, str]:
    """The host and pid tags of this process (set by run ``run_id`` itself, when given)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    return {**tags, PID_OF_TAG: run_id} if run_id else tags


def process_of(run: dg.DagsterRun) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that executes ``run``, where its tags name it (not the
    inherited tags of a retry whose own process has not tagged it yet)."""
    host, pid, of = run.tags.get(HOST_TAG), run.tags.get(PID_TAG, ""), run.tags.get(PID_OF_TAG)
    if host is None or not pid.isdigit() or (of is not None and of != run.run_id):
        return None
    return host, int(pid)


def recipe_of(defs: dg.Definitions) -> str | None:
    """The recipe (JSON: specs + profile) ``build_definitions`` recorded in ``defs``, if any."""
    value = (defs.metadata or {}).get(RECIPE_KEY)
    return None if value is None else getattr(value, "value", value)


def failed_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """``pipeline/asset`` of the step that failed in ``run_id`` (None if no step failed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        step = record.event_log_entry.step_key
        if step:
            return step.replace("__", "/", 1)
    return None


def range_run(first: str | None, last: str | None) -> tuple[str, dict[str, str]]:
    """The label (`` [first .. last]``) and tags of a run over a contiguous shard range
    (``first is None``: an unpartitioned run)."""
    if first is None:
        return "", {}
    label = f" [{first}]" if first == last else f" [{first} .. {last}]"
    return label, {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def partition_run(partition: str) -> tuple[str, dict[str, str]]:
    """The label and tags of a run of one partition."""
    return f" [{partition}]", {PARTITION_NAME_TAG: partition}


def location_origins(job_name: str):
    """``(RemoteJobOrigin, JobPythonOrigin)`` of ``job_name`` in the code location that
    ``workspace.yaml`` (``make ui``) and the run queue's code server serve: what a run made in this
    process carries so that the UI links it to its job, as it does runs it launched itself."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.definitions.repository_definition.valid_definitions import (
        SINGLETON_REPOSITORY_NAME,
    )
    from dagster._core.origin import RepositoryPythonOrigin
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    cwd = os.getcwd()
    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=MODULE, working_directory=cwd)
    location = ManagedGrpcPythonEnvCodeLocationOrigin(loadable_target_origin=target, location_name=LOCATION)
    remote = RemoteJobOrigin(repository_origin=RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME),
                             job_name=job_name)
    python = RepositoryPythonOrigin(executable_path=sys.executable, code_pointer=ModuleCodePointer(
        MODULE, "defs", working_directory=cwd)).get_job_origin(job_name)
    return remote, python
