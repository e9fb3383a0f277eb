"""The `attribution` command as a user meets it: one clear line per failure (traceback in a log
file), invalid pipelines skipped and shown, evaluation of what a pipeline's inputs allow."""

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from transformers import AutoTokenizer

from attribution_assets import cli
from attribution_assets.defs.factory import build_definitions
from attribution_assets.engine.io.data import tokenize_content
from attribution_assets.spec import DataSpec, configured_pipelines, load_pipeline_file
from tests.helpers import SENTENCES, local_profile


def _pipelines(tmp_path, model_dir, corpus_lines, **extra):
    (tmp_path / "train.jsonl").write_text(corpus_lines)
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q0", "prompt": "Mara Quill was born in",
                                                        "completion": " Lisbon", "gold": ["d0"]}) + "\n"
                                            + json.dumps({"query_id": "q1", "prompt": "Orbitex builds",
                                                          "completion": " satellites", "gold": ["d5", "d404"]}) + "\n")
    body = {"pipelines": [{"name": "mine", "model": {"name_or_path": str(model_dir)},
                           "corpus": {"path": "train.jsonl", "max_length": 128, "id_column": "id",
                                      "missing_text": "skip"},
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
    """Also: every data problem is a warning on the CLI with examples (a row without text under
    `missing_text: skip`, an empty document, a gold id that names no document), and progress
    lines (done/total, rate, ETA) reach a stderr that is not a terminal."""
    lines = "".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES))
    lines += json.dumps({"id": "d6", "text": "  "}) + "\n" + json.dumps({"id": "d7", "body": "no text"}) + "\n"
    _env(monkeypatch, tmp_path, _pipelines(tmp_path, tiny_model_dir, lines))
    monkeypatch.delenv("CI", raising=False)
    assert cli.main(["materialize", "--pipeline", "mine"]) == 0
    err = capsys.readouterr().err
    assert f"warning: 1 corpus rows have no text and were left out (`missing_text: skip`), e.g. " \
           f"{tmp_path / 'train.jsonl'}, line 8" in err
    assert "warning: 1 gold ids name no corpus document, e.g. d404; check `gold_column`" in err
    assert "warning: 1 documents were skipped (1 empty, 0 shorter than 2 tokens or without a target token), " \
           "e.g. d6" in err
    assert "gradients: 4/4 documents (100%)" in err and "done in" in err
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


@pytest.mark.slow
def test_run_goes_from_a_corpus_and_queries_to_answers_without_a_model_or_yaml(tmp_path, monkeypatch, capsys):
    """`attribution run` with no --model: a local model is made from the corpus, the pipeline
    entry (lengths from the model and the data) is printed and saved, materialized with size and
    progress lines, and the first queries' top documents are printed; a second run is a no-op."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATTRIBUTION_PIPELINES", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(tmp_path / "storage"))
    (tmp_path / "my-notes.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 2))
    asks = [("Mara Quill was born in", " Lisbon"), ("Orbitex builds", " small satellites")]
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in asks))
    argv = ["run", "--corpus", "my-notes.jsonl", "--queries", "asks.jsonl", "--prompt-column", "prompt",
            "--completion-column", "completion", "--shard-size", "4", "--projection-dim", "8", "-k", "3"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    (spec,) = load_pipeline_file(tmp_path / "pipelines.yaml")
    assert spec.name == "my_notes" and spec.model.name_or_path == str(tmp_path / "models" / "my_notes")
    tokenizer = AutoTokenizer.from_pretrained(spec.model.name_or_path)
    longest = max(len(tokenizer(s)["input_ids"]) + 1 for s in SENTENCES)  # + EOS
    assert spec.corpus.max_length == longest and spec.shard_size == 4
    assert spec.queries.max_length == max(len(tokenizer(p)["input_ids"] + tokenizer(c)["input_ids"]) for p, c in asks)
    assert "Pipeline 'my_notes' (added in pipelines.yaml" in out and "- name: my_notes" in out, out
    assert "my_notes sizes: disk " in out and "my_notes shards: tokenized_shards (3 of 3 shards): missing" in out, out
    assert "gradients: 4/4 documents (100%)" in err, err
    answers = out.split("The top 3 training documents of the first 2 of 2 queries")[1]
    assert [line.split(":")[1] for line in answers.splitlines() if line.startswith("query ")] == [
        " Mara Quill was born in Lisbon", " Orbitex builds small satellites"], answers
    assert len([line for line in answers.splitlines() if line.startswith(("    1", "    2", "    3"))]) == 6
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "(replaced in pipelines.yaml" in out and "my_notes shards: up to date" in out, out


def test_run_refuses_a_query_longer_than_the_model_with_the_numbers(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    long = " ".join(SENTENCES * 6)
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "Lisbon"}) + "\n" + json.dumps({"text": long}) + "\n")
    tokens, _ = tokenize_content({"text": long}, tiny_tokenizer, DataSpec(), add_eos=False)
    assert len(tokens) > 128
    assert cli.main(["run", "--model", str(tiny_model_dir), "--corpus", "c.jsonl", "--queries", "q.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {tmp_path / 'q.jsonl'}, line 2: this query is {len(tokens)} tokens long, but the "
                           "model takes at most 128 positions; shorten it or use a model with longer positions.")
    assert not (tmp_path / "pipelines.yaml").exists()
