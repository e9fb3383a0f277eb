"""The Dagster UI in a real browser: headless Chromium (Debian's package, driven by Playwright)
against `dagster-webserver` on the materialized tiny demo (loopback, a free port; one webserver
and one browser page for the whole module). Each test opens a page a user opens first and
asserts on what it renders: the asset graph and catalog, the scores and overview pages, a job's
runs, the checks, a shard's run, and a question asked from the Launchpad. Screenshots go to the
test's temporary directory, and also to ``$ATTRIBUTION_SCREENSHOTS`` when set (``make
screenshots`` refreshes ``docs/img`` so)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from attribution_assets.defs.runs import LOCATION
from attribution_assets.engine.io.paths import PipelinePaths
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


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """``(base url, spec, asset keys, shards, screenshot dir, instance)`` of a webserver over the
    tiny demo."""
    base = tmp_path_factory.mktemp("ui")
    home = base / "home"
    home.mkdir()
    # no daemon here: a run launched from the Launchpad starts at once (`make ui`'s daemon dequeues)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_coordinator:\n  module: "
                                       "dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n")
    instance = dg.DagsterInstance.from_config(str(home))
    spec, _ = materialize_tiny_demo(base / "storage", instance=instance)
    keys = definitions_for([spec], base / "storage").resolve_asset_graph().get_all_asset_keys()
    shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
    (base / "defs.py").write_text("from tests.helpers import definitions_for, tiny_demo_spec\n"
                                  f"defs = definitions_for([tiny_demo_spec()], {str(base / 'storage')!r})\n")
    # served under the code location name that runs made by the runner carry (workspace.yaml's)
    (base / "workspace.yaml").write_text(f"load_from:\n  - python_file:\n      relative_path: defs.py\n"
                                         f"      location_name: {LOCATION}\n")
    assert tiny_demo_spec() == spec  # the code location defines what was materialized
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ATTRIBUTION_PIPELINES", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-w", str(base / "workspace.yaml"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_until_loaded(proc, port)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", spec=spec, keys=keys, shards=shards, shots=base,
                              instance=instance)
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
        page.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")  # no newsletter prompt
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first visit's newsletter prompt
    if skip.count():
        skip.first.click()


#: The screenshots the README and docs/explain.md show (``make screenshots`` refreshes these).
PUBLISHED = {"asset-graph", "explain", "scores-explanations", "scores-heat-maps", "scores-histogram",
             "overview-summary", "overview-histogram", "overview-samples", "ask-top-k", "ask-heat-map"}


def _save(target, directory: Path, name: str) -> Path:
    """A screenshot of ``target`` (the page, or one element of it)."""
    path = directory / f"{name}.png"
    target.screenshot(path=str(path))
    if os.environ.get("ATTRIBUTION_SCREENSHOTS") and name in PUBLISHED:
        target = Path(os.environ["ATTRIBUTION_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def _markdown(page, name: str):
    """Where the metadata row ``name``'s Markdown shows: inline in its row on an asset's
    Overview tab, else in the dialog its [Show Markdown] opens."""
    row = page.locator("tr", has=page.get_by_text(name, exact=True)).first
    row.wait_for()
    button = row.get_by_text("[Show Markdown]")
    if not button.count():
        row.scroll_into_view_if_needed()
        return row
    button.first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    return dialog


def _close(page) -> None:
    if page.get_by_role("dialog").count():
        page.keyboard.press("Escape")
        page.get_by_role("dialog").wait_for(state="hidden")


def _image_width(page, image) -> int:
    image.wait_for()
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return page.evaluate("img => img.naturalWidth", image.element_handle())


def test_asset_graph_and_catalog_list_every_asset(webserver, page):
    base, spec, keys, shots = webserver.url, webserver.spec, webserver.keys, webserver.shots
    assert urllib.request.urlopen(f"{base}/server_info", timeout=10).status == 200
    _open(page, f"{base}/locations/{LOCATION}/asset-groups/{spec.name}")
    page.get_by_text("attribution_db", exact=True).first.wait_for()
    labels = {line.strip() for line in page.inner_text("body").splitlines()}
    group = {k.path[-1] for k in keys if k.path[-1] not in ("fact_tracing", "lds", "lds_retrain")}
    assert "overview" in group
    assert group <= labels, sorted(group - labels)  # whole names: none cut short with an ellipsis
    assert _save(page, shots, "asset-graph").stat().st_size > 10_000
    page.set_viewport_size({"width": 1400, "height": 2400})  # the catalog renders the rows in view
    _open(page, f"{base}/assets")
    page.get_by_text(f"{spec.name} / attribution_db", exact=True).first.wait_for()
    text = page.inner_text("body")
    page.set_viewport_size({"width": 1400, "height": 900})
    missing = [k.to_user_string() for k in keys if k.to_user_string().replace("/", " / ") not in text]
    assert not missing, missing


def test_scores_page_shows_the_explanations_and_a_picture(webserver, page):
    base, spec, shots = webserver.url, webserver.spec, webserver.shots
    _open(page, f"{base}/assets/{spec.name}/scores")
    page.locator("tr", has_text="explanations_path").first.wait_for()
    dialog = _markdown(page, "explanations")
    dialog.get_by_text("Sample explanations").wait_for()
    text = dialog.inner_text()
    assert text.count("Query demo-q-") == 3 and "top words" in text and "answer" in text
    assert text.count("gold document at rank") + text.count("no gold document among") == 3
    assert "endoftext" not in text
    _save(page, shots, "scores-explanations")
    _close(page)
    dialog = _markdown(page, "heat_maps")
    assert _image_width(page, dialog.locator("img").first) == 800
    _save(page, shots, "scores-heat-maps")
    _close(page)
    page.locator("tr", has_text="score_histogram").get_by_text("[Show Markdown]").click()
    assert _image_width(page, page.get_by_role("dialog").locator("img").first) == 800
    _save(page, shots, "scores-histogram")
    _close(page)
    page.goto(f"file://{PipelinePaths.under(shots / 'storage', spec.name).explanations}")  # the HTML page
    text = page.inner_text("body")
    assert text.count("first gold document at rank") + text.count("no gold document among") == 3
    assert "endoftext" not in text and page.locator(".word").count() > 20
    _save(page, shots, "explain")


def test_overview_shows_the_histogram_and_the_tables(webserver, page):
    base, spec, shots = webserver.url, webserver.spec, webserver.shots
    _open(page, f"{base}/assets/{spec.name}/overview")
    summary = _markdown(page, "summary")
    summary.get_by_text("recall@10").first.wait_for()
    text = summary.inner_text()
    assert "mrr" in text and "p99" in text and "median score of a gold document" in text
    _save(summary, shots, "overview-summary")
    _close(page)
    histogram = _markdown(page, "score_histogram")
    assert _image_width(page, histogram.locator("img").first) == 800
    _save(histogram, shots, "overview-histogram")
    _close(page)
    samples = _markdown(page, "samples")
    samples.get_by_text("Sample queries").wait_for()
    text = samples.inner_text()
    assert text.count("Query demo-q-") >= 3 and "first gold document at rank 1 " in text
    assert samples.locator("table").count() == text.count("Query demo-q-")
    _save(samples, shots, "overview-samples")
    _close(page)


def test_partitioned_asset_shows_its_shards(webserver, page):
    base, spec, shards, shots = webserver.url, webserver.spec, webserver.shards, webserver.shots
    assert len(shards) >= 2
    _open(page, f"{base}/assets/{spec.name}/scores?view=partitions")
    page.get_by_text(f"Materialized ({len(shards)})").first.wait_for()
    text = page.inner_text("body")
    assert all(shard in text for shard in shards)
    _save(page, shots, "scores-partitions")


def test_a_job_page_lists_its_runs(webserver, page):
    base, spec, instance = webserver.url, webserver.spec, webserver.instance
    job = f"{spec.name}_scores"
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job))
    assert runs
    _open(page, f"{base}/locations/{LOCATION}/jobs/{job}/runs")
    page.get_by_text(runs[0].run_id[:8]).first.wait_for()
    text = page.inner_text("body")
    assert all(run.run_id[:8] in text for run in runs)
    _save(page, webserver.shots, "job-runs")


def test_train_gradients_checks_show_succeeded(webserver, page):
    base, spec = webserver.url, webserver.spec
    _open(page, f"{base}/assets/{spec.name}/train_gradients?view=checks")
    page.get_by_text("Succeeded").first.wait_for()
    assert "Not evaluated" not in page.inner_text("body")
    _save(page, webserver.shots, "train-gradients-checks")


def test_a_shard_page_shows_its_run(webserver, page):
    base, spec, shard = webserver.url, webserver.spec, webserver.shards[-1]
    (record,) = webserver.instance.fetch_materializations(dg.AssetRecordsFilter(
        dg.AssetKey([spec.name, "scores"]), asset_partitions=[shard]), limit=1).records
    _open(page, f"{base}/assets/{spec.name}/scores?view=partitions&partition={shard}")
    page.get_by_text(record.run_id[:8]).first.wait_for()
    _save(page, webserver.shots, "shard-run")


def test_a_question_from_the_launchpad_shows_its_top_k(webserver, page):
    base, spec, instance = webserver.url, webserver.spec, webserver.instance
    query_id = _a_query_with_gold(webserver)
    config = (f"ops:\n  {spec.name}__question:\n    config:\n      query_id: {query_id}\n      k: 5\n")
    _open(page, f"{base}/locations/{LOCATION}/jobs/{spec.name}_ask/playground")
    editor = page.locator(".CodeMirror").first
    editor.wait_for()
    page.evaluate("([el, text]) => el.CodeMirror.setValue(text)", [editor.element_handle(), config])
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0]
    deadline = time.monotonic() + 120
    while not (run := instance.get_run_by_id(run_id)).is_finished and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    _open(page, f"{base}/runs/{run_id}")
    dialog = _markdown(page, "top_k")
    dialog.get_by_text(query_id).first.wait_for()
    text = dialog.inner_text()
    assert "rank" in text and "first gold document at rank" in text
    assert dialog.locator("tbody tr").count() == 5
    _save(page, webserver.shots, "ask-top-k")
    _close(page)
    dialog = _markdown(page, "heat_map")
    assert _image_width(page, dialog.locator("img").first) == 800
    _save(page, webserver.shots, "ask-heat-map")
    _close(page)


def _a_query_with_gold(webserver) -> str:
    from attribution_assets.engine.io.corpus import read_queries

    paths = PipelinePaths.under(webserver.shots / "storage", webserver.spec.name)
    return next(q["doc_id"] for q in read_queries(paths.queries) if q["gold_doc_ids"])
