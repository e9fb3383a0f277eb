"""The opt-in sections that train a model: :class:`MagicSpec` (a deterministic run for
metagradients) and :class:`FinetuneSpec` (a Trainer run recording train-time rows)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from attribution_assets.spec.checks import (
    SpecValueError,
    _check_bool,
    _check_choice,
    _check_float,
    _check_int,
)
from attribution_assets.spec.demo import DemoSpec

MAGIC_OPTIMIZERS = ("adamw", "sgd")
MAGIC_SCHEDULES = ("cosine", "linear", "constant")
MAGIC_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class MagicSpec:
    """MAGIC: exact metagradients of query losses through a deterministic training run
    (``engine.magic``); opt-in, since it retrains the model.

    The run: the demo model from its seeded init (other pipelines: from the pipeline model's
    weights) on the pipeline's tokenized documents, no dropout, one seeded shuffle per epoch,
    ``optimizer`` ``adamw`` (``beta1``, ``beta2``, ``eps``, decoupled ``weight_decay``) or
    ``sgd`` (``momentum``, L2 ``weight_decay``), learning rate ``lr`` with ``warmup_steps``
    linear warmup then ``schedule`` decay (``cosine`` or ``linear`` to 0, or ``constant``).
    ``lr``, ``weight_decay``, ``warmup_steps``, ``batch_size``, ``epochs`` and ``seed`` left
    null take the demo's values (:meth:`resolved`). A checkpoint every ``checkpoint_every``
    steps bounds the reverse pass's memory to one segment; ``query_batch_size`` queries per
    ``magic_scores`` partition; ``dtype`` of the run (float64 for exactness tests).
    """

    enabled: bool = False
    optimizer: str = "adamw"
    schedule: str = "cosine"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    seed: int | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    checkpoint_every: int = 50
    query_batch_size: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        _check_bool(self, "enabled")
        _check_choice(self, "optimizer", MAGIC_OPTIMIZERS)
        _check_choice(self, "schedule", MAGIC_SCHEDULES)
        _check_choice(self, "dtype", MAGIC_DTYPES)
        if self.lr is not None:
            _check_float(self, "lr", 0.0, low_open=True)
        if self.weight_decay is not None:
            _check_float(self, "weight_decay", 0.0)
        for key in ("batch_size", "epochs"):
            _check_int(self, key, 1, optional=True)
        for key in ("warmup_steps", "seed"):
            _check_int(self, key, 0, optional=True)
        _check_float(self, "momentum", 0.0, 1.0, note=" (0 = plain SGD)")
        for key in ("beta1", "beta2"):
            _check_float(self, key, 0.0, 1.0)
            if getattr(self, key) >= 1:
                raise SpecValueError(key, f"must be below 1, got {getattr(self, key)!r}.")
        _check_float(self, "eps", 0.0, low_open=True)
        _check_int(self, "checkpoint_every", 1, note=" (steps per replay segment)")
        _check_int(self, "query_batch_size", 1, note=" (queries per magic_scores partition)")

    def resolved(self, demo: DemoSpec | None) -> MagicSpec:
        """This spec with every null training setting taken from ``demo`` (or ``DemoSpec()``)."""
        demo = demo or DemoSpec()
        return dataclasses.replace(self, **{k: getattr(demo, k) for k in MAGIC_FROM_DEMO
                                            if getattr(self, k) is None})


MAGIC_FROM_DEMO = ("lr", "weight_decay", "warmup_steps", "batch_size", "epochs", "seed")


FINETUNE_OPTIMIZERS = ("adamw", "adafactor")
RECORD_DROPOUT = ("step", "off")


@dataclass(frozen=True)
class FinetuneSpec:
    """Opt-in fine-tuning (``engine.training.finetune``): a ``transformers.Trainer`` trains the
    pipeline's model on its tokenized corpus with ``AttributionCallback`` recording train-time
    gradient rows (the ``gradients`` settings, normalized by the live optimizer's state), one
    shard per ``steps_per_shard`` optimizer steps. Later assets use the fine-tuned model.
    ``optimizer``: ``adamw`` (``torch.optim.AdamW``) or ``adafactor`` (transformers'; no relative
    step); ``epochs``, ``batch_size`` (sequences per micro-batch), ``gradient_accumulation_steps``,
    ``learning_rate`` (constant after ``warmup_steps`` linear warm-up), ``weight_decay``, ``seed``.
    ``record_dropout``: ``step`` (rows with each step's own dropout masks: what the optimizer saw;
    they differ from post-hoc rows when the model has dropout, and reading them back warns) or
    ``off`` (rows from one more forward and backward per micro-batch without dropout, at the
    same parameters: comparable with post-hoc rows; the training is unchanged).
    """

    epochs: int = 1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    steps_per_shard: int = 100
    record_dropout: str = "step"

    def __post_init__(self):
        for key in ("epochs", "batch_size", "gradient_accumulation_steps", "steps_per_shard"):
            _check_int(self, key, 1)
        for key in ("warmup_steps", "seed"):
            _check_int(self, key, 0)
        _check_float(self, "learning_rate", 0.0, low_open=True)
        _check_float(self, "weight_decay", 0.0)
        _check_choice(self, "optimizer", FINETUNE_OPTIMIZERS)
        if self.record_dropout is False:  # YAML reads an unquoted `off` as false
            object.__setattr__(self, "record_dropout", "off")
        _check_choice(self, "record_dropout", RECORD_DROPOUT)
