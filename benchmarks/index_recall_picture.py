"""Recall against nprobe of an IVF index over a materialized pipeline's stored gradients
(default: the demo of `make demo`, whose own index is `Flat`), calibrated on the pipeline's
queries exactly as the `faiss_index` asset calibrates an `auto` nprobe; prints the curve and
writes the picture the asset would attach (docs/img/index-recall.png).

    make demo && .venv/bin/python benchmarks/index_recall_picture.py
    .venv/bin/python benchmarks/index_recall_picture.py --storage /tmp/s --factory 'IVF{auto},Flat'
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from attribution_assets.defs.index import CALIBRATION_QUERIES, calibration_queries
from attribution_assets.engine.explain import plots
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.scoring.run import load_preconditioner, prepared_training_blocks
from attribution_assets.engine.search.build import build_index
from attribution_assets.spec import demo_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=str(ROOT / ".storage"), help="storage root of the materialized demo")
    parser.add_argument("--factory", default="IVF{auto},Flat")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "index-recall.png"))
    args = parser.parse_args()
    spec = demo_spec()
    spec = dataclasses.replace(spec, index=dataclasses.replace(spec.index, factory=args.factory, nprobe="auto"))
    paths = PipelinePaths.under(args.storage, spec.name)
    shards = paths.gradient_shards()
    if not shards:
        raise SystemExit(f"No gradient stores under {paths.root}: run `make demo` (or pass --storage).")
    precond = load_preconditioner(spec, paths)
    queries = calibration_queries(spec, paths, precond)
    with tempfile.TemporaryDirectory() as tmp:
        info = build_index(lambda: prepared_training_blocks(paths, shards, precond, spec.scoring.metric),
                           spec.index, Path(tmp) / "index", calibration=queries,
                           calibration_queries=CALIBRATION_QUERIES)
    c = info.calibration
    print(f"{info.factory}: {info.vectors} vectors, {len(queries)} calibration queries; chosen nprobe {info.nprobe} "
          f"(target recall@{c['k']} {c['target_recall']}, reachable: {c['reachable']})")
    print("nprobe  recall  95% lower bound")
    for value, recall, bound in sorted(c["curve"]):
        print(f"{int(value):>6}  {recall:.3f}   {bound:.3f}")
    plots.recall_plot(c["curve"], Path(args.out), parameter="nprobe", k=c["k"], target=c["target_recall"],
                      chosen=info.nprobe)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
