"""The scale curve's platform part (``bench_curve.py platform``): Dagster at many shard partitions.

A real pipeline of ``REAL_SHARDS`` shards (the e2e corpus and model, ``projection_dim`` 16, the
corpus a folder that the new-data sensor watches) is materialized first; then the partition
count is raised synthetically: the other shard keys are registered as dynamic partitions and
every partitioned asset's materialization of ``shard-00000`` is reported again for each of them
through ``DagsterInstance.report_runless_asset_event`` (same tags: code and data versions),
then the fan-in assets' events again (newer than their inputs'). Measured on that instance:
``attribution materialize`` on the up-to-date pipeline (a fresh process: wall time, and the
planning alone in this process), the new-data sensor's tick after one new file, the asset page's
GraphQL query through the webserver's ASGI app in this process (the code location in a code
server process, as under ``dagster-webserver``), and the instance database's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_curve import ROOT, documents, du, load, record, shakespeare_words, write_inputs

REAL_SHARDS, REAL_SHARD_SIZE = 4, 50
ASSET_PAGE = """
query AssetPage($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name partitionKeys }
      partitionStats { numMaterialized numPartitions numFailed numMaterializing }
      assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
      assetMaterializations(limit: 1) { partition timestamp }
      staleStatus
    }
  }
}
"""


def real_pipeline(base: Path) -> tuple:
    """The 4-shard pipeline under ``base``, materialized; returns ``(spec, defs, instance, env)``."""
    import yaml

    from attribution_assets.defs.factory import build_definitions
    from attribution_assets.defs.instance import persistent_instance
    from attribution_assets.defs.profiles import load_profile
    from attribution_assets.defs.resources import StorageResource
    from attribution_assets.defs.runner import materialize_pipeline
    from attribution_assets.spec import load_pipeline_file

    words = shakespeare_words()
    path = write_inputs(base, REAL_SHARDS * REAL_SHARD_SIZE, REAL_SHARD_SIZE, words)
    folder = base / "corpus"
    folder.mkdir()
    (base / "corpus.jsonl").rename(folder / "part-0.jsonl")
    body = yaml.safe_load(path.read_text())
    body["pipelines"][0]["corpus"]["path"] = str(folder)
    body["pipelines"][0]["gradients"] = {"projection_dim": 16}
    path.write_text(yaml.safe_dump(body))
    env = {"DAGSTER_HOME": str(base / "home"), "ATTRIBUTION_STORAGE": str(base / "storage"),
           "ATTRIBUTION_PIPELINES": str(path), "ATTRIBUTION_RESOURCES": "local", "HF_HUB_OFFLINE": "1",
           "CI": "true", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    (spec,) = load_pipeline_file(path)
    profile = dataclasses.replace(load_profile("local"), storage=StorageResource(root=str(base / "storage")))
    instance = persistent_instance(base / "home", profile)
    defs = build_definitions([spec], profile)
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="CRITICAL")
    return spec, defs, instance, env


def latest_storage_ids(instance, asset_key) -> dict[str | None, int]:
    """Partition (None: unpartitioned) -> storage id of its latest materialization."""
    import dagster as dg

    out: dict[str | None, int] = {}
    cursor = None
    while True:
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key), limit=1000,
                                               cursor=cursor, ascending=True)
        for r in page.records:
            out[r.asset_materialization.partition] = r.storage_id
        if not page.has_more:
            return out
        cursor = page.cursor


def retag(tags: dict, pointers: dict) -> dict:
    """``tags`` with each ``dagster/input_event_pointer/<upstream>`` set to ``pointers[upstream]``:
    the copied event then reads its own partition's upstream event (no stale input)."""
    prefix = "dagster/input_event_pointer/"
    return {k: (str(pointers[k[len(prefix):]]) if k.startswith(prefix) and k[len(prefix):] in pointers else v)
            for k, v in tags.items()}


def grow(spec, defs, instance, partitions: int) -> dict:
    """Raise the shard partitions to ``partitions`` (see module docstring); returns counts."""
    import dagster as dg

    from attribution_assets.defs.common import shards_partitions
    from attribution_assets.engine.io.data import shard_key

    name = shards_partitions(spec).name
    have = set(instance.get_dynamic_partitions(name))
    new = [shard_key(i) for i in range(partitions) if shard_key(i) not in have]
    instance.add_dynamic_partitions(name, new)
    graph = defs.resolve_asset_graph()
    keys = [k for k in graph.toposorted_asset_keys if k.path[0] == spec.name]
    ids: dict[dg.AssetKey, dict] = {}
    events, start = 0, time.perf_counter()
    for asset_key in keys:
        event = instance.get_latest_materialization_event(asset_key) if not graph.get(asset_key).is_partitioned \
            else None
        parents = [k for k in graph.get(asset_key).parent_keys if k in ids]
        if graph.get(asset_key).is_partitioned:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[shard_key(0)]), limit=1).records
            if not records:
                continue
            m = records[0].asset_materialization
            for partition in new:
                pointers = {k.to_user_string(): ids[k].get(partition, ids[k].get(None)) for k in parents}
                instance.report_runless_asset_event(dg.AssetMaterialization(
                    asset_key=asset_key, partition=partition, metadata=m.metadata, tags=retag(m.tags, pointers)))
                events += 1
        elif event is not None and parents:
            m = event.asset_materialization
            pointers = {k.to_user_string(): max(ids[k].values()) for k in parents}
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=asset_key, metadata=m.metadata, tags=retag(m.tags, pointers)))
            events += 1
        ids[asset_key] = latest_storage_ids(instance, asset_key)
    return {"synthetic_events": events, "synthetic_seconds": round(time.perf_counter() - start, 1)}


