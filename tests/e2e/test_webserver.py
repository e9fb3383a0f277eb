"""Smoke test: dagster-webserver loads the code location and serves the expected asset keys."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename
    ... on RepositoryLocation { repositories { assetNodes { assetKey { path } } } }
    ... on PythonError { message } } } } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", method="POST",
                                     data=json.dumps({"query": QUERY}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_webserver_loads_code_location(tmp_path):
    port = _free_port()
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "ATTRIBUTION_STORAGE": str(tmp_path / "storage")}
    env.pop("ATTRIBUTION_PIPELINES", None)
    webserver = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen([str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, entry = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                entries = _graphql(port)["data"]["workspaceOrError"]["locationEntries"]
            except (OSError, KeyError, TypeError):
                time.sleep(1)
                continue
            entry = entries[0]["locationOrLoadError"] if entries else None
            if entry is not None:
                break
            time.sleep(1)
        assert entry is not None, "webserver never reported the code location"
        assert entry["__typename"] == "RepositoryLocation", entry.get("message")
        keys = {"/".join(node["assetKey"]["path"]) for repo in entry["repositories"]
                for node in repo["assetNodes"]}
        assert {"demo/corpus", "demo/model", "demo/tokenized_shards", "demo/tokenized_queries"} <= keys
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
