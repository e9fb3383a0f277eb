"""The methods fact tracing compares and their ``[q, n]`` scores of every query against every
training document (higher: the document supports the query more), from gradients computed
once and shared (:class:`GradientCache`); ``fact_tracing`` ranks them.

Methods (:class:`Method`):

* ``random``: uniform random scores (seed 0), the no-information reference.
* ``bm25``: lexical BM25 (``bm25s``, lowercased word tokens, English stopwords removed)
  of the full query text, prompt AND answer, against each document's text. Seeing the
  answer is BM25's most favourable setting, so it is a strong baseline.
* ``dot``: raw gradient inner product ``g_q . g_t`` (no normalizer, no preconditioner).
* ``cosine``: ``cos(g_q, g_t)`` (no normalizer, no preconditioner).
* ``trackstar``: ``cos(R^{-1/2} g_q, R^{-1/2} g_t)`` with the mixed, damped
  autocorrelation ``R`` of ``preconditioning.trackstar_preconditioner``, with optimizer
  normalization ``none`` / ``adafactor`` / ``adam``.
* ``preconditioned dot (adafactor)``: ``g_q R^{-1} g_t``, the same preconditioner with
  inner products and no unit normalization: additive like an influence function, the
  form the linear datamodeling score (``lds``) sums, though ``R`` is the (mixed)
  gradient autocorrelation, not the Hessian: influence-like.
* ``ekfac`` / ``kfac``: the influence function ``g_qᵀ (F + lam I)^{-1} g_t`` with the EK-FAC /
  K-FAC Gauss-Newton ``F`` of ``preconditioning.kfac`` (sampled labels, fitted on the
  training documents, in the projected space), no optimizer normalization: the
  preconditioned query row scored by inner product with the projected training rows.
  ``ekfac (cosine)`` / ``kfac (cosine)``: the same preconditioned query and the raw
  training row, both unit-normalized. ``ekfac (full space)``: each full query gradient
  preconditioned with the full-space EK-FAC, then projected (``kfac_space: full``).
* ``configured``: the pipeline's own ``gradients``/``scoring`` settings (only when they
  differ from every method above).
* ``magic``: the pipeline's MAGIC score tables (``engine.magic``; pipelines with
  ``magic.enabled``), exact metagradients of the completion loss through the MAGIC
  training run (a separate, deterministic run, not the pipeline model's own training).

Gradients go through ``gradients.collect`` (the assets' code path),
with the pipeline's projection; they are computed once per (normalizer, query loss)
and shared by all methods, TrackStar preconditioners once per (normalizer, query loss), the
K-FAC factors once per label setting (EK-FAC's correction once more). Query loss: ``"completion"`` (the query's ``loss_mask``,
the answer, as TrackStar does) or ``"full"`` (every query token but the first).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attribution_assets.engine.gradients.collect import (
    collect,
    make_collector,
    optimizer_state_source,
)
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.store import document_rows
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.magic import pipeline as magic_pipeline
from attribution_assets.engine.preconditioning.autocorrelation import (
    accumulate,
    row_autocorrelation,
)
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector
from attribution_assets.engine.preconditioning.kfac import (
    CovarianceSums,
    KroneckerEigen,
    KroneckerPreconditioner,
)
from attribution_assets.engine.preconditioning.kfac_files import projection_for
from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    trackstar_preconditioner,
)
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.spec import PipelineSpec, ScoringSpec, SpecValueError

QUERY_LOSSES = ("completion", "full")


@dataclass(frozen=True)
class Method:
    """How to score: ``kind`` ``bm25`` or ``gradient`` (normalizer + scoring settings;
    ``preconditioner`` as in ``ScoringSpec``: ``none``, ``trackstar``, ``ekfac``, ``kfac``)."""

    name: str
    kind: str = "gradient"
    normalizer: str = "none"
    metric: str = "cosine"
    preconditioner: str = "none"
    mixing: str | float = "auto"
    damping: float = 0.1
    kfac_labels: str = "sampled"
    kfac_seed: int = 0
    kfac_space: str = "projected"

    def scoring(self) -> ScoringSpec:
        return ScoringSpec(metric=self.metric, preconditioner=self.preconditioner, mixing=self.mixing,
                           damping=self.damping, kfac_labels=self.kfac_labels, kfac_seed=self.kfac_seed,
                           kfac_space=self.kfac_space, top_k=0)

    @classmethod
    def configured(cls, spec: PipelineSpec) -> Method:
        """The pipeline's own ``gradients.normalizer`` and ``scoring`` settings."""
        s = spec.scoring
        return cls("configured", normalizer=spec.gradients.normalizer, metric=s.metric,
                   preconditioner=s.preconditioner, mixing=s.mixing, damping=s.damping,
                   kfac_labels=s.kfac_labels, kfac_seed=s.kfac_seed, kfac_space=s.kfac_space)


