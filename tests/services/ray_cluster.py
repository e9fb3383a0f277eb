"""A real two-node Ray cluster for tests: a head node and a worker node on this machine.

:func:`running_ray_cluster` starts each node with ``ray start ... --block`` as a child process of
its own (``start_new_session``: its own process group), with its own temporary directory
(``--temp-dir``: sessions, sockets, logs) and its own ports, one logical CPU each
(``--num-cpus 1``), a small object store, no GPUs, usage stats off and health checks once a
second. The head runs the GCS and the dashboard (the Jobs API that dagster-ray's
``RayRunLauncher`` submits runs to) on 127.0.0.1; the worker node joins it with ``ray start
--address``. The head carries a custom resource ``head: 1``, the worker ``worker: 1``: a job
that asks for one of them can only run on that node. Both nodes have this interpreter's
``bin`` directory first on ``PATH``, so a job's entrypoint ``dagster api execute_run`` is this
virtual environment's.

Every process a node starts (GCS, raylet, dashboard and its agents, Ray workers, job supervisors,
the job drivers Ray puts into sessions of their own) inherits a marker variable naming the
cluster and the node. :meth:`RayNode.kill` stops a node the way a crashed machine would: it
freezes the node's process tree (SIGSTOP, so nothing forks meanwhile), then SIGKILLs by pid every
process of that tree and every process carrying the node's marker, and waits until they are gone.
:meth:`RayCluster.restart_worker` starts a new worker node in place of a killed one. Teardown
(also after a failed test, and at interpreter exit in case teardown never ran) does the same for
both nodes and then checks that no process of the cluster is left. Ray's gRPC servers listen on
all interfaces (Ray hard-codes it) and advertise the host's address; the dashboard, the only
address clients use here, binds 127.0.0.1.

The fixture :func:`ray_cluster` (module scope) yields a :class:`RayCluster`; it skips with the
reason where ``ray`` (the ``ray`` extra) is not importable.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Seconds to wait for both nodes to be up, and for a killed node's processes to end.
START_TIMEOUT, STOP_TIMEOUT = 120.0, 30.0
#: The environment variable that marks every process of a node: ``<cluster id>/<node name>``.
MARKER = "ATTRIBUTION_TEST_RAY_NODE"
#: Object store per node (Ray's minimum is 75 MiB).
OBJECT_STORE_BYTES = 80 * 2**20
#: The custom resources only the head node and only the worker node have (a job that asks for
#: one of them can only run on that node).
HEAD_RESOURCE, WORKER_RESOURCE = "head", "worker"
#: The GCS declares a node dead after this many missed health checks, one a second (Ray's
#: default: 5 of one every 3 s), so a killed node's jobs fail within seconds.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"}


def skip_reason() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    try:
        import ray  # noqa: F401
        import ray.job_submission  # noqa: F401
    except ImportError as exc:
        return (f"ray is not importable ({exc}); install the `ray` extra: "
                "`pip install -c constraints.txt '.[ray]'`")
    if not (Path(sys.executable).parent / "ray").exists():
        return f"the `ray` command is absent next to {sys.executable}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node's own servers, each free now (two nodes share this host)."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [arg for name in names for arg in (f"--{name}", str(_free_port()))]


def _marked(marker: str, prefix: bool = False) -> list:
    """Live processes whose environment carries ``MARKER=marker`` (``prefix``: a value that
    starts with ``marker``)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            value = process.environ().get(MARKER)
            if value is not None and (value.startswith(marker) if prefix else value == marker) and _alive(process):
                found.append(process)
    return found


