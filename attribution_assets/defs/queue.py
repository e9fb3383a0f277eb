"""Runs through the instance's run queue, for the lifetime of one command.

A queued profile (``multiprocess``, ``ray``) runs every run the way a UI backfill, a schedule
or automation does: the run is created with the code location's origin (so the UI links it to
its job and can re-execute it) and submitted to the instance's ``QueuedRunCoordinator``; a
daemon dequeues at most ``max_concurrent`` runs at once and hands each to the instance's run
launcher (the default launcher: a process of the code server on this machine; ``ray``: a Ray
job), and re-executes a failed run up to ``max_retries`` times (Dagster's run retries).

:class:`QueueSession` provides what that needs while a command runs:

- a code server (``dagster api grpc``, its own process group) that serves the definitions
  of the command's recipe (specs + profile, ``$ATTRIBUTION_RECIPE``) under the location name
  of ``workspace.yaml``, so the runs belong to the same code location as in ``make ui``;
- the daemons that move runs (run queue, run retries, run monitoring), as threads of the
  command's process: not the sensor, schedule or automation daemons, which would start
  runs of their own while the command runs (``dagster dev`` runs those);
- :meth:`QueueSession.submit` and :meth:`QueueSession.wait`, which follows each run through
  its retries and names every run that failed in the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import AUTO_RETRY_RUN_ID_TAG, WILL_RETRY_TAG

from attribution_assets.defs.runs import LOCATION, MODULE, RECIPE_ENV, failed_step

#: The daemons a command runs: the queue, run retries (they consume run failures), monitoring.
DAEMONS = ("QUEUED_RUN_COORDINATOR", "EVENT_LOG_CONSUMER", "MONITORING")
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


class QueuedRunsError(RuntimeError):
    """Queued runs failed after their retries; ``failed_in`` names the step and partitions of the
    first (the message names every failed run)."""

    def __init__(self, message: str, failed_in: str):
        super().__init__(message)
        self.failed_in = failed_in


@dataclass
class Submitted:
    """A submitted run: its label (e.g. `` [shard-00000 .. shard-00003]``) and first run id."""

    label: str
    run_id: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the command dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def write_recipe(home: Path, recipe: str) -> Path:
    """The recipe as a file under ``home/recipes`` (named by its digest; written atomically)."""
    path = home / "recipes" / f"{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(recipe)
        temporary.replace(path)
    return path


def run_chain_end(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun:
    """The newest run of ``run_id``'s retry chain (the run itself when it was not retried)."""
    run = instance.get_run_by_id(run_id)
    while run is not None and run.tags.get(AUTO_RETRY_RUN_ID_TAG):
        retry = instance.get_run_by_id(run.tags[AUTO_RETRY_RUN_ID_TAG])
        if retry is None:
            break
        run = retry
    return run