RANDOM = Method("random", kind="random")
BM25 = Method("bm25", kind="bm25")
DOT = Method("dot", metric="inner_product")
COSINE = Method("cosine")
EKFAC = Method("ekfac", preconditioner="ekfac", metric="inner_product")
EKFAC_COSINE = Method("ekfac (cosine)", preconditioner="ekfac")
KFAC = Method("kfac", preconditioner="kfac", metric="inner_product")
KFAC_COSINE = Method("kfac (cosine)", preconditioner="kfac")
EKFAC_FULL = Method("ekfac (full space)", preconditioner="ekfac", metric="inner_product", kfac_space="full")


def trackstar(normalizer: str = "adafactor", name: str | None = None, **scoring) -> Method:
    """TrackStar (preconditioned cosine) with the given optimizer normalizer."""
    return Method(name or f"trackstar ({normalizer})", normalizer=normalizer, preconditioner="trackstar",
                  **scoring)


PRECONDITIONED_DOT = trackstar("adafactor", name="preconditioned dot (adafactor)", metric="inner_product")
MAGIC = Method("magic", kind="magic")


def default_methods(spec: PipelineSpec) -> list[Method]:
    """Random (reference), BM25, dot, cosine, TrackStar with each normalizer, TrackStar's
    preconditioner with inner products (``g_q R^-1 g_t``, influence-like), EK-FAC and K-FAC
    influence (inner product and cosine; EK-FAC also in the full space), and the pipeline's own
    settings."""
    methods = [RANDOM, BM25, DOT, COSINE, trackstar("none"), trackstar("adafactor"), trackstar("adam"),
               PRECONDITIONED_DOT, EKFAC, EKFAC_COSINE, KFAC, KFAC_COSINE, EKFAC_FULL]
    configured = Method.configured(spec)
    if all(dataclasses.replace(m, name="configured") != configured for m in methods):
        methods.append(configured)
    if spec.magic.enabled:
        methods.append(MAGIC)
    return methods


def available_methods(spec: PipelineSpec, paths: PipelinePaths | None,
                      methods: Sequence[Method] | None = None) -> tuple[list[Method], dict[str, str]]:
    """The methods (default: :func:`default_methods`) that the pipeline's inputs allow, and
    ``{name: reason}`` for those skipped: an optimizer normalizer needs optimizer state,
    BM25 needs the ``bm25s`` package, EK-FAC / K-FAC need gradient settings they can take
    (the spec validation's message)."""
    import importlib.util

    usable, skipped = [], {}
    for m in methods or default_methods(spec):
        if m.kind == "magic" and (paths is None or not paths.magic_score_batches()):
            skipped[m.name] = ("no MAGIC score tables: set `magic.enabled: true` and materialize "
                               "`magic_training` and every `magic_scores` partition")
            continue
        if m.kind == "bm25" and importlib.util.find_spec("bm25s") is None:
            skipped[m.name] = "the bm25s package is not installed (pip install 'attribution-assets[eval]')"
            continue
        if m.kind == "gradient" and m.normalizer != "none":
            probe = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, normalizer=m.normalizer))
            try:
                optimizer_state_source(probe, paths)
            except ValueError:
                skipped[m.name] = (f"the {m.normalizer!r} normalizer needs optimizer state: set "
                                   "`gradients.optimizer_state` to an optimizer.pt or a Trainer checkpoint")
                continue
        if m.kind == "gradient" and m.scoring().kronecker:
            try:
                dataclasses.replace(spec, scoring=m.scoring(), gradients=dataclasses.replace(
                    spec.gradients, normalizer=m.normalizer))
            except SpecValueError as error:
                skipped[m.name] = str(error)
                continue
        usable.append(m)
    return usable, skipped


