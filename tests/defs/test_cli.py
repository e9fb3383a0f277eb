"""The `attribution` command as a user meets it: one clear line per failure (traceback in a log
file), invalid pipelines skipped and shown, evaluation of what a pipeline's inputs allow."""

import json
from pathlib import Path

import dagster as dg
import yaml

from attribution_assets import cli
from attribution_assets.defs.factory import build_definitions
from attribution_assets.spec import configured_pipelines
from tests.helpers import SENTENCES, local_profile


def _pipelines(tmp_path, model_dir, corpus_lines, **extra):
    (tmp_path / "train.jsonl").write_text(corpus_lines)
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q0", "prompt": "Mara Quill was born in",
                                                        "completion": " Lisbon", "gold": ["d0"]}) + "\n")
    body = {"pipelines": [{"name": "mine", "model": {"name_or_path": str(model_dir)},
                           "corpus": {"path": "train.jsonl", "max_length": 128, "id_column": "id"},
                           "queries": {"path": "queries.jsonl", "max_length": 128, "prompt_column": "prompt",
                                       "completion_column": "completion", "id_column": "query_id",
                                       "gold_column": "gold"},
                           "shard_size": 4, "gradients": {"projection_dim": 4}, **extra},
                          {"name": "broken", "model": {"name_or_path": str(model_dir)},
                           "corpus": {"path": "train.jsonl", "max_lenght": 64}}]}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(body))
    return tmp_path / "pipelines.yaml"


def _env(monkeypatch, tmp_path, pipelines):
    monkeypatch.setenv("ATTRIBUTION_PIPELINES", str(pipelines))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(tmp_path / "storage"))


def test_a_runtime_failure_prints_one_message_and_logs_the_traceback(tmp_path, tiny_model_dir, monkeypatch,
                                                                     capsys):
    lines = "".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES))
    _env(monkeypatch, tmp_path, _pipelines(tmp_path, tiny_model_dir, lines + '{"id": "x", "text": \n'))
    assert cli.main(["materialize", "--pipeline", "mine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: skipped an invalid pipeline:") and "did you mean `max_length`" in err[0]
    assert err[1].startswith("error in mine/corpus: ") and "train.jsonl, line 7" in err[1]
    assert err[2].startswith("(full traceback: ") and len(err) == 3, err
    log = err[2].split("full traceback: ", 1)[1].split(";")[0]
    assert "Traceback" in Path(log).read_text()


def test_evaluate_runs_the_methods_the_pipeline_allows_and_names_the_skipped(tmp_path, tiny_model_dir,
                                                                            monkeypatch, capsys):
    lines = "".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES))
    _env(monkeypatch, tmp_path, _pipelines(tmp_path, tiny_model_dir, lines))
    assert cli.main(["materialize", "--pipeline", "mine"]) == 0
    assert cli.main(["evaluate", "--pipeline", "mine"]) == 0
    out = capsys.readouterr().out
    assert "| trackstar (none) |" in out and "| dot |" in out and "| random |" in out
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert header.endswith("| mrr | queries | tail_patch |"), header
    assert "Skipped `trackstar (adafactor)`: the 'adafactor' normalizer needs optimizer state" in out
    assert "Skipped `trackstar (adam)`" in out


def test_invalid_pipelines_appear_in_the_ui_next_to_the_valid_ones(tmp_path, tiny_model_dir, monkeypatch):
    lines = "".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES))
    monkeypatch.setenv("ATTRIBUTION_PIPELINES", str(_pipelines(tmp_path, tiny_model_dir, lines)))
    errors = []
    specs = configured_pipelines(errors)
    defs = build_definitions(specs, local_profile(tmp_path), spec_errors=errors)
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    assert dg.AssetKey(["mine", "scores"]) in keys and dg.AssetKey(["demo", "scores"]) in keys
    placeholder = defs.resolve_assets_def(dg.AssetKey(["invalid_pipelines", "entry_0"]))
    assert "max_lenght" in placeholder.specs_by_key[dg.AssetKey(["invalid_pipelines", "entry_0"])].description
    assert {job.name for job in defs.resolve_all_job_defs()} >= {"mine_prepare", "mine_shards", "mine_scores"}
