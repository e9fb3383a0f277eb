"""Materialize a pipeline's assets in order (used by the CLI and tests): one run per stage,
one run per shard partition for partitioned stages."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec
from .common import key, shards_partitions

DAGSTER_YAML = """telemetry:
  enabled: false
"""

#: Stages in dependency order: (asset names, partitioned by shard?)
STAGES: list[tuple[tuple[str, ...], bool]] = [
    (("corpus", "query_set", "tokenizer", "model", "tokenized_queries", "query_gradients"), False),
    (("tokenized_shards", "train_gradients"), True),
    (("train_autocorrelation", "preconditioner", "faiss_index"), False),
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
        partitions = (instance.get_dynamic_partitions(shards_partitions(spec).name)
                      if partitioned else [None])
        for partition in partitions:
            label = ", ".join(k.path[-1] for k in keys) + (f" [{partition}]" if partition else "")
            log(f"materializing {spec.name}: {label}")
            result = dg.materialize(
                defs.assets, selection=keys, instance=instance, resources=defs.resources,
                partition_key=partition, raise_on_error=True, run_config=run_config)
            results.append(result)
    return results
