"""The Dagster UI in a real browser: headless Chromium (Debian's package, driven by Playwright)
against `dagster-webserver` on the materialized tiny demo (loopback, a free port). Screenshots
go to the test's temporary directory, and also to ``$ATTRIBUTION_SCREENSHOTS`` when set (how
``docs/img`` is refreshed)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.e2e.test_webserver import _free_port, _graphql
from tests.helpers import definitions_for, materialize_tiny_demo, tiny_demo_spec

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium (Debian; as root) and pip install playwright (no browser download)"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium is not installed: {INSTALL}"),
]


def _wait_until_loaded(proc: subprocess.Popen, port: int, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            entries = _graphql(port)["data"]["workspaceOrError"]["locationEntries"]
            entry = entries[0]["locationOrLoadError"] if entries else None
        except (OSError, KeyError, TypeError, IndexError):
            entry = None
        if entry is not None:
            assert entry["__typename"] == "RepositoryLocation", entry.get("message")
            return
        time.sleep(0.5)
    raise AssertionError("dagster-webserver never loaded the code location")


def _shown(name: str, labels: set[str]) -> bool:
    """Whether a graph node shows ``name``, whole or shortened with an ellipsis in the middle."""
    return name in labels or any("…" in label and name.startswith(label.split("…")[0])
                                 and name.endswith(label.split("…")[1]) for label in labels)


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """``(base url, spec, asset keys, shards, screenshot dir)`` of a webserver over the tiny demo."""
    base = tmp_path_factory.mktemp("ui")
    home = base / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    spec, _ = materialize_tiny_demo(base / "storage", instance=instance)
    keys = definitions_for([spec], base / "storage").resolve_asset_graph().get_all_asset_keys()
    shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
    (base / "defs.py").write_text("from tests.helpers import definitions_for, tiny_demo_spec\n"
                                  f"defs = definitions_for([tiny_demo_spec()], {str(base / 'storage')!r})\n")
    assert tiny_demo_spec() == spec  # the code location defines what was materialized
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ATTRIBUTION_PIPELINES", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-f", str(base / "defs.py"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_until_loaded(proc, port)
        yield f"http://127.0.0.1:{port}", spec, keys, shards, base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the webserver and the code server it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def page(webserver):
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"Playwright is not installed: {INSTALL}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first visit's newsletter prompt
    if skip.count():
        skip.first.click()


def _save(page, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("ATTRIBUTION_SCREENSHOTS"):
        target = Path(os.environ["ATTRIBUTION_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def test_asset_graph_and_catalog_list_every_asset(webserver, page):
    base, spec, keys, _, shots = webserver
    assert urllib.request.urlopen(f"{base}/server_info", timeout=10).status == 200
    _open(page, f"{base}/locations/defs.py/asset-groups/{spec.name}")
    page.get_by_text("attribution_db", exact=True).first.wait_for()
    labels = {line.strip() for line in page.inner_text("body").splitlines()}
    group = {k.path[-1] for k in keys if k.path[-1] not in ("fact_tracing", "lds", "lds_retrain")}
    assert all(_shown(name, labels) for name in group), sorted(n for n in group if not _shown(n, labels))
    assert _save(page, shots, "asset-graph").stat().st_size > 10_000
    _open(page, f"{base}/assets")
    page.get_by_text(f"{spec.name} / attribution_db", exact=True).first.wait_for()
    text = page.inner_text("body")
    missing = [k.to_user_string() for k in keys if k.to_user_string().replace("/", " / ") not in text]
    assert not missing, missing


def test_scores_page_shows_the_explanation_preview_and_a_picture(webserver, page):
    base, spec, _, _, shots = webserver
    _open(page, f"{base}/assets/{spec.name}/scores")
    row = page.locator("tr", has_text="explanations_path").first
    row.wait_for()
    assert "explanations.html" in row.inner_text()
    page.locator("tr", has=page.get_by_text("explanations", exact=True)).get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Sample explanations").wait_for()
    text = dialog.inner_text()
    assert text.count("Query demo-q-") == 3 and "rank" in text and "score" in text
    _save(page, shots, "scores-explanations")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    page.locator("tr", has_text="score_histogram").get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img").first
    image.wait_for()
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("img => img.complete && img.naturalWidth", image.element_handle()) == 400
    _save(page, shots, "scores-histogram")


def test_partitioned_asset_shows_its_shards(webserver, page):
    base, spec, _, shards, shots = webserver
    assert len(shards) >= 2
    _open(page, f"{base}/assets/{spec.name}/scores?view=partitions")
    page.get_by_text(f"Materialized ({len(shards)})").first.wait_for()
    text = page.inner_text("body")
    assert all(shard in text for shard in shards)
    _save(page, shots, "scores-partitions")
