"""The pipeline's attribution steps as plain functions: one code path for assets, CLI and tests.

* :func:`collect_shard` - per-example gradients of tokenized documents -> a gradient store.
* :func:`accumulate` - streaming autocorrelation over stores (or over freshly computed blocks).
* :func:`build_preconditioner` - TrackStar mixing/damping from train (and query) autocorrelations.
* :func:`score_block` - scores of one shard's document rows against prepared queries.
* :func:`write_scores` - the long-format Parquet score table of one shard.

Per-token stores: document rows are the sums of their token rows (exact, see
``collector``), so document scores are always computed from document rows.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..spec import GradientSpec, PipelineSpec, ScoringSpec
from .atomic import atomic_file
from .collector import CollectorConfig, GradientCollector
from .data import TokenizedDoc
from .normalizers import make_normalizer
from .preconditioners import Autocorrelation, AutocorrelationAccumulator, Preconditioner
from .scoring import prepare_queries, prepare_train, score_prepared
from .store import GradientStore, write_store


def collector_config(spec: GradientSpec) -> CollectorConfig:
    return CollectorConfig(
        projection_dim=spec.projection_dim, projection_kind=spec.projection_kind, seed=spec.seed,
        include=tuple(spec.include), exclude=tuple(spec.exclude), include_bias=spec.include_bias,
        per_token=spec.per_token, dtype=spec.dtype, max_tokens_per_batch=spec.max_tokens_per_batch,
        normalizer=None if spec.normalizer == "none" else spec.normalizer)


def optimizer_state_source(spec: PipelineSpec, model_dir: Path | None) -> str | None:
    """Where the normalizer's optimizer state lives: the spec's path, else the demo model's."""
    if spec.gradients.normalizer == "none":
        return None
    if spec.gradients.optimizer_state:
        return spec.gradients.optimizer_state
    if model_dir is not None and (Path(model_dir) / "optimizer.pt").exists():
        return str(Path(model_dir) / "optimizer.pt")
    raise ValueError(f"Pipeline {spec.name!r} uses the {spec.gradients.normalizer!r} normalizer but has no "
                     "optimizer state: set `gradients.optimizer_state` to an optimizer.pt or a Trainer "
                     "checkpoint directory, or set `gradients.normalizer: none`.")


def make_collector(model, spec: PipelineSpec, model_dir: Path | None = None,
                   device: Any = None) -> GradientCollector:
    """A collector with the pipeline's projection and normalizer (same on query and train side)."""
    config = collector_config(spec.gradients)
    source = optimizer_state_source(spec, model_dir)
    normalizer = make_normalizer(config.normalizer, source, model) if source else None
    return GradientCollector(model, config, normalizer, device)


