"""A real PostgreSQL server for tests, from Debian's ``postgresql`` package (``.ci/run`` installs it).

:func:`running_postgres` runs ``initdb`` into a fresh temporary directory and starts ``postgres``
itself as a child process (not daemonized, so its pid is known) on a free TCP port of 127.0.0.1,
with its unix socket inside that directory; it creates a login role with a random password and a
database owned by it. On exit, also after a failed test, it stops the server by that pid (SIGINT:
fast shutdown; SIGKILL to its process group if it has not ended after a while) and removes the
directory. PostgreSQL refuses to run as root: as root, the binaries run as the ``postgres`` system
user (the package creates it) and the directory is chowned to it.

The fixture :func:`postgres_server` (session scope) yields a :class:`PostgresServer`; a test that
needs a database of its own calls :meth:`PostgresServer.create_database`. Where the binaries are
absent the fixture skips with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The binaries the server needs (``/usr/lib/postgresql/<version>/bin`` on Debian).
BINARIES = ("initdb", "pg_ctl", "postgres", "psql")
SUPERUSER = "postgres"
#: Seconds to wait for the server to accept connections, and for it to stop.
START_TIMEOUT, STOP_TIMEOUT = 60.0, 20.0
#: Settings for a throwaway server: no durability, little memory. Passwords over TCP use md5,
#: not scram-sha-256: dagster-postgres opens a connection per query (NullPool), and SCRAM's key
#: derivation doubled the cost of each on a loaded 2-core machine (45 ms against 22 ms).
SERVER_SETTINGS = {"listen_addresses": "127.0.0.1", "fsync": "off", "synchronous_commit": "off",
                   "full_page_writes": "off", "shared_buffers": "16MB", "max_connections": "60",
                   "max_wal_size": "64MB", "logging_collector": "off", "log_min_messages": "warning",
                   "password_encryption": "md5"}


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding every one of :data:`BINARIES`, else the
    directory of ``initdb`` on ``$PATH`` if it holds them all, else None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
                        reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in BINARIES):
            return directory
    return None


def skip_reason() -> str | None:
    """Why no server can be started here (None: it can)."""
    if postgres_bin_dir() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl, postgres, psql under /usr/lib/postgresql/*/bin) are "
                "absent; install Debian's `postgresql` package (`apt-get install -y postgresql`, as "
                ".ci/run does)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return ("running as root, and PostgreSQL refuses root: the `postgres` system user "
                    "(created by Debian's `postgresql` package) does not exist")
    return None


@dataclass
class PostgresServer:
    """A running server: connect to ``db`` on ``host:port`` as ``user`` with ``password``."""

    host: str
    port: int
    user: str
    password: str
    db: str
    bin_dir: Path
    socket_dir: Path
    pid: int
    log: Path
    _databases: set[str] = field(default_factory=set)

    def psql(self, sql: str, db: str = "postgres") -> str:
        """``sql`` run by the superuser over the unix socket; its unaligned output."""
        result = subprocess.run([str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                 "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
                                 "-d", db, "-c", sql],
                                capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new empty database ``name`` owned by :attr:`user`; returns its name."""
        if not name.isidentifier() or name != name.lower():
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        self.psql(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        self._databases.add(name)
        return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_user(run_as: pwd.struct_passwd | None) -> dict:
    """``subprocess`` arguments that run a child as ``run_as`` (nothing when None)."""
    if run_as is None:
        return {}
    return {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}


def _stop(process: subprocess.Popen) -> None:
    """Stop the server by its pid: SIGINT (fast shutdown: disconnects clients), then SIGKILL to
    its process group (the postmaster and its backends) if it has not ended in time."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own group: start_new_session
        process.wait(STOP_TIMEOUT)


def _start(bin_dir: Path, data: Path, sockets: Path, log: Path, env: dict,
           run_as: pwd.struct_passwd | None) -> tuple[subprocess.Popen, int, functools.partial]:
    """``postgres`` on a free port, ready for connections (three ports tried: another process
    may take the free port first); returns it, its port and its stopper, registered with atexit
    in case the fixture's teardown never runs."""
    for _ in range(3):
        port = _free_port()
        command = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets)]
        for name, value in SERVER_SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=data.parent, env=env, start_new_session=True, **_as_user(run_as))
        stopper = functools.partial(_stop, process)
        atexit.register(stopper)
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            ready = subprocess.run([str(bin_dir / "psql"), "-X", "-h", str(sockets), "-p", str(port), "-U",
                                    SUPERUSER, "-d", "postgres", "-Atc", "select 1"],
                                   capture_output=True, text=True)
            if ready.returncode == 0:
                return process, port, stopper
            time.sleep(0.1)
        stopper()
        atexit.unregister(stopper)
        if "could not bind" not in log.read_text(errors="replace"):
            break
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"PostgreSQL did not start (exit status {process.returncode}); its log:\n{tail}")


@contextlib.contextmanager
def running_postgres(db: str = "attribution", user: str = "attribution") -> Iterator[PostgresServer]:
    """A PostgreSQL server in a temporary directory for the ``with`` block (module docstring)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    bin_dir = postgres_bin_dir()
    run_as = pwd.getpwnam(SUPERUSER) if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="attribution-postgres-"))
    stopper = None
    try:
        data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
        sockets.mkdir()
        if run_as is not None:
            for path in (root, sockets):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
               "HOME": str(root)}
        initdb = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-E", "UTF8",
                                 "--locale=C", "--auth-local=trust", "--auth-host=md5", "--no-sync"],
                                cwd=root, env=env, capture_output=True, text=True, timeout=120,
                                **_as_user(run_as))
        if initdb.returncode:
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()}")
        process, port, stopper = _start(bin_dir, data, sockets, log, env, run_as)
        password = secrets.token_urlsafe(16)
        server = PostgresServer("127.0.0.1", port, user, password, db, bin_dir, sockets, process.pid, log)
        server.psql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        server.create_database(db)
        yield server
    finally:
        if stopper is not None:
            stopper()
            atexit.unregister(stopper)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (:func:`running_postgres`)."""
    with running_postgres() as server:
        yield server