def settled(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Finished, and no retry of it is coming: with run retries on, Dagster tags every failed run
    with whether it will be retried (``dagster/will_retry``) as it stores the failure."""
    if run.status not in FINISHED:
        return False
    if run.status != dg.DagsterRunStatus.FAILURE or not instance.run_retries_enabled:
        return True
    return run.tags.get(WILL_RETRY_TAG) == "false"


class QueueSession:
    """Code server + daemons for one command over ``instance`` (which must be persistent and
    configured by ``defs.instance.persistent_instance`` for a queued profile); ``daemons``: the
    Dagster daemon types to run (e.g. add ``BACKFILL`` to serve backfills launched meanwhile)."""

    def __init__(self, instance: dg.DagsterInstance, recipe: str, log: Callable[[str], None] = print,
                 start_timeout: float = 300.0, daemons: Sequence[str] = DAEMONS):
        from dagster._core.run_coordinator import QueuedRunCoordinator

        if not instance.is_persistent or not isinstance(instance.run_coordinator, QueuedRunCoordinator):
            raise ValueError("Queued runs need a persistent Dagster instance with Dagster's run queue: "
                             "make it with `attribution_assets.defs.instance.persistent_instance(home, "
                             "profile)` for the queued profile (the CLI does).")
        self.instance, self.recipe, self.log, self.start_timeout = instance, recipe, log, start_timeout
        self.daemons = tuple(daemons)
        self._stack = contextlib.ExitStack()
        self._server: subprocess.Popen | None = None
        self._submitted: list[Submitted] = []

    # -- lifetime --------------------------------------------------------------------------------
    def __enter__(self) -> QueueSession:
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self) -> None:
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import GrpcServerTarget
        from dagster._daemon.controller import (
            create_daemon_of_type,
            daemon_controller_from_instance,
        )

        home = Path(self.instance.root_directory)
        recipe_path = write_recipe(home, self.recipe)
        port = _free_port()
        logs = home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._server_log = logs / f"code-server-{port}.log"
        # this process's environment too, for the session: a run launcher that forwards variables by
        # name (dagster-ray's `env_vars`) hands the recipe to runs it starts elsewhere
        self._stack.callback(_restore_env, RECIPE_ENV, os.environ.get(RECIPE_ENV))
        os.environ[RECIPE_ENV] = str(recipe_path)
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        with open(self._server_log, "wb") as out:
            self._server = subprocess.Popen(
                [sys.executable, "-m", "dagster", "api", "grpc", "-m", MODULE, "--location-name", LOCATION,
                 "-h", "127.0.0.1", "-p", str(port), "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)
        self._wait_for_server(port)
        target = GrpcServerTarget(host="127.0.0.1", port=port, socket=None, location_name=LOCATION)
        self.context = self._stack.enter_context(WorkspaceProcessContext(self.instance, target))
        self._stack.enter_context(daemon_controller_from_instance(
            self.instance, target, gen_daemons=lambda inst: [create_daemon_of_type(d, inst) for d in self.daemons],
            log_level="error"))  # not the consumer daemon's first-start notes in the command's output

    def _wait_for_server(self, port: int) -> None:
        from dagster._grpc.client import DagsterGrpcClient

        client, deadline = DagsterGrpcClient(port=port, host="127.0.0.1"), time.monotonic() + self.start_timeout
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(f"The code server exited with {self._server.returncode} before it served: "
                                   f"{self._tail()}")
            with contextlib.suppress(Exception):
                client.ping("ready")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"The code server did not answer within {self.start_timeout:.0f} s: {self._tail()}")
            time.sleep(0.5)

    def _tail(self, chars: int = 2000) -> str:
        text = self._server_log.read_text(errors="replace") if self._server_log.exists() else ""
        return text[-chars:].strip() or "(no output)"

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._terminate_unfinished()
        self._stack.close()
        if self._server is not None and self._server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._server.pid, signal.SIGTERM)
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._server.pid, signal.SIGKILL)
                self._server.wait()

    def _terminate_unfinished(self) -> None:
        """Stop this session's runs that have not finished (the command failed or was interrupted)."""
        for submitted in self._submitted:
            run = run_chain_end(self.instance, submitted.run_id)
            if run is None or run.status in FINISHED:
                continue
            with contextlib.suppress(Exception):
                if run.status == dg.DagsterRunStatus.QUEUED:
                    self.instance.report_run_canceled(run, "the command that queued it stopped")
                else:
                    self.instance.run_launcher.terminate(run.run_id)

    # -- runs ------------------------------------------------------------------------------------
    def submit(self, job_name: str, keys: Sequence[dg.AssetKey] | None, runs: Sequence[tuple[str, dict]],
               tags: dict, run_config: dict) -> list[Submitted]:
        """Queue one run of ``job_name`` per ``(label, partition tags)`` in ``runs``, over ``keys``
        (None: the whole job); return them in order."""
        from dagster._core.definitions.selector import JobSubsetSelector

        submitted = []
        with self.context.create_request_context() as workspace:
            location = workspace.get_code_location(LOCATION)
            repository = next(iter(location.get_repositories().values()))
            selector = JobSubsetSelector(location_name=LOCATION, repository_name=repository.name,
                                         job_name=job_name, op_selection=None,
                                         asset_selection=frozenset(keys) if keys else None)
            job = location.get_job(selector)
            plan = location.get_execution_plan(job, run_config, step_keys_to_execute=None, known_state=None,
                                               instance=self.instance).execution_plan_snapshot
            for label, run_tags in runs:
                run = self.instance.create_run(
                    job_name=job_name, run_id=None, run_config=run_config, resolved_op_selection=None,
                    step_keys_to_execute=plan.step_keys_to_execute, op_selection=None, status=None,
                    root_run_id=None, parent_run_id=None, tags={**job.tags, **tags, **run_tags},
                    job_snapshot=job.job_snapshot, execution_plan_snapshot=plan,
                    parent_job_snapshot=job.parent_job_snapshot, remote_job_origin=job.get_remote_origin(),
                    job_code_origin=job.get_python_origin(), asset_selection=frozenset(keys) if keys else None,
                    asset_check_selection=None, asset_graph=repository.asset_graph)
                self.instance.submit_run(run.run_id, workspace)
                submitted.append(Submitted(label, run.run_id))
        self._submitted += submitted
        return submitted

    def wait(self, submitted: Sequence[Submitted], what: str, poll: float = 1.0,
             release: Callable[[], object] | None = None) -> list[dg.DagsterRun]:
        """Wait until every run (and its retries) settled; ``release`` runs every few polls (marks
        runs whose process died as failed).
        Raise :class:`QueuedRunsError` naming every failed run; else return the final runs."""
        pending, finals, failures = {s.run_id: s for s in submitted}, [], []
        polls = 0
        while pending:
            for root, item in list(pending.items()):
                run = run_chain_end(self.instance, root)
                if not settled(self.instance, run):
                    continue
                del pending[root]
                finals.append(run)
                done = len(submitted) - len(pending)
                retried = f" after {run.tags.get('dagster/retry_number')} retries" \
                    if run.run_id != root else ""
                if run.status == dg.DagsterRunStatus.SUCCESS:
                    self.log(f"{done}/{len(submitted)} done: {what}{item.label} (run {run.run_id}{retried})")
                else:
                    where = (failed_step(self.instance, run.run_id) or what) + item.label
                    failures.append((where, run))
                    self.log(f"{done}/{len(submitted)} failed: {where} (run {run.run_id}{retried})")
            if pending:
                polls += 1
                if release is not None and polls % 5 == 0:
                    release()
                time.sleep(poll)
        if failures:
            raise QueuedRunsError("; ".join(f"{where} (run {run.run_id}, {run.status.value.lower()})"
                                            for where, run in failures), failures[0][0])
        return finals