@dataclass
class CollectStats:
    rows: int
    dims: int
    tokens: int
    seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None

    def as_metadata(self) -> dict[str, Any]:
        meta = {"rows": self.rows, "dims": self.dims, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.peak_device_mb is not None:
            meta["peak_device_mb"] = round(self.peak_device_mb, 1)
        return meta


def collect(collector: GradientCollector, docs: list[TokenizedDoc]) -> tuple[np.ndarray, dict, CollectStats]:
    """Gradient rows of ``docs``: ``(array [rows, dims] float32, info, stats)``."""
    if collector.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(collector.device)
    start = time.perf_counter()
    array, info = collector.collect([(d.input_ids, d.loss_mask) for d in docs])
    seconds = time.perf_counter() - start
    device_mb = (torch.cuda.max_memory_allocated(collector.device) / 2**20
                 if collector.device.type == "cuda" else None)
    stats = CollectStats(rows=array.shape[0], dims=array.shape[1], tokens=sum(len(d.input_ids) for d in docs),
                         seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         peak_device_mb=device_mb)
    return array, info, stats


def collect_shard(collector: GradientCollector, docs: list[TokenizedDoc], out: Path,
                  model_fingerprint: str) -> tuple[GradientStore, CollectStats]:
    """Collect ``docs`` and write a gradient store at ``out`` (atomically)."""
    array, info, stats = collect(collector, docs)
    store = write_store(out, array, info, doc_ids=[d.doc_id for d in docs],
                        model_fingerprint=model_fingerprint, dtype=collector.config.dtype)
    return store, stats


def document_rows(array: np.ndarray, info: dict) -> np.ndarray:
    """``[n_docs, dims]``: the rows themselves, or per-token rows summed per document."""
    if not info.get("per_token"):
        return array
    offsets = np.asarray(info["token_offsets"], dtype=np.int64)
    return np.add.reduceat(np.asarray(array, dtype=np.float32), offsets[:-1], axis=0)


def accumulate(blocks: Iterable[np.ndarray], layout: list[dict]) -> Autocorrelation:
    """Streaming ``R = (1/n) sum g g^T`` per module over document-row blocks."""
    acc = AutocorrelationAccumulator(layout)
    for block in blocks:
        acc.update(block)
    return acc.finalize()


def save_autocorrelation(path: Path, autocorrelation: Autocorrelation) -> None:
    """Per-module float64 matrices (safetensors) + layout and ``n`` (JSON), written atomically."""
    import json

    from safetensors.numpy import save_file

    from .atomic import atomic_dir

    with atomic_dir(path) as tmp:
        save_file({m.name: autocorrelation.matrices[m.name] for m in autocorrelation.layout},
                  str(tmp / "autocorrelation.safetensors"))
        (tmp / "autocorrelation.json").write_text(json.dumps(
            {"n": autocorrelation.n, "layout": [m._asdict() for m in autocorrelation.layout]}))


def load_autocorrelation(path: Path) -> Autocorrelation:
    import json

    from safetensors.numpy import load_file

    from .preconditioners import normalize_layout

    meta = json.loads((Path(path) / "autocorrelation.json").read_text())
    matrices = load_file(str(Path(path) / "autocorrelation.safetensors"))
    return Autocorrelation(normalize_layout(meta["layout"]), matrices, int(meta["n"]))


def store_blocks(paths: Iterable[Path]) -> Iterable[np.ndarray]:
    """Document rows of each gradient store, one shard at a time (memory-mapped)."""
    for path in paths:
        store = GradientStore(path)
        yield document_rows(store.array, store.info)


def index_blocks(paths: list[Path], preconditioner: Preconditioner | None,
                 scoring: ScoringSpec) -> Iterable[tuple[list[str], np.ndarray]]:
    """``(doc_ids, rows)`` per gradient store, rows as scores see them (the FAISS index input)."""
    for path in paths:
        store = GradientStore(path)
        yield store.doc_ids, prepare_train(document_rows(store.array, store.info), preconditioner,
                                           scoring.metric)


def build_preconditioner(train: Autocorrelation, query: Autocorrelation | None,
                         scoring: ScoringSpec) -> Preconditioner:
    """TrackStar's preconditioner: ``lam * R_query + (1 - lam) * R_train``, damped."""
    mixing = scoring.mixing
    lam = None if mixing == "off" or query is None else ("auto" if mixing == "auto" else float(mixing))
    return Preconditioner.from_autocorrelation(train, query if lam is not None else None,
                                               lam=lam, damping=scoring.damping)


def prepare(query_array: np.ndarray, query_info: dict, preconditioner: Preconditioner | None,
            scoring: ScoringSpec) -> np.ndarray:
    """Prepared query rows (preconditioned once, normalized/aggregated as configured)."""
    return prepare_queries(document_rows(query_array, query_info), preconditioner, scoring.metric,
                           scoring.aggregate)


def score_block(prepared: np.ndarray, doc_block: np.ndarray, preconditioner: Preconditioner | None,
                scoring: ScoringSpec) -> np.ndarray:
    """``[q', n]`` scores of document rows against prepared queries."""
    return score_prepared(prepared, doc_block, preconditioner, scoring.metric, aggregate=scoring.aggregate)


def score_query_ids(query_ids: list[str], aggregate: str) -> list[str]:
    """Row labels of a score matrix: the query ids, or one ``__<aggregate>__`` row."""
    return list(query_ids) if aggregate == "individual" else [f"__{aggregate}__"]


def write_scores(path: Path, scores: np.ndarray, query_ids: list[str], doc_ids: list[str], shard: str,
                 top_k: int = 0) -> int:
    """Long-format Parquet ``query_id, doc_id, shard, score`` (per query, the ``top_k`` best, 0 = all)."""
    import polars as pl

    q, n = scores.shape
    if top_k and top_k < n:
        cols = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    else:
        cols = np.tile(np.arange(n), (q, 1))
    rows = np.repeat(np.arange(q), cols.shape[1])
    flat_cols = cols.reshape(-1)
    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(query_ids, dtype=object)[rows], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(doc_ids, dtype=object)[flat_cols], dtype=pl.String),
        "shard": pl.Series([shard] * len(rows), dtype=pl.String),
        "score": pl.Series(scores[rows, flat_cols].astype(np.float32), dtype=pl.Float32),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height


def write_token_scores(path: Path, token_scores: np.ndarray, query_ids: list[str], doc_ids: list[str],
                       info: dict, shard: str) -> int:
    """Per-token Parquet ``query_id, doc_id, shard, token, score`` (rows of a per-token store)."""
    import polars as pl

    offsets = np.asarray(info["token_offsets"], dtype=np.int64)
    doc_of_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    q, n = token_scores.shape
    rows = np.repeat(np.arange(q), n)
    cols = np.tile(np.arange(n), q)
    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(query_ids, dtype=object)[rows], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(doc_ids, dtype=object)[doc_of_row[cols]], dtype=pl.String),
        "shard": pl.Series([shard] * len(rows), dtype=pl.String),
        "token": pl.Series(np.asarray(info["token_positions"], dtype=np.int32)[cols], dtype=pl.Int32),
        "score": pl.Series(token_scores[rows, cols].astype(np.float32), dtype=pl.Float32),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height


def store_digest(store: GradientStore, block_rows: int = 65536) -> str:
    """Content hash of a gradient store (array bytes + settings), used as a data version."""
    import hashlib

    h = hashlib.sha256(str(store.info.get("config_hash", "")).encode())
    h.update(str(store.info.get("model_fingerprint", "")).encode())
    for start in range(0, store.rows, block_rows):
        h.update(np.ascontiguousarray(store.array[start:start + block_rows]).tobytes())
    return h.hexdigest()[:16]


def digest_files(directory: Path) -> str:
    """Content hash of every file under ``directory`` (sorted by relative path)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
