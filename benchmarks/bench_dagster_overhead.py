"""Dagster's overhead on one shard: `materialize(train_gradients[shard])` against the same
engine calls made directly (load model, collect, write the store), in one process.

    .venv/bin/python benchmarks/bench_dagster_overhead.py [--docs 256] [--repeats 5]

Uses the embedded demo at a small size (trained once into a temporary directory).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
from transformers.utils import logging as hf_logging

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.planning import Stage
from attribution_assets.defs.profiles import DeploymentProfile
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.collect import collect_shard, make_collector
from attribution_assets.engine.io import data
from attribution_assets.engine.io.digests import model_fingerprint
from attribution_assets.engine.io.models import load_pipeline_model
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import demo_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--docs", type=int, default=256, help="documents per shard")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="overhead-"))
    spec = demo_spec(people=args.people, shard_size=args.docs, epochs=3)
    defs = build_definitions([spec], DeploymentProfile("local", None, StorageResource(root=str(root)),
                                                       ComputeResource()))
    paths = PipelinePaths.under(root, spec.name)
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, stages=[Stage("prepare", ("corpus", "query_set", "tokenizer", "model"), False),
                                                       Stage("shards", ("tokenized_shards",), True)],
                         log=lambda _: None, log_level="ERROR")
    shard = instance.get_dynamic_partitions("demo_shards")[0]
    docs = data.read_tokenized(paths.tokens(shard))
    fingerprint = model_fingerprint(load_pipeline_model(spec, paths)[0])
    run_config = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

    def direct() -> None:
        model, _ = load_pipeline_model(spec, paths)
        collector = make_collector(model, spec, paths)
        collect_shard(collector, docs, root / "direct" / shard, fingerprint)

    def through_dagster() -> None:
        dg.materialize(defs.assets, selection=[dg.AssetKey(["demo", "train_gradients"])], partition_key=shard,
                       instance=instance, resources=defs.resources, run_config=run_config)

    timings = {"direct engine call": [], "dagster materialize": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        for name, fn in (("direct engine call", direct), ("dagster materialize", through_dagster)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    base = statistics.median(timings["direct engine call"])
    print(f"one shard: {len(docs)} documents, {sum(len(d.input_ids) for d in docs)} tokens, "
          f"{args.repeats} repeats (median)")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:<22} {median:7.3f} s   ratio {median / base:5.2f}   overhead {median - base:+.3f} s")


if __name__ == "__main__":
    main()