@dataclass
class RayNode:
    """One ``ray start --block`` process and everything it started."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    marker: str
    node_id: str | None = None
    killed: bool = False

    def processes(self) -> list:
        """The node's live processes: its process tree and whatever carries its marker."""
        import psutil

        found = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process
        for process in _marked(self.marker):
            found.setdefault(process.pid, process)
        return [p for p in found.values() if _alive(p)]

    def kill(self) -> list[int]:
        """SIGKILL every process of the node by pid (see the module docstring); returns the pids."""
        import psutil

        killed: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            # Freeze first, so that no process forks a child between the listing and the kill.
            current = [p for p in self.processes() if p.pid not in killed]
            if not current:
                break
            for process in current:
                with contextlib.suppress(psutil.Error):
                    process.suspend()
            for process in current + [p for p in self.processes() if p.pid not in killed]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
                killed[process.pid] = process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT)
        _, alive = psutil.wait_procs(list(killed.values()), timeout=STOP_TIMEOUT)
        alive = [p for p in alive if _alive(p)]
        if alive:
            raise RuntimeError(f"Ray node {self.name}: processes {[p.pid for p in alive]} survived SIGKILL")
        self.killed = True
        return sorted(killed)


def _alive(process) -> bool:
    """Running (a zombie is dead: init reaps it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class RayCluster:
    """A running cluster: submit jobs to :attr:`dashboard_url`; nodes ``head`` and ``worker``."""

    gcs_address: str
    dashboard_url: str
    head: RayNode
    worker: RayNode
    root: Path
    _worker_args: list[str] = field(default_factory=list)
    _env: dict[str, str] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)

    @property
    def nodes_by_name(self) -> dict[str, RayNode]:
        return {self.head.name: self.head, self.worker.name: self.worker}

    def node_list(self) -> list[dict]:
        """The GCS's node table: ``node_id``, ``name`` (head/worker), ``state``, ``resources``."""
        with urllib.request.urlopen(f"{self.dashboard_url}/nodes?view=summary", timeout=10) as answer:
            summary = json.load(answer)["data"]["summary"]
        nodes = []
        for entry in summary:
            raylet = entry["raylet"]
            nodes.append({"node_id": raylet["nodeId"], "name": self.name_of(raylet["nodeId"], raylet),
                          "state": raylet["state"], "is_head": bool(raylet.get("isHeadNode")),
                          "resources": {k: v for k, v in raylet.get("resourcesTotal", {}).items()
                                        if not k.startswith("node:")}})
        return nodes

    def name_of(self, node_id: str | None, raylet: dict | None = None) -> str:
        """``head`` or ``worker`` for a Ray node id (``?`` if unknown)."""
        if node_id in self._names:
            return self._names[node_id]
        if raylet is not None:
            name = "head" if raylet.get("isHeadNode") else (
                "worker" if WORKER_RESOURCE in raylet.get("resourcesTotal", {}) else "?")
            if name != "?":
                self._names[node_id] = name
                self.nodes_by_name[name].node_id = node_id
            return name
        return "?"

    def alive_nodes(self) -> list[str]:
        return sorted(n["name"] for n in self.node_list() if n["state"] == "ALIVE")

    def wait_for(self, names: list[str], timeout: float = START_TIMEOUT) -> None:
        """Until exactly ``names`` are alive in the GCS's node table."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if self.alive_nodes() == sorted(names):
                    return
            for node in self.nodes_by_name.values():
                if not node.killed and node.process.poll() is not None:
                    raise RuntimeError(f"Ray {node.name} node exited ({node.process.returncode}):\n"
                                       + node.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray nodes {names} not alive after {timeout:.0f} s; logs under {self.root}")
            time.sleep(0.5)

    def client(self):
        """A Ray ``JobSubmissionClient`` on the dashboard."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def job_node(self, submission_id: str) -> str:
        """Which node (``head``, ``worker``, ``killed worker``) runs or ran a Ray job's driver
        (``?``: not placed yet)."""
        try:
            info = self.client().get_job_info(submission_id)
        except RuntimeError as exc:  # 404: not submitted (yet)
            if "does not exist" in str(exc):
                return "?"
            raise
        if not info.driver_node_id:
            return "?"
        if info.driver_node_id not in self._names:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.node_list()
        return self._names.get(info.driver_node_id, "?")

    def describe(self) -> str:
        """One line per node: name, id, state, resources (for test output)."""
        return "\n".join(f"  {n['name']:<13} {n['node_id'][:12]}  {n['state']:<5} {n['resources']}"
                         for n in self.node_list())

    def restart_worker(self) -> None:
        """A new worker node (a fresh process, directory and ports) in place of a killed one."""
        if not self.worker.killed:
            raise RuntimeError("the worker node still runs; kill it first")
        old = self.worker
        self.worker = _start_node("worker", self._worker_args, f"{old.marker}+", self._env)
        self._names = {k: "killed worker" if v == "worker" else v for k, v in self._names.items()}
        import shutil

        shutil.rmtree(old.temp_dir, ignore_errors=True)
        self.wait_for(["head", "worker"])

    def stop(self) -> None:
        """Kill both nodes by pid (worker first) and remove the temporary directories."""
        errors = []
        for node in (self.worker, self.head):
            try:
                node.kill()
            except RuntimeError as exc:
                errors.append(str(exc))
        for node in (self.worker, self.head):
            import shutil

            shutil.rmtree(node.temp_dir, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))


