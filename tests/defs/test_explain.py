"""`attribution explain` and what the Dagster layer attaches: the sample explanations on `scores`
(HTML file + Markdown preview), a score histogram per shard, the preconditioner's spectrum."""

import json

import dagster as dg

from attribution_assets import cli
from attribution_assets.defs.scores import SAMPLE_K
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.report import latest_metadata
from tests.defs.test_cli import _env, _pipelines
from tests.helpers import SENTENCES


def test_explain_prints_marked_tokens_and_writes_html(tmp_path, tiny_model_dir, monkeypatch, capsys):
    lines = "".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES))
    _env(monkeypatch, tmp_path, _pipelines(tmp_path, tiny_model_dir, lines))
    assert cli.main(["materialize", "--pipeline", "mine"]) == 0
    capsys.readouterr()
    out_html = tmp_path / "out.html"
    assert cli.main(["explain", "--pipeline", "mine", "--query", "q0", "-k", "3", "--html", str(out_html)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("query q0: Mara Quill was born in Lisbon")
    assert out.count("\n#") == 3 and "[[" in out and "\x1b[" not in out  # not a terminal: plain markers
    assert ("GOLD" in out) == ("d0" in out.split("#1 ")[1].splitlines()[0])
    page = out_html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('class="doc') == 3
    assert cli.main(["explain", "--pipeline", "mine", "--query", "nope"]) == 2
    assert "Query 'nope' is not one of the pipeline's 2 queries" in capsys.readouterr().err

    paths = PipelinePaths.under(tmp_path / "storage", "mine")
    instance = dg.DagsterInstance.get()  # the CLI's persistent instance under $DAGSTER_HOME
    spec_key = dg.AssetKey(["mine", "scores"])
    meta = latest_metadata(instance, spec_key)
    assert "Query `q0`" in meta["explanations"] and str(paths.explanations) in meta["explanations"]
    assert "data:image/png;base64," in meta["score_histogram"]
    assert paths.explanations.read_text().count('class="doc') == 2 * SAMPLE_K  # each of the 2 queries' top documents
    assert paths.score_histogram("shard-00000").read_bytes().startswith(b"\x89PNG")
    spectrum = latest_metadata(instance, dg.AssetKey(["mine", "preconditioner"]))["spectrum"]
    assert "data:image/png;base64," in spectrum and paths.figure("preconditioner_spectrum").exists()
