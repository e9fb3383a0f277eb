"""Evaluation as assets: fact tracing vs baselines and a small LDS run, through Dagster."""

import dataclasses
import json

import dagster as dg
import polars as pl
import pytest

from attribution_assets import cli
from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.instance import persistent_instance
from attribution_assets.defs.planning import Stage, unsynced_partitions
from attribution_assets.defs.runner import materialize_partitions, materialize_pipeline
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import EvaluationSpec, ScoringSpec, demo_spec
from tests.helpers import TINY_DEMO, definitions_for, local_profile

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)


def test_fact_tracing_and_lds_assets(tmp_path, monkeypatch, capsys):
    spec = demo_spec(**TINY_DEMO, scoring=ScoringSpec(top_k=0),
                     evaluation=EvaluationSpec(lds_subsets=2, lds_seed_b_varies="data_order"))
    defs = definitions_for([spec], tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    stages = [Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries"), False),
              Stage("shards", ("tokenized_shards",), True)]
    materialize_pipeline(defs, spec, instance, stages=stages, log=lambda _: None, log_level="WARNING")
    run = dict(instance=instance, resources=defs.resources, raise_on_error=True)
    dg.materialize(defs.assets, selection=[dg.AssetKey(["demo", "fact_tracing"])], **run)
    table = pl.read_parquet(tmp_path / "demo" / "evaluation" / "fact_tracing.parquet")
    assert {"bm25", "dot", "cosine", "trackstar (adafactor)", "ekfac", "kfac"} <= set(table["method"])
    assert table.filter(pl.col("configured"))["method"].unique().to_list() == ["trackstar (adafactor)"]
    assert table.filter(pl.col("method") == "bm25")["recall@50"][0] > 0
    partitions = [f"subset-{k:03d}-seed-{s}" for k in range(2) for s in (0, 1)]
    for partition in partitions:
        dg.materialize(defs.assets, selection=[dg.AssetKey(["demo", "lds_retrain"])], partition_key=partition, **run)
    recorded = {p: json.loads((tmp_path / "demo" / "lds_retrain" / p / "query_losses.json").read_text())
                for p in partitions}
    seed = spec.demo.seed  # seed b keeps the init and changes the data order only
    assert {p: (r["seed"], r["order_seed"]) for p, r in recorded.items()} == {
        p: (seed, seed + p.endswith("seed-1")) for p in partitions}
    retrain_key = dg.AssetKey(["demo", "lds_retrain"])
    assert unsynced_partitions(defs, instance, retrain_key, partitions) == []
    # other subsets: every retrain is stale (what `attribution evaluate --lds` reruns), and
    # the lds asset refuses the old retrains instead of scoring them against the new masks
    other = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, lds_fraction=0.5))
    other_defs = definitions_for([other], tmp_path)
    assert unsynced_partitions(other_defs, instance, retrain_key, partitions) == partitions
    with pytest.raises(Exception, match="retrained on another subset"):
        dg.materialize(other_defs.assets, selection=[dg.AssetKey(["demo", "lds"])], instance=instance,
                       resources=other_defs.resources, raise_on_error=True)
    dg.materialize(defs.assets, selection=[dg.AssetKey(["demo", "lds"])], **run)
    lds = pl.read_parquet(tmp_path / "demo" / "evaluation" / "lds.parquet")
    noise = {"seed agreement (seed a vs b)", "noise ceiling (sqrt of agreement)",
             "noise ceiling, mean of seeds (Spearman-Brown)"}
    assert set(table["method"]) | noise | {"gold documents (reference)"} == set(lds["method"])
    methods = lds.filter(~pl.col("method").is_in(list(noise) + ["gold documents (reference)"]))
    assert set(methods["scores"]) == {"all", "top 100", "top 10"}
    assert set(methods["target"]) == {"seed a", "seed b", "mean of seeds"}
    assert lds.filter(pl.col("method") == "dot")["ratio"].to_list() == [1.0] * 9
    assert (lds["subsets"] == 2).all() and lds["lds"].is_between(-1, 1).all()
    metadata = instance.get_latest_materialization_event(dg.AssetKey(["demo", "lds"])).asset_materialization.metadata
    assert (metadata["fraction"].value, metadata["seed_b_varies"].value) == (0.25, "data_order")


