"""A pipeline's corpus and query tables and its model record (no Dagster here).

``documents.parquet``: ``doc_id, source_row, shard, content (JSON), text``.
``queries.parquet``: ``doc_id (the query id), source_row, content, text, gold_doc_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from attribution_assets.engine.io import data, records
from attribution_assets.engine.io.atomic import atomic_file, write_text_atomic
from attribution_assets.engine.io.digests import model_fingerprint
from attribution_assets.spec import DataSpec, PipelineSpec


def add_eos(spec: DataSpec, default: bool) -> bool:
    """Append EOS to documents (default for corpora) or not (default for queries)."""
    return default if spec.add_eos is None else spec.add_eos


def corpus_documents(spec: PipelineSpec, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the training corpus with stable ids (see :func:`data.build_documents`; ``skipped``
    receives the location of each row left out by ``missing_text: skip``)."""
    if spec.is_demo:
        corpus = _demo_corpus(spec)
        return data.build_documents(corpus.documents, DataSpec(id_column="doc_id"))
    return data.build_documents(records.load_records(spec.corpus), spec.corpus, records.RowLocator(spec.corpus), skipped)


def query_documents(spec: PipelineSpec, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the query set; ``doc_id`` holds the query id, ``gold_doc_ids`` where known."""
    if spec.queries is None:
        raise data.DataError(f"Pipeline {spec.name!r} has no `queries` section; add one to score queries.")
    if spec.is_demo:
        return data.build_documents(_demo_corpus(spec).queries, spec.queries)
    return data.build_documents(records.load_records(spec.queries), spec.queries, records.RowLocator(spec.queries),
                                skipped)


def _demo_corpus(spec: PipelineSpec):
    from attribution_assets.engine.demo.corpus import generate_demo_corpus

    return generate_demo_corpus(spec.demo)


def write_documents(path: Path, docs: list[dict[str, Any]], shard_size: int) -> list[str]:
    """Write the corpus table atomically; return the sorted shard keys.

    Shards are append-only across rewrites (see :func:`data.assign_shards`)."""
    previous = {}
    if Path(path).exists():
        previous = dict(pl.read_parquet(path, columns=["doc_id", "shard"]).iter_rows())
    shards = data.assign_shards([d["doc_id"] for d in docs], shard_size, previous)
    frame = pl.DataFrame({
        "doc_id": [d["doc_id"] for d in docs], "source_row": [d["source_row"] for d in docs],
        "shard": shards, "content": [d["content"] for d in docs], "text": [d["text"] for d in docs],
    }, schema_overrides={"source_row": pl.Int64})
    if any("advantage" in d for d in docs):
        frame = frame.with_columns(advantage=pl.Series([d.get("advantage") for d in docs], dtype=pl.Float64))
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return sorted(set(shards))


def read_documents(path: Path, shard: str | None = None) -> list[dict[str, Any]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; materialize the pipeline's `corpus` asset first.")
    frame = pl.read_parquet(path)
    if shard is not None:
        frame = frame.filter(pl.col("shard") == shard)
    return frame.to_dicts()


def shard_sizes(path: Path) -> dict[str, int]:
    """Documents per shard of the corpus table (its ``shard`` column only)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; materialize the pipeline's `corpus` asset first.")
    return dict(pl.read_parquet(path, columns=["shard"])["shard"].value_counts().iter_rows())


def write_queries(path: Path, queries: list[dict[str, Any]]) -> None:
    frame = pl.DataFrame({
        "doc_id": [q["doc_id"] for q in queries], "source_row": [q["source_row"] for q in queries],
        "content": [q["content"] for q in queries], "text": [q["text"] for q in queries],
        "gold_doc_ids": pl.Series([q.get("gold_doc_ids", []) for q in queries], dtype=pl.List(pl.String)),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)


def read_queries(path: Path) -> list[dict[str, Any]]:
    return read_documents(path)


def write_model_record(path: Path, spec: PipelineSpec, model) -> dict[str, Any]:
    """Record a user model's source and fingerprint (the weights stay where they are)."""
    record = {
        "source": spec.model.name_or_path, "revision": spec.model.revision, "dtype": spec.model.dtype,
        "fingerprint": model_fingerprint(model),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "architecture": type(model).__name__,
    }
    write_text_atomic(path, json.dumps(record, indent=2))
    return record