def _start_node(name: str, args: list[str], marker: str, env: dict) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))  # short: unix socket paths
    log = temp_dir / "ray-start.log"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--temp-dir", str(temp_dir),
               "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--log-style", "record",
               *_node_ports(), *args]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={**env, MARKER: marker}, cwd=temp_dir, start_new_session=True)
    return RayNode(name, process, temp_dir, log, marker)


def node_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment nodes start with: this one, this interpreter's ``bin`` first on ``PATH``,
    usage stats off, fast health checks (:data:`HEALTH_CHECKS`) and ``extra``."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", **HEALTH_CHECKS}
    env.pop("RAY_ADDRESS", None)  # the nodes' own drivers set it
    return {**env, **(extra or {})}


@contextlib.contextmanager
def running_ray_cluster(env: dict[str, str] | None = None, wait: bool = True) -> Iterator[RayCluster]:
    """A head and a worker node for the ``with`` block (module docstring); ``env``: extra
    environment variables of both nodes (and so of every job they run). With ``wait=False`` it
    yields as soon as both are starting (their addresses are fixed): the caller starts other
    things meanwhile, then calls ``cluster.wait_for(["head", "worker"])``."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster_id = uuid.uuid4().hex[:12]
    environment = node_environment(env)
    gcs_port, dashboard_port = _free_port(), _free_port()
    gcs_address, dashboard_url = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    nodes: list[RayNode] = []
    cluster: RayCluster | None = None

    def stop_all() -> None:  # also the nodes a restart added
        current = [cluster.worker, cluster.head] if cluster is not None else []
        for node in [*current, *reversed(nodes)]:
            with contextlib.suppress(Exception):
                node.kill()

    atexit.register(stop_all)
    try:
        nodes.append(_start_node("head", ["--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                                          "--ray-client-server-port", str(_free_port()),
                                          "--resources", json.dumps({HEAD_RESOURCE: 1})],
                                 f"{cluster_id}/head", environment))
        # The worker node retries the GCS until the head is up: both start at once.
        worker_args = ["--address", gcs_address, "--resources", json.dumps({WORKER_RESOURCE: 1})]
        nodes.append(_start_node("worker", worker_args, f"{cluster_id}/worker", environment))
        cluster = RayCluster(gcs_address, dashboard_url, nodes[0], nodes[1], nodes[0].temp_dir, worker_args,
                             environment)
        if wait:
            cluster.wait_for(["head", "worker"])
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.stop()
            else:
                stop_all()
        finally:
            atexit.unregister(stop_all)
        left = _marked(cluster_id, prefix=True)
        if left:
            raise RuntimeError(f"Ray processes left after the cluster stopped: {[p.pid for p in left]}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster for the module (:func:`running_ray_cluster`)."""
    with running_ray_cluster() as cluster:
        yield cluster
