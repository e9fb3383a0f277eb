"""Fact tracing from train-time rows next to post-hoc rows, through the scorer's own code path.

Both rows score the pipeline's stored query rows (``scoring.run.query_rows_path``) with
:class:`~attribution_assets.engine.scoring.run.QueryScorer` and the pipeline's ``scoring``
settings, one query at a time (``aggregate: individual``), against every training document:

* ``post_hoc``: the stored training gradient shards of the final model with the pipeline's own
  preconditioner (what the ``scores`` asset computes with ``train_rows: post_hoc``);
* ``train_time``: each document's train-time rows summed over the recorded steps
  (``training.stored_rows.train_time_document_rows``: the ``finetune`` asset's shards or the demo
  model's, ``demo.record_epochs``) with their own TrackStar preconditioner (the train side's
  autocorrelation from these rows, mixed with the queries' as ``scoring.mixing`` says), built
  by ``preconditioning.trackstar_preconditioner`` as the ``preconditioner`` asset builds it.

Ranks and metrics as ``fact_tracing``: the first gold document's rank (ties pessimistic),
recall@k and MRR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from attribution_assets.engine.evaluation.fact_tracing import first_gold_ranks, markdown_table
from attribution_assets.engine.evaluation.metrics import recall_and_mrr
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io import data
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import (
    accumulate,
    row_autocorrelation,
)
from attribution_assets.engine.preconditioning.preconditioners import trackstar_preconditioner
from attribution_assets.engine.scoring.run import QueryScorer, query_rows_path
from attribution_assets.engine.training.stored_rows import (
    train_time_document_rows,
    train_time_stores,
)
from attribution_assets.spec import PipelineSpec


def train_time_fact_tracing(spec: PipelineSpec, paths: PipelinePaths, shards: Sequence[str],
                            gold: Mapping[str, Sequence[str]],
                            ks: tuple[int, ...] = (1, 10, 50)) -> tuple[pl.DataFrame, str]:
    """``(frame, markdown)``: one row per train-row source (``post_hoc``, ``train_time``) with
    ``recall@k``, ``mrr`` and ``queries``; ``shards``: the training gradient shards (every
    document of the corpus); ``gold``: query id -> gold document ids."""
    stores = [GradientStore(paths.train_gradients(s)) for s in shards]
    doc_ids = [d for s in stores for d in s.doc_ids]
    sources = [d.source_id for s in shards for d in data.read_tokenized(paths.tokens(s))]
    if len(sources) != len(doc_ids):
        raise ValueError("the training gradient shards do not match the tokenized shards: materialize "
                         "train_gradients again")
    post_hoc = np.concatenate([s.document_rows() for s in stores])
    train_time, info = train_time_document_rows(train_time_stores(spec, paths), doc_ids)
    own = None
    if spec.scoring.preconditioner == "trackstar":
        query = GradientStore(query_rows_path(spec, paths)).document_rows()
        layout = info["modules"]
        own = trackstar_preconditioner(accumulate([train_time], layout), row_autocorrelation(query, layout),
                                       spec.scoring, full_text=spec.full_text_queries)
    rows = []
    for name, train, preconditioner in (("post_hoc", post_hoc, None), ("train_time", train_time, own)):
        scorer = QueryScorer.for_pipeline(spec, paths, aggregate="individual", preconditioner=preconditioner)
        ranks = first_gold_ranks(scorer.score(train), sources, scorer.query_ids, gold)
        rows.append({"train_rows": name, **recall_and_mrr(ranks, ks)})
    frame = pl.DataFrame(rows)
    return frame, markdown_table(frame)