def configured_name(spec: PipelineSpec, methods: Sequence[Method]) -> str:
    """Name of the method in ``methods`` that matches the pipeline's own settings."""
    configured = Method.configured(spec)
    for m in methods:
        if m.kind == "gradient" and dataclasses.replace(m, name="configured") == configured:
            return m.name
    return "configured"


def bm25_scores(doc_texts: Sequence[str], query_texts: Sequence[str]) -> np.ndarray:
    """``[q, n]`` float32 BM25 scores (bm25s defaults: Lucene BM25, k1=1.5, b=0.75)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(doc_texts), stopwords="en", show_progress=False),
                    show_progress=False)
    tokens = bm25s.tokenize(list(query_texts), stopwords="en", return_ids=False,
                            show_progress=False)
    return np.stack([retriever.get_scores(t) if t else np.zeros(len(doc_texts), np.float32)
                     for t in tokens]).astype(np.float32)


def random_scores(queries: int, docs: int, seed: int = 0) -> np.ndarray:
    """``[queries, docs]`` float32 uniform random scores (the no-information reference)."""
    return np.random.default_rng(seed).random((queries, docs), dtype=np.float32)


def with_query_loss(queries: Sequence[TokenizedDoc], query_loss: str) -> list[TokenizedDoc]:
    """``completion``: the queries as tokenized; ``full``: loss on every token but the first."""
    if query_loss not in QUERY_LOSSES:
        raise ValueError(f"query_loss must be one of {QUERY_LOSSES}, got {query_loss!r}")
    if query_loss == "completion":
        return list(queries)
    return [dataclasses.replace(q, loss_mask=[0] + [1] * (len(q.input_ids) - 1)) for q in queries]


class GradientCache:
    """Document rows of training docs and queries per (normalizer, query loss), computed once."""

    def __init__(self, model, spec: PipelineSpec, paths: PipelinePaths | None,
                 docs: Sequence[TokenizedDoc], queries: Sequence[TokenizedDoc]):
        self.model, self.spec, self.paths = model, spec, paths
        self.docs, self.queries = list(docs), list(queries)
        self._rows: dict[tuple[str, str], tuple[np.ndarray, dict]] = {}
        self._preconditioners: dict[tuple, Preconditioner] = {}
        self._covariance: dict[tuple, tuple[CurvatureCollector, CovarianceSums]] = {}
        self._eigen: dict[tuple, KroneckerEigen] = {}
        self._kronecker: dict[tuple, KroneckerPreconditioner] = {}
        self._kronecker_queries: dict[tuple, np.ndarray] = {}
        self.seconds: dict[str, float] = {}

    def _collect(self, normalizer: str, which: str, docs: list[TokenizedDoc]):
        key = (normalizer, which)
        if key not in self._rows:
            gradients = dataclasses.replace(self.spec.gradients, normalizer=normalizer,
                                            per_token=False)
            spec = dataclasses.replace(self.spec, gradients=gradients)
            collector = make_collector(self.model, spec, self.paths)
            array, info, stats = collect(collector, docs)
            self._rows[key] = (document_rows(array, info), info)
            self.seconds[f"{normalizer}/{which}"] = stats.seconds
        return self._rows[key]

    def train(self, normalizer: str) -> tuple[np.ndarray, dict]:
        """``([n, d] rows, info)`` of the training documents."""
        return self._collect(normalizer, "train", self.docs)

    def query(self, normalizer: str, query_loss: str) -> tuple[np.ndarray, dict]:
        """``([q, d] rows, info)`` of the queries under ``query_loss``."""
        return self._collect(normalizer, f"query-{query_loss}",
                             with_query_loss(self.queries, query_loss))

    def preconditioner(self, normalizer: str, query_loss: str, scoring: ScoringSpec) -> Preconditioner:
        """TrackStar's mixed, damped preconditioner, built once per setting (metric aside)."""
        key = (normalizer, query_loss, scoring.mixing, scoring.mixing_components, scoring.damping)
        if key not in self._preconditioners:
            (train, info), (query, _) = self.train(normalizer), self.query(normalizer, query_loss)
            layout = info["modules"]
            self._preconditioners[key] = trackstar_preconditioner(
                accumulate([train], layout), row_autocorrelation(query, layout), scoring,
                full_text=query_loss == "full")
        return self._preconditioners[key]


    def kronecker(self, scoring: ScoringSpec) -> KroneckerPreconditioner:
        """EK-FAC / K-FAC fitted on the training documents: covariance sums once per label
        setting (with the pipeline's ``curvature.label_samples`` draws), eigendecomposition once
        per space, EK-FAC's correction once more, damped."""
        labels = (scoring.kfac_labels, scoring.kfac_seed)
        if labels not in self._covariance:
            start = time.perf_counter()
            collector = CurvatureCollector(self.model, self.spec.gradients, *labels,
                                           label_samples=self.spec.curvature.label_samples)
            self._covariance[labels] = (collector, collector.covariance(self._pairs()))
            self.seconds["kfac covariance"] = time.perf_counter() - start
        collector, covariance = self._covariance[labels]
        space = (*labels, scoring.kfac_space)
        if space not in self._eigen:
            projection = projection_for(self.spec.gradients, scoring.kfac_space)
            self._eigen[space] = KroneckerEigen.from_covariance(covariance, projection)
        key = (scoring.preconditioner, *space, scoring.damping)
        if key not in self._kronecker:
            eigen, correction = self._eigen[space], None
            if scoring.preconditioner == "ekfac":
                start = time.perf_counter()
                correction = collector.correction(self._pairs(), eigen)
                self.seconds[f"ekfac correction ({scoring.kfac_space})"] = time.perf_counter() - start
            self._kronecker[key] = KroneckerPreconditioner(eigen, correction, scoring.damping)
        return self._kronecker[key]

    def _pairs(self) -> list[tuple[list[int], list[int]]]:
        return [(d.input_ids, d.loss_mask) for d in self.docs]

    def kronecker_query(self, query_loss: str, scoring: ScoringSpec) -> np.ndarray:
        """``[q, d]`` query rows preconditioned with EK-FAC / K-FAC and projected (no normalizer)."""
        key = (scoring.preconditioner, scoring.kfac_labels, scoring.kfac_seed, scoring.kfac_space,
               scoring.damping, query_loss)
        if key not in self._kronecker_queries:
            gradients = dataclasses.replace(self.spec.gradients, normalizer="none", per_token="none")
            collector = GradientCollector(self.model, gradients, transform=self.kronecker(scoring))
            array, info, stats = collect(collector, with_query_loss(self.queries, query_loss))
            self._kronecker_queries[key] = document_rows(array, info)
            self.seconds[f"{scoring.preconditioner}/query-{query_loss}"] = stats.seconds
        return self._kronecker_queries[key]