def test_lds_retrains_run_through_the_queue_one_run_per_partition(tmp_path):
    """What `attribution evaluate --lds` does under a `multiprocess` profile: each retrain is its
    own queued run in a process of its own, two at once, with the query losses of retrains in this
    process."""
    spec = demo_spec(people=3, shard_size=20, epochs=2, hidden=32, scoring=ScoringSpec(top_k=0),
                     evaluation=EvaluationSpec(lds_subsets=2))  # smaller than TINY_DEMO: only runs are checked
    prepare = [Stage("prepare", ("corpus", "query_set", "tokenizer", "tokenized_queries"), False)]
    partitions = ["subset-000-seed-0", "subset-001-seed-1"]
    retrain_key = dg.AssetKey(["demo", "lds_retrain"])
    losses, lines = {}, {}
    for name, executor in (("here", "in_process"), ("workers", "multiprocess")):
        profile = dataclasses.replace(local_profile(tmp_path / name, threads=1), executor=executor, max_concurrent=2)
        defs = build_definitions([spec], profile)
        instance = persistent_instance(tmp_path / f"{name}-home", profile)
        materialize_pipeline(defs, spec, instance, stages=prepare, log=lambda _: None, log_level="WARNING")
        lines[name] = []
        materialize_partitions(defs, spec, instance, "lds_retrain", partitions, log=lines[name].append,
                               log_level="WARNING")
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"attribution/stage": "evaluation"}))
        assert sorted(r.tags["dagster/partition"] for r in runs) == partitions
        assert {r.job_name for r in runs} == {"demo_lds_retrain"}
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        if name == "workers":  # queued runs carry the code location's origin: the UI links them to the job
            assert {r.remote_job_origin.location_name for r in runs} == {"attribution_assets"}
        assert unsynced_partitions(defs, instance, retrain_key, partitions) == []
        losses[name] = {p: json.loads((tmp_path / name / "demo" / "lds_retrain" / p / "query_losses.json").read_text())
                        for p in partitions}
        if name == "here":  # a broken input: the first failure stops the rest (queued, every run ends
            # and the error names each failed one: tests/defs/test_scale_out.py)
            queries = PipelinePaths.under(tmp_path / name, "demo").query_tokens
            saved = queries.read_bytes()
            queries.write_bytes(b"not parquet")
            try:
                with pytest.raises(Exception) as failure:
                    materialize_partitions(defs, spec, instance, "lds_retrain", partitions, log=lambda _: None,
                                           log_level="CRITICAL")
            finally:
                queries.write_bytes(saved)
            assert failure.value.failed_in == f"demo/lds_retrain [{partitions[0]}]"
    assert lines["here"] == [f"{n}/2 materializing demo/lds_retrain [{p}]" for n, p in zip((1, 2), partitions)]
    assert lines["workers"][1] == "demo/lds_retrain: 2 runs queued, 2 at once"
    ended = [line.split(" (run ")[0].split(" ", 1) for line in lines["workers"][2:]]
    assert [count for count, _ in ended] == ["1/2", "2/2"]
    assert sorted(what for _, what in ended) == [f"done: demo/lds_retrain [{p}]" for p in partitions]
    for p in partitions:
        assert losses["here"][p]["query_ids"] == losses["workers"][p]["query_ids"]
        assert losses["here"][p]["losses"] == pytest.approx(losses["workers"][p]["losses"], abs=1e-6)
    with pytest.raises(ValueError, match="not an on-demand partitioned asset"):
        materialize_partitions(defs, spec, instance, "scores", ["shard-00000"])
    with pytest.raises(ValueError, match="has no asset 'magic_scores'"):
        materialize_partitions(defs, spec, instance, "magic_scores", ["batch-0000"])


def test_cli_diagnose_prints_settings(tiny_model_dir, capsys):
    assert cli.main(["diagnose", "--model", str(tiny_model_dir)]) == 0
    assert "Use: " in capsys.readouterr().out
