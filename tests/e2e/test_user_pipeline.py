"""A user pipeline from YAML over local files and a locally saved tiny model materializes."""

import json

import dagster as dg
import polars as pl
import pytest
import yaml

from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.io.models import ModelLoadError
from attribution_assets.spec import load_pipeline_file
from tests.helpers import SENTENCES, definitions_for, save_tiny_model, train_tiny_tokenizer


def _pipeline(tmp_path, model_dir, gradients=None, **overrides):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "prompt": p, "completion": c,
                                           "gold": [g]}) + "\n"
                               for i, (p, c, g) in enumerate([("Mara Quill was born in", " Lisbon", "x")])))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    body = {"pipelines": [{
        "name": "mine", "model": {"name_or_path": str(model_dir), **overrides},
        "corpus": {"path": "train.jsonl", "max_length": 128}, "shard_size": 4,
        "queries": {"path": "queries.jsonl", "max_length": 128, "prompt_column": "prompt", "completion_column": "completion",
                    "id_column": "query_id", "gold_column": "gold"},
        **({"gradients": gradients} if gradients else {})}]}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(body))
    (spec,) = load_pipeline_file(path)
    storage = tmp_path / "storage"
    return spec, definitions_for([spec], storage), storage


def test_user_pipeline_materializes(tmp_path, tiny_model_dir):
    spec, defs, storage = _pipeline(tmp_path, tiny_model_dir)
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, log=lambda _: None)
    assert instance.get_dynamic_partitions("mine_shards") == ["shard-00000", "shard-00001"]
    tokens = [pl.read_parquet(storage / "mine" / "tokenized_shards" / s / "tokens.parquet")
              for s in ("shard-00000", "shard-00001")]
    assert sum(len(t) for t in tokens) == len(SENTENCES)
    queries = pl.read_parquet(storage / "mine" / "tokenized_queries" / "tokens.parquet")
    assert queries["doc_id"].to_list() == ["q0"] and sum(queries["loss_mask"][0]) >= 1
    model_event = instance.get_latest_materialization_event(dg.AssetKey(["mine", "model"]))
    assert len(model_event.asset_materialization.metadata["fingerprint"].value) == 16
    assert not list(storage.rglob(".*tmp-*")), "no temporary files left behind"
    query_set = instance.get_latest_materialization_event(dg.AssetKey(["mine", "query_set"])).asset_materialization
    assert query_set.metadata["unknown_gold_ids"].value == 1  # gold "x" names no corpus document
    assert query_set.metadata["unknown_gold_examples"].value == "x"
    corpus = instance.get_latest_materialization_event(dg.AssetKey(["mine", "corpus"])).asset_materialization
    assert corpus.metadata["duplicate_documents"].value == 0


def test_repeated_documents_are_counted(tmp_path, tiny_model_dir):
    spec, defs, _ = _pipeline(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES + SENTENCES[:2]))
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(defs.assets, selection=[dg.AssetKey(["mine", "corpus"])], resources=defs.resources,
                   instance=instance)
    corpus = instance.get_latest_materialization_event(dg.AssetKey(["mine", "corpus"])).asset_materialization
    assert corpus.metadata["duplicate_documents"].value == 2


def test_bfloat16_model_with_positional_token_rows_materializes(tmp_path, tiny_model_dir):
    """A bfloat16 model and one-pass per-token rows, end to end: every check passes, token
    score tables exist, and each step records its peak memory."""
    spec, defs, storage = _pipeline(tmp_path, tiny_model_dir, gradients={"projection_dim": 4,
                                                                         "per_token": "positional"},
                                    dtype="bfloat16")
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, log=lambda _: None)
    records = instance.get_event_records(dg.EventRecordsFilter(dg.DagsterEventType.ASSET_CHECK_EVALUATION))
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    failed = [(e.asset_key.path[-1], e.check_name) for e in evaluations if not e.passed]
    assert len(evaluations) >= 6 and not failed, failed
    tokens = pl.read_parquet(storage / "mine" / "scores" / "shard-00000" / "token_scores.parquet")
    assert tokens.columns == ["query_id", "doc_id", "shard", "token", "score"] and tokens["token"].min() == 0
    for name in ("query_gradients", "autocorrelation", "preconditioner", "faiss_index", "scores"):
        event = instance.get_latest_materialization_event(dg.AssetKey(["mine", name]))
        assert event.asset_materialization.metadata["peak_rss_mb"].value > 0, name


def test_missing_model_path_fails_clearly_and_writes_nothing(tmp_path):
    spec, defs, storage = _pipeline(tmp_path, tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        dg.materialize(defs.assets, selection=[dg.AssetKey(["mine", "model"])],
                       resources=defs.resources, instance=dg.DagsterInstance.ephemeral())
    assert not (storage / "mine" / "model").exists()


def test_tokenizer_without_pad_token(tmp_path):
    tokenizer = train_tiny_tokenizer(SENTENCES, pad=False)
    model_dir = tmp_path / "nopad"
    save_tiny_model(model_dir, tokenizer)
    spec, defs, _ = _pipeline(tmp_path, model_dir)
    with pytest.raises(ModelLoadError, match="pad_token: eos"):
        materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None)
    spec, defs, _ = _pipeline(tmp_path, model_dir, pad_token="eos")
    materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None)
