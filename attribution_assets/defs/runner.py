"""Materialize a pipeline's assets in order (used by the CLI and tests): one run per stage;
a partitioned stage is one run over every shard (a single-run backfill: the model loads once)."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg

from attribution_assets.defs.common import key, shards_partitions
from attribution_assets.spec import PipelineSpec

#: Telemetry off; two runs and two steps of any pool (``gpu`` included) at once. With one GPU,
#: lower the gpu pool: ``dagster instance concurrency set gpu 1``.
DAGSTER_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 2
  runs:
    max_concurrent_runs: 2
"""

#: Stages in dependency order: (asset names, partitioned by shard?)
STAGES: list[tuple[tuple[str, ...], bool]] = [
    (("corpus", "query_set", "tokenizer", "model", "tokenized_queries", "query_gradients"), False),
    (("tokenized_shards", "train_gradients", "kfac_covariance"), True),
    (("kfac_factors", "kfac_eigendecomposition"), False),
    (("ekfac_correction",), True),
    (("ekfac_eigenvalues",), False),
    (("kfac_query_gradients", "train_autocorrelation", "preconditioner", "faiss_index"), False),
    (("scores",), True),
    (("attribution_db",), False),
]


def persistent_instance(home: str | os.PathLike | None = None) -> dg.DagsterInstance:
    """The instance under ``$DAGSTER_HOME`` (default ``./.dagster_home``), telemetry off."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def materialize_pipeline(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance,
                         stages: Sequence[tuple[tuple[str, ...], bool]] = STAGES,
                         log: Callable[[str], None] = print, log_level: str = "INFO") -> list:
    """Run each stage's assets that exist in ``defs``; raise if a run fails.

    ``log_level`` filters Dagster's console logger (``DEBUG`` shows every event).
    """
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    graph = defs.resolve_asset_graph()
    present = graph.get_all_asset_keys()
    results = []
    for names, partitioned in stages:
        keys = [key(spec, n) for n in names if key(spec, n) in present]
        if not keys:
            continue
        tags = {}
        label = ", ".join(k.path[-1] for k in keys)
        if partitioned:
            shards = instance.get_dynamic_partitions(shards_partitions(spec).name)
            if not shards:
                raise ValueError(f"Pipeline {spec.name!r} has no shard partitions; materialize its corpus first.")
            tags = {"dagster/asset_partition_range_start": shards[0],
                    "dagster/asset_partition_range_end": shards[-1]}
            label += f" [{shards[0]} .. {shards[-1]}, one run]"
        log(f"materializing {spec.name}: {label}")
        results.append(dg.materialize(defs.assets, selection=keys, instance=instance, resources=defs.resources,
                                      tags=tags, raise_on_error=True, run_config=run_config))
    return results