def gradient_scores(method: Method, cache: GradientCache, query_loss: str) -> np.ndarray:
    """``[q, n]`` scores of a gradient method (same functions as the score assets)."""
    train, info = cache.train(method.normalizer)
    scoring = method.scoring()
    if scoring.kronecker:
        if method.normalizer != "none":
            raise ValueError(f"method {method.name!r}: {scoring.preconditioner} needs normalizer 'none'")
        return QueryScorer(cache.kronecker_query(query_loss, scoring), None, None, scoring).score(train)
    query, _ = cache.query(method.normalizer, query_loss)
    trackstar = scoring.preconditioner == "trackstar"
    precond = cache.preconditioner(method.normalizer, query_loss, scoring) if trackstar else None
    return QueryScorer(query, None, precond, scoring).score(train)


def method_scores(methods: Sequence[Method], cache: GradientCache,
                  query_loss: str = "completion") -> dict[str, np.ndarray]:
    """``{name: [q, n]}`` for each method (BM25 always sees the full query text; MAGIC's
    tables hold the completion loss)."""
    out = {}
    for m in methods:
        if m.kind == "random":
            out[m.name] = random_scores(len(cache.queries), len(cache.docs))
        elif m.kind == "magic":
            out[m.name] = magic_pipeline.read_scores(cache.paths, [q.doc_id for q in cache.queries],
                                                     [d.doc_id for d in cache.docs])
        elif m.kind == "bm25":
            out[m.name] = bm25_scores([d.text for d in cache.docs], [q.text for q in cache.queries])
        else:
            out[m.name] = gradient_scores(m, cache, query_loss)
    return out
