"""MAGIC as assets: the training run's checkpoints, score tables per query batch, the DuckDB
views and the `magic` method of the fact-tracing evaluation."""

import json

import dagster as dg
import numpy as np
import polars as pl
import pytest

from attribution_assets.defs.planning import Stage, unsynced_partitions
from attribution_assets.defs.runner import materialize_partitions, materialize_pipeline
from attribution_assets.engine.evaluation import fact_tracing
from attribution_assets.engine.evaluation.methods import (
    DOT,
    MAGIC,
    available_methods,
    default_methods,
)
from attribution_assets.engine.io import data
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.magic import pipeline as magic_pipeline
from attribution_assets.engine.magic.metagradients import metagradient, sequence_loss
from attribution_assets.engine.scoring import database
from attribution_assets.engine.scoring.tables import SCORE_COLUMNS, write_scores
from attribution_assets.spec import (
    MagicSpec,
    PipelineSpecError,
    ScoringSpec,
    demo_spec,
    spec_from_dict,
)
from tests.helpers import definitions_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_magic_assets(tmp_path):
    spec = demo_spec(people=3, shard_size=20, epochs=2, hidden=32, scoring=ScoringSpec(top_k=0),
                     magic=MagicSpec(enabled=True, epochs=1, batch_size=16, warmup_steps=1,
                                     checkpoint_every=2, query_batch_size=8))
    defs = definitions_for([spec], tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    stages = [Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries"), False),
              Stage("shards", ("tokenized_shards",), True)]
    materialize_pipeline(defs, spec, instance, stages=stages, log=lambda _: None, log_level="WARNING")
    run = dict(instance=instance, resources=defs.resources, raise_on_error=True)
    dg.materialize(defs.assets, selection=[dg.AssetKey(["demo", "magic_training"])], **run)
    paths = PipelinePaths.under(tmp_path, "demo")
    record = json.loads(paths.magic_run.read_text())
    shards = sorted(instance.get_dynamic_partitions("demo_shards"))
    docs = [d for s in shards for d in data.read_tokenized(paths.tokens(s))]
    assert record["documents"] == len(docs) and record["steps"] == -(-len(docs) // 16)
    assert all(paths.magic_checkpoint(step).is_file() for step in record["checkpoints"])
    queries = data.read_tokenized(paths.query_tokens)
    batches = sorted(instance.get_dynamic_partitions("demo_magic_query_batches"))
    assert batches == sorted(magic_pipeline.query_batches([q.doc_id for q in queries], 8))
    scores_key = dg.AssetKey(["demo", "magic_scores"])
    assert unsynced_partitions(defs, instance, scores_key, batches) == batches  # what `evaluate` runs
    materialize_partitions(defs, spec, instance, "magic_scores", batches, log=lambda _: None, log_level="WARNING")
    assert unsynced_partitions(defs, instance, scores_key, batches) == []
    table = pl.read_parquet(paths.magic_scores(batches[0]))
    first_batch = magic_pipeline.query_batches([q.doc_id for q in queries], 8)[batches[0]]
    assert table.columns == SCORE_COLUMNS and table.height == len(first_batch) * len(docs)
    shard_of = {d.doc_id: s for s in shards for d in data.read_tokenized(paths.tokens(s))}
    assert all(shard_of[d] == s for d, s in zip(table["doc_id"], table["shard"]))
    # the table holds -metagradient of the first query, computed here through the engine
    from transformers import AutoModelForCausalLM

    model = magic_pipeline.initial_model(spec, AutoModelForCausalLM.from_pretrained(paths.model))
    engine_run = magic_pipeline.pipeline_run(spec, paths, model, docs, 1)
    grad, _ = metagradient(engine_run, sequence_loss(engine_run, [(queries[0].input_ids, queries[0].loss_mask)]))
    first = table.filter(pl.col("query_id") == queries[0].doc_id)
    expected = dict(zip([d.doc_id for d in docs], (-grad).tolist()))
    # float32 through every training step and back: BLAS kernels may take other code paths from one
    # process to the next (thread split, buffer alignment), and the replayed steps amplify rounding
    # to a few 1e-4 of a score; a wrong metagradient is off by its own size
    wanted = np.array([expected[d] for d in first["doc_id"]])
    np.testing.assert_allclose(first["score"].to_numpy(), wanted, rtol=1e-3, atol=1e-4 * np.abs(wanted).max())
    matrix = magic_pipeline.read_scores(paths, [q.doc_id for q in queries], [d.doc_id for d in docs])
    assert matrix.shape == (len(queries), len(docs)) and np.abs(matrix).sum(axis=1).min() > 0
    # DuckDB views (next to a stand-in for the pipeline's own score table, which the views need)
    write_scores(paths.scores(shards[0]), np.zeros((1, 1)), ["q"], [docs[0].doc_id], shards[0])
    database.build_database(paths)
    with database.connect(paths.database) as con:
        count = con.execute("SELECT count(*) FROM magic_scores").fetchone()[0]
        top = con.execute("SELECT rank, doc_id, score FROM magic_top_influences WHERE query_id = ? "
                          "ORDER BY rank LIMIT 1", [queries[0].doc_id]).fetchone()
    assert count == len(queries) * len(docs)
    assert top[1] == max(expected, key=expected.get)
    # fact tracing evaluates the `magic` method from the tables (the engine function of the asset)
    gold = dict(zip(*pl.read_parquet(paths.queries).select("doc_id", "gold_doc_ids").to_dict().values()))
    methods = [DOT, MAGIC]
    assert default_methods(spec)[-1] == MAGIC
    result = fact_tracing.fact_tracing_table(model.float(), spec, paths, docs, queries, gold, methods)
    assert result.frame.filter(pl.col("method") == "magic")["query_loss"].to_list() == ["completion"]
    assert np.allclose(result.scores["completion"]["magic"], matrix)
    usable, skipped = available_methods(spec, None, methods)
    assert usable == [DOT] and "magic_scores" in skipped["magic"]


def test_magic_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="`optimizer`"):
        MagicSpec(optimizer="adam")
    with pytest.raises(ValueError, match="`beta2` must be below 1"):
        MagicSpec(beta2=1.0)
    with pytest.raises(ValueError, match="`checkpoint_every`"):
        MagicSpec(checkpoint_every=0)
    resolved = MagicSpec(lr=0.1).resolved(demo_spec(epochs=3).demo)
    assert (resolved.lr, resolved.epochs, resolved.batch_size) == (0.1, 3, 32)
    raw = {"name": "ops", "model": {"name_or_path": "gpt2"}, "corpus": {"path": "x.jsonl"},
           "magic": {"enabled": True, "optimzer": "sgd"}}
    with pytest.raises(PipelineSpecError, match="did you mean `optimizer`"):
        spec_from_dict(raw, "pipelines.yaml", tmp_path)
    raw["magic"] = {"enabled": True, "optimizer": "sgd"}
    with pytest.raises(PipelineSpecError, match="needs a `queries` section"):
        spec_from_dict(raw, "pipelines.yaml", tmp_path)
