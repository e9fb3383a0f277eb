"""Bergson 2.5.1's ``trackstar --unit_normalize`` on one fixture (runs in ``benchmarks/.bergson-venv``).

Called by ``compare_trackstar.py``; imports only Bergson (not this project). Runs Bergson's own
pipeline function ``bergson.cli.trackstar.trackstar`` (value Hessian, query Hessian, mixing,
query index, scoring) with its defaults (fp32, per-module Rademacher projection, summed token
loss, no optimizer normalizer, ``target_downweight_components`` 1000, damping 0.1) on the
fixture's ``docs.jsonl`` and the full query texts, and writes the ``[queries, documents]``
scores as ``scores.npy`` in ``--out``.

    benchmarks/.bergson-venv/bin/python benchmarks/bergson_trackstar_child.py FIXTURE P OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(fixture: Path, projection_dim: int, out: Path) -> None:
    from bergson.cli.trackstar import trackstar
    from bergson.config.config import (
        DataConfig,
        DistributedConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
    )
    from bergson.data import load_scores

    out.mkdir(parents=True, exist_ok=True)
    queries = out / "queries.jsonl"  # the full query texts, one "text" per line
    lines = (fixture / "queries.jsonl").read_text().splitlines()
    queries.write_text("".join(json.dumps({"text": json.loads(q)["text"]}) + "\n" for q in lines))
    index_cfg = TrackstarIndexConfig(
        run_path=str(out / "run"),
        model=str(fixture / "model"),
        precision="fp32",
        projection_dim=projection_dim,
        token_batch_size=64,  # the demo model's max length; Bergson refuses more
        data=DataConfig(dataset=str(fixture / "docs.jsonl"), prompt_column="text"),
        distributed=DistributedConfig(nproc_per_node=1),
    )
    trackstar_cfg = TrackstarConfig(
        query=QuerySetConfig(dataset=str(queries), prompt_column="text"),
        preprocess_cfg=PreprocessConfig(unit_normalize=True),
        score_cfg=ScoreConfig(score="individual"),
    )
    trackstar(index_cfg, trackstar_cfg)
    scores = load_scores(out / "run" / "scores")
    table = np.asarray(scores[:], dtype=np.float32).T
    np.save(out / "scores.npy", table)  # [queries, documents]


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
