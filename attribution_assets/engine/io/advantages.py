"""GRPO / Dr. GRPO advantages and per-sequence loss weights (``DataSpec.advantage_weighting``).

- Advantages: ``advantage_column`` gives them as they are; ``reward_column`` (+ ``group_column``:
  the prompt group each completion belongs to; without it the whole corpus is one group) turns
  rewards ``r`` into group-normalized advantages: GRPO ``(r - mean_g) / (std_g + 1e-4)`` (``std``
  with ``ddof=1``, 0 for a group of one; as TRL's ``GRPOTrainer``) and Dr. GRPO ``r - mean_g``
  (Liu et al. 2025 drop the std division). Non-finite rewards (or advantages) take no part in
  their group's statistics and get a NaN advantage: ``nan_rewards: skip`` drops those documents
  (the corpus asset counts them), ``error`` refuses the corpus.
- Sequence weight ``w_b`` of a document with advantage ``A_b`` and ``n_b`` target tokens:
  ``A_b / n_b`` for ``grpo`` (each sequence's loss divided by its length), ``A_b`` for
  ``dr_grpo``, 1 for ``none``. Training minimizes ``sum_b w_b S_b`` (``S_b``: the summed token
  loss, i.e. ``-A log p`` per token for policy gradients) and a document's gradient row is
  ``w_b`` times the gradient of ``S_b``, so a higher score still means "training on this
  document, weighted as the optimizer weighted it, lowers the query's loss" (a proponent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GRPO_EPS = 1e-4


class AdvantageError(ValueError):
    """Rewards or advantages cannot be used as configured; the message names the fix."""


def group_advantages(rewards: Sequence[float], groups: Sequence[str] | None, weighting: str) -> np.ndarray:
    """Group-normalized advantages ``[n]`` (NaN where the reward is not finite): one hash
    group-by over the completions (``polars``), O(n) after reading ``groups``; the mean, then the
    ``ddof=1`` standard deviation of the deviations from it, over each group's finite rewards."""
    import polars as pl

    r = np.asarray(rewards, dtype=np.float64)
    if groups is not None and len(groups) != len(r):
        raise AdvantageError(f"{len(groups)} groups for {len(r)} rewards")
    if not len(r):
        return np.zeros(0)
    keys = pl.Series("group", groups if isinstance(groups, np.ndarray) else list(groups)) \
        if groups is not None else pl.Series("group", np.zeros(len(r), dtype=np.int8))
    reward = pl.Series("reward", np.where(np.isfinite(r), r, np.nan)).fill_nan(None)  # null: no part
    frame = pl.DataFrame([keys, reward]).with_columns(
        centered=pl.col("reward") - pl.col("reward").mean().over("group"))
    if weighting != "dr_grpo":
        spread = (pl.col("centered") ** 2).sum().over("group")
        count = pl.col("centered").count().over("group")
        std = pl.when(count > 1).then((spread / (count - 1)).sqrt()).otherwise(0.0)
        frame = frame.with_columns(centered=pl.col("centered") / (std + GRPO_EPS))
    return frame["centered"].to_numpy().astype(np.float64)


def sequence_weights(advantages: Sequence[float], target_counts: Sequence[int], weighting: str) -> np.ndarray:
    """``w_b`` per sequence (see the module docstring); ``none`` gives ones."""
    n = np.asarray(target_counts, dtype=np.float64)
    if weighting == "none":
        return np.ones(len(n))
    a = np.asarray(advantages, dtype=np.float64)
    if len(a) != len(n):
        raise AdvantageError(f"{len(a)} advantages for {len(n)} sequences")
    if not np.isfinite(a).all():
        raise AdvantageError("a sequence has no finite advantage; drop it (`nan_rewards: skip`) first")
    if weighting == "grpo":
        if (n <= 0).any():
            raise AdvantageError("a sequence has no target tokens, so GRPO cannot divide by its length")
        return a / n
    if weighting == "dr_grpo":
        return a
    raise AdvantageError(f"advantage_weighting must be none, grpo or dr_grpo, got {weighting!r}")


def finite(value) -> bool:
    """Whether a reward cell holds a finite number (None, strings and NaN do not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
