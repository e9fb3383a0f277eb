"""Quality evaluation settings (LDS, tail patch): :class:`EvaluationSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from attribution_assets.spec.checks import (
    SpecValueError,
    _check_choice,
    _check_float,
    _check_int,
    _describe,
)

TAIL_PATCH_OPTIMIZERS = ("sgd", "adam")
LDS_SEED_B_VARIES = ("init_and_data_order", "data_order")


@dataclass(frozen=True)
class EvaluationSpec:
    """Quality evaluation (``engine.evaluation``): LDS subsets for the demo.

    ``lds_subsets`` subsets each keep a share ``lds_fraction`` (in (0, 1)) of the documents.
    0.25, not TRAK's 0.5: the demo states every fact in 12 documents, so half a corpus keeps
    about 6 of them and teaches the fact whatever the subset; a quarter keeps about 3, and
    which ones decides more of the query loss than the retraining seed does (two seeds agree
    nearly twice as well; ``docs/evaluation.md``).

    ``lds_top_k``: the LDS is reported for each of these score variants: 0 = every
    document's score enters the predicted effect; ``k`` = only each query's ``k`` highest
    (100 is what a score table keeps by default, 10 the recall@10 cut).

    Every subset is retrained twice: "seed a" with the demo model's own init and data
    order, "seed b" with the data order of ``seed + 1`` and, with ``lds_seed_b_varies:
    init_and_data_order``, its initialization too (``data_order`` keeps the demo's init,
    as retrains fine-tuned from one pretrained model do). The seed b retrains measure the
    retraining noise and so the LDS noise ceiling (``engine.evaluation.lds``).

    Tail patch (``engine.evaluation.tail_patch``): per query, one training step from the
    final model on a method's ``tail_patch_k`` best documents (0 = no tail patch) with
    learning rate ``tail_patch_lr`` and ``tail_patch_optimizer`` ``sgd`` (fresh state: plain
    gradient step) or ``adam`` (the stored optimizer's second moments, no momentum); the
    mean increase of the answer's log-probability over ``tail_patch_queries`` queries (a
    seeded sample; 0 = every query).
    """

    lds_subsets: int = 32
    lds_fraction: float = 0.25
    lds_seed: int = 0
    lds_top_k: tuple[int, ...] = (0, 100, 10)
    lds_seed_b_varies: str = "init_and_data_order"
    tail_patch_k: int = 10
    tail_patch_lr: float = 0.1
    tail_patch_optimizer: str = "sgd"
    tail_patch_queries: int = 100

    def __post_init__(self):
        _check_int(self, "lds_subsets", 1)
        _check_float(self, "lds_fraction", 0.0, 1.0, low_open=True, high_open=True,
                     note=" (the share of documents each subset keeps: at 1 every subset is the whole "
                          "corpus and the LDS is undefined), e.g. 0.25")
        _check_int(self, "lds_seed", 0)
        _check_choice(self, "lds_seed_b_varies", LDS_SEED_B_VARIES)
        _check_int(self, "tail_patch_k", 0)
        _check_float(self, "tail_patch_lr", 0.0, low_open=True)
        _check_choice(self, "tail_patch_optimizer", TAIL_PATCH_OPTIMIZERS)
        _check_int(self, "tail_patch_queries", 0)
        if isinstance(self.lds_top_k, list):
            object.__setattr__(self, "lds_top_k", tuple(self.lds_top_k))
        if not isinstance(self.lds_top_k, tuple) or not self.lds_top_k or any(
                isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.lds_top_k):
            raise SpecValueError("lds_top_k", f"must be a non-empty list of integers >= 0 (0 = every "
                                              f"score), got {_describe(self.lds_top_k)}.")
