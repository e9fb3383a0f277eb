"""How queries score training documents (:class:`ScoringSpec`) and the FAISS index over the
training rows (:class:`IndexSpec`)."""

from __future__ import annotations

from dataclasses import dataclass

from attribution_assets.spec.checks import (
    SpecValueError,
    _check_bool,
    _check_choice,
    _check_float,
    _check_int,
    _check_str,
    _describe,
    _unquote_hint,
)

SCORE_BREAKDOWNS = ("none", "module", "head")
PRECONDITIONERS = ("trackstar", "ekfac", "kfac", "none")
KRONECKER_PRECONDITIONERS = ("ekfac", "kfac")


@dataclass(frozen=True)
class ScoringSpec:
    """How queries score training documents (``engine.preconditioning``, ``engine.scoring``).

    ``metric``: ``cosine`` (TrackStar) or ``inner_product``; ``aggregate``: score each query
    (``individual``) or a query set as one (``nearest``, ``mean``, ``sum``);
    ``preconditioner``: ``trackstar`` (the autocorrelation of the projected gradients, mixing
    ``lam R_query + (1 - lam) R_train`` with ``mixing`` ``auto`` | a number in [0, 1] |
    ``off``; ``auto`` makes the sorted eigenvalues of both terms cross at component
    ``mixing_components``: ``auto`` = 1000 for full-text queries and ``dims * 1000 / 65536``
    for prompt/completion queries, or a number >= 1), ``ekfac`` / ``kfac`` (the Kronecker-factored Gauss-Newton of
    ``preconditioning.kfac``, applied to the query side only; labels ``kfac_labels``:
    ``sampled`` from the model, seeded by ``kfac_seed`` (``curvature.label_samples`` draws per
    document), or the data's ``true`` labels; ``kfac_space``: ``projected``, the curvature of
    the projected rows, or ``full``, each full query gradient preconditioned, then projected;
    with ``gradients.include_bias`` biases join their modules' Kronecker blocks) or ``none``;
    ``damping`` times each module's mean eigenvalue is added
    before inverting. ``precondition: false`` is the older spelling of ``preconditioner:
    none``. ``mode``: ``stored`` training gradients or ``streaming`` (recomputed, never
    stored); ``top_k``: scores kept per query and shard (0 = all); ``breakdown``: also write
    each block's contribution to those scores, per ``module`` or per ``head`` (needs
    ``gradients.split: head``), summing to the score.
    ``train_rows``: ``post_hoc`` (training gradients of the final model) or ``train_time``
    (each document's rows recorded by the ``finetune`` asset, summed over the steps that saw it).
    """

    metric: str = "cosine"
    aggregate: str = "individual"
    precondition: bool = True
    preconditioner: str = "trackstar"
    damping: float = 0.1
    mixing: str | float = "auto"
    mixing_components: str | int = "auto"
    kfac_labels: str = "sampled"
    kfac_seed: int = 0
    kfac_space: str = "projected"
    mode: str = "stored"
    top_k: int = 100
    breakdown: str = "none"
    train_rows: str = "post_hoc"

    def __post_init__(self):
        _check_choice(self, "train_rows", ("post_hoc", "train_time"))
        _check_choice(self, "metric", ("cosine", "inner_product"))
        _check_choice(self, "aggregate", ("individual", "nearest", "mean", "sum"))
        _check_bool(self, "precondition")
        _check_choice(self, "preconditioner", PRECONDITIONERS)
        if not self.precondition:
            if self.preconditioner in KRONECKER_PRECONDITIONERS:
                raise SpecValueError("precondition", f"is false but `preconditioner` is "
                                                     f"{self.preconditioner!r}; drop `precondition` "
                                                     "(the older spelling) and set `preconditioner`.")
            object.__setattr__(self, "preconditioner", "none")
        object.__setattr__(self, "precondition", self.preconditioner != "none")
        _check_float(self, "damping", 0.0, note=" (relative to each module's mean eigenvalue)")
        if self.mixing is False:  # YAML 1.1 reads an unquoted `off` as false
            object.__setattr__(self, "mixing", "off")
        if not (self.mixing in ("auto", "off") or (isinstance(self.mixing, int | float)
                                                   and not isinstance(self.mixing, bool)
                                                   and 0 <= self.mixing <= 1)):
            raise SpecValueError("mixing", f"must be `auto`, `off` or a number in [0, 1] (the weight "
                                           f"of the query autocorrelation), got {_describe(self.mixing)}"
                                           f"{_unquote_hint(self.mixing)}.")
        if self.mixing_components != "auto":
            _check_int(self, "mixing_components", 1, note=", or `auto` (1000 for full-text queries, "
                                                         "dims * 1000 / 65536 for prompt/completion)")
        _check_choice(self, "kfac_labels", ("sampled", "true"))
        _check_int(self, "kfac_seed", 0)
        _check_choice(self, "kfac_space", ("projected", "full"))
        _check_choice(self, "mode", ("stored", "streaming"))
        _check_int(self, "top_k", 0, note=" (0 keeps every score)")
        _check_choice(self, "breakdown", SCORE_BREAKDOWNS)

    @property
    def kronecker(self) -> bool:
        """Whether the preconditioner is EK-FAC or K-FAC (query side, before projection)."""
        return self.preconditioner in KRONECKER_PRECONDITIONERS


@dataclass(frozen=True)
class IndexSpec:
    """FAISS index over the training gradients as scores see them (``engine.search``).

    ``factory``: a FAISS index factory string (``Flat``, ``IVF{n},Flat``, ``IVF{auto},Flat``,
    ``IVF{n},PQ{m}``, ``HNSW{M}``, ``...,SQfp16``); inner-product metric always.
    ``train_sample``: rows that train an index that needs training.
    ``max_vectors_per_index`` splits the index into parts searched together.
    ``nprobe`` (IVF) / ``ef_search`` (HNSW): an integer, or ``auto`` to choose the smallest
    value whose recall@10 against exact search reaches ``target_recall`` on the pipeline's
    own queries, measured when the index is built. ``use_gpu``: ``auto`` (when FAISS sees
    a GPU), true or false.
    """

    enabled: bool = True
    factory: str = "Flat"
    train_sample: int = 65536
    nprobe: int | str = "auto"
    ef_search: int | str = "auto"
    target_recall: float = 0.95
    max_vectors_per_index: int | None = None
    use_gpu: bool | str = "auto"
    self_recall_sample: int = 256

    def __post_init__(self):
        _check_bool(self, "enabled")
        _check_str(self, "factory", optional=False)
        _check_int(self, "train_sample", 1)
        for key in ("nprobe", "ef_search"):
            if getattr(self, key) != "auto":
                _check_int(self, key, 1, note=", or `auto` (calibrated to target_recall when the "
                                              "index is built)")
        _check_float(self, "target_recall", 0.0, 1.0, low_open=True, note=", e.g. 0.95")
        _check_int(self, "max_vectors_per_index", 1, optional=True)
        if self.use_gpu in ("true", "false"):
            object.__setattr__(self, "use_gpu", self.use_gpu == "true")
        if self.use_gpu not in ("auto", True, False) or self.use_gpu in (0, 1) and \
                not isinstance(self.use_gpu, bool):
            raise SpecValueError("use_gpu", f"must be `auto`, true or false, got {_describe(self.use_gpu)}.")
        _check_int(self, "self_recall_sample", 1)