def planning(spec, defs, instance) -> tuple[float, list[str]]:
    """Seconds of every stage's plan in this process; the stages that have work."""
    from attribution_assets.defs.planning import pipeline_stages, plan_stage

    start, busy = time.perf_counter(), []
    for stage in pipeline_stages(spec):
        if plan_stage(defs, spec, instance, stage, False).keys:
            busy.append(stage.name)
    return time.perf_counter() - start, busy


def cli_noop(env: dict, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "attribution_assets.cli", "materialize", "--pipeline", "curve"],
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    return time.perf_counter() - start, done.stdout + done.stderr


def sensor_tick(spec, instance, base: Path) -> tuple[float, str]:
    """One tick of the new-data sensor after one new corpus file arrives."""
    import dagster as dg

    from attribution_assets.defs.automation import directory_state, new_data_sensor

    folder = base / "corpus"
    sensor = new_data_sensor(spec)
    context = dg.build_sensor_context(instance=instance, cursor=directory_state(folder))
    (folder / "part-1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                 for t in documents(shakespeare_words(), 10, seed=3)))
    start = time.perf_counter()
    result = sensor.evaluate_tick(context)
    return time.perf_counter() - start, f"{len(result.run_requests or [])} run request(s)"


def graphql_asset_page(spec, instance) -> tuple[float, float, dict]:
    """``(first, warm)`` seconds of the asset page query for ``train_gradients`` and its stats."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster_webserver.webserver import DagsterWebserver
    from starlette.testclient import TestClient

    target = ModuleTarget("attribution_assets.definitions", None, str(ROOT), "attribution_assets")
    with WorkspaceProcessContext(instance, target) as context:
        client = TestClient(DagsterWebserver(context).create_asgi_app())
        payload = {"query": ASSET_PAGE, "variables": {"key": {"path": [spec.name, "train_gradients"]}}}
        times, body = [], {}
        for _ in range(3):
            start = time.perf_counter()
            body = client.post("/graphql", json=payload).json()
            times.append(time.perf_counter() - start)
    node = (body.get("data") or {}).get("assetNodeOrError") or {}
    if "partitionStats" not in node:
        raise RuntimeError(f"asset page query failed: {json.dumps(body)[:2000]}")
    return times[0], min(times[1:]), node["partitionStats"]


def platform(partitions: int, base: Path) -> dict:
    spec, defs, instance, env = real_pipeline(base)
    fig = {"partitions": partitions, "real_shards": REAL_SHARDS, "load_before": load()}
    fig |= grow(spec, defs, instance, partitions)
    seconds, busy = planning(spec, defs, instance)
    fig["plan_in_process_s"], fig["stages_with_work"] = round(seconds, 2), busy
    seconds, out = cli_noop(env, base)
    fig["cli_noop_s"], fig["cli_up_to_date_stages"] = round(seconds, 2), out.count("up to date")
    seconds, fig["sensor_result"] = sensor_tick(spec, instance, base)
    fig["sensor_tick_s"] = round(seconds, 4)
    first, warm, fig["partition_stats"] = graphql_asset_page(spec, instance)
    fig["graphql_first_s"], fig["graphql_warm_s"] = round(first, 2), round(warm, 2)
    fig["instance_mb"] = round(du(base / "home") / 2**20, 1)
    fig["load_after"] = load()
    return fig


def print_platform(rows: list[dict]) -> None:
    print("\n| shard partitions | `attribution materialize`, up to date (fresh process) s | planning in process s "
          "| stages with work | sensor tick s (one new file) | asset page GraphQL s (first / warm) "
          "| instance DB MiB | load before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for f in rows:
        print(f"| {f['partitions']:,} | {f['cli_noop_s']} | {f['plan_in_process_s']} | "
              f"{', '.join(f['stages_with_work']) or 'none'} | {f['sensor_tick_s']} ({f['sensor_result']}) | "
              f"{f['graphql_first_s']} / {f['graphql_warm_s']} | {f['instance_mb']} | "
              f"{f['load_before']} -> {f['load_after']} |")
    print("partition stats: " + "; ".join(json.dumps(f["partition_stats"]) for f in rows), flush=True)


def run_platform(args) -> None:
    rows = []
    for n in args.partitions:
        with tempfile.TemporaryDirectory(prefix="bench-curve-platform-", dir=args.tmp) as tmp:
            done = subprocess.run([sys.executable, __file__, str(n), tmp], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"})
        if done.returncode:
            sys.exit(f"platform at {n} partitions failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(next(line for line in reversed(done.stdout.splitlines())
                                    if line.startswith('{"partitions"'))))
        record(args.out, "platform", rows[-1])
    print_platform(rows)


if __name__ == "__main__":  # one partition count in a fresh process: python curve_platform.py N BASE
    print(json.dumps(platform(int(sys.argv[1]), Path(sys.argv[2]))))
