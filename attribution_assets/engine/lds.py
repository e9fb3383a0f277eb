"""Linear datamodeling score (LDS): do attribution scores predict retraining outcomes?

Protocol (Park et al. 2023, "TRAK"):

1. :func:`lds_subsets` draws ``K`` random subsets of the training corpus, a bool mask
   ``[K, n]`` (True = kept), each keeping ``round(fraction * n)`` documents.
2. :func:`retrain_partition` retrains the demo model on one subset with
   ``demo_model.train_demo_model``: same initialization, data order and number of steps
   as the full model (same ``config.seed``); removed documents get loss weight 0. One
   (subset, seed) pair is one independent job, so retrains run in parallel and
   incrementally (one Dagster partition each). It stores the query losses of the
   retrained model (:func:`query_losses`, the attribution query loss: summed NLL over
   ``loss_mask`` tokens, i.e. the completion).
3. :func:`linear_datamodeling_score`: per query ``q``, the Spearman correlation over the
   ``K`` subsets between the predicted effect ``sum_{i kept} score[q, i]`` and the
   measured ``-loss[k, q]``. Sign: a higher score means the document supports the query,
   so keeping it should LOWER the query loss; correlating with the negated loss makes a
   good method score positive. With ``top_k`` only each query's ``top_k`` highest scores
   enter the sum (the rest count as 0), as in a score table that keeps the top ``k``.
4. :func:`bootstrap_ci` over queries. Retraining noise: :func:`seed_agreement` is the
   mean per-query Spearman ``r`` between the losses of two retrain seeds on the same
   subsets; :func:`noise_ceiling` is ``sqrt(r)``. If each retrain's loss is a systematic
   effect of the subset plus independent seed noise, ``r`` is the share of the variance
   that is systematic, and no predictor (which cannot see the noise) can correlate above
   ``sqrt(r)`` with one retrain's loss (the classical attenuation bound).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy import stats

from .atomic import write_text_atomic
from .batching import collate
from .data import TokenizedDoc
from .demo_model import DemoModelConfig, train_demo_model


def lds_subsets(n_docs: int, k: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[k, n_docs]`` bool masks, each keeping exactly ``round(fraction * n_docs)`` documents."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    keep = int(round(fraction * n_docs))
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, n_docs), dtype=bool)
    for row in masks:
        row[rng.permutation(n_docs)[:keep]] = True
    return masks


@torch.no_grad()
def query_losses(model: torch.nn.Module, queries: Sequence[TokenizedDoc], pad_id: int = 0,
                 batch_size: int = 64) -> np.ndarray:
    """``[q]`` float64: per query, the summed NLL of its ``loss_mask`` tokens (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    docs = [(q.input_ids, q.loss_mask) for q in queries]
    out = np.zeros(len(docs), dtype=np.float64)
    for start in range(0, len(docs), batch_size):
        batch = collate(docs, range(start, min(start + batch_size, len(docs))), pad_id, device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        out[batch.indices] = (nll * batch.loss_mask[:, 1:]).sum(dim=1).cpu().numpy()
    return out


def retrain_on_subset(tokenizer, texts: Sequence[str], keep: np.ndarray, config: DemoModelConfig,
                      output_dir: str | Path, *, seed: int | None = None,
                      log: Callable[[str], None] = lambda _: None) -> dict:
    """Train the demo model on ``texts`` with loss weight ``keep[i]`` (0/1) and save it.

    ``seed`` (default ``config.seed``) sets both the initialization and the data order;
    the number of steps never depends on ``keep``. Returns the training metrics.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(texts),):
        raise ValueError(f"keep must be a bool mask of shape ({len(texts)},), got {keep.shape}")
    config = config if seed is None else dataclasses.replace(config, seed=seed)
    return train_demo_model(tokenizer, texts, config, output_dir, log=log,
                            loss_weights=keep.astype(np.float32).tolist())


def retrain_partition(tokenizer, texts: Sequence[str], keep: np.ndarray, config: DemoModelConfig,
                      queries: Sequence[TokenizedDoc], output_dir: str | Path, *,
                      seed: int | None = None, keep_model: bool = False) -> np.ndarray:
    """One LDS job: retrain on a subset, write ``output_dir/query_losses.json``, return ``[q]``.

    The model goes to ``output_dir/model`` with ``keep_model``, else to a temporary folder.
    """
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = None if keep_model else Path(tempfile.mkdtemp(prefix=".retrain-", dir=output_dir))
    target = output_dir / "model" if scratch is None else scratch / "model"
    try:
        metrics = retrain_on_subset(tokenizer, texts, keep, config, target, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(target)
        losses = query_losses(model, queries, pad_id=tokenizer.pad_token_id or 0)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    record = {"seed": config.seed if seed is None else seed, "kept": int(np.sum(keep)),
              "query_ids": [q.doc_id for q in queries], "losses": losses.tolist(), "metrics": metrics}
    write_text_atomic(output_dir / "query_losses.json", json.dumps(record))
    return losses


def read_partition_losses(paths: Sequence[str | Path]) -> np.ndarray:
    """``[K, q]`` losses from the ``query_losses.json`` of each partition folder, in order."""
    return np.array([json.loads((Path(p) / "query_losses.json").read_text())["losses"]
                     for p in paths], dtype=np.float64)


def per_query_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[q]``: Spearman correlation of columns ``x[:, j]`` and ``y[:, j]`` (NaN if constant)."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"need two [K, q] arrays of the same shape, got {x.shape} and {y.shape}")
    out = np.full(x.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for j in range(x.shape[1]):
            out[j] = stats.spearmanr(x[:, j], y[:, j]).statistic
    return out


def keep_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """``[q, n]`` copy of ``scores`` with all but each row's ``top_k`` highest set to 0.

    ``top_k = 0`` (or ``>= n``) keeps every score. Ties at the cut are broken by position.
    """
    scores = np.asarray(scores)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every score), got {top_k}")
    if top_k == 0 or top_k >= scores.shape[1]:
        return scores.copy()
    top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
    out = np.zeros_like(scores)
    np.put_along_axis(out, top, np.take_along_axis(scores, top, axis=1), axis=1)
    return out


def gold_indicator(query_ids: Sequence[str], doc_ids: Sequence[str],
                   gold: Mapping[str, Sequence[str]]) -> np.ndarray:
    """``[q, n]`` float64: 1 where the document is one of the query's gold documents.

    A reference "method" for LDS: the predicted effect is the number of gold documents kept.
    """
    column = {d: j for j, d in enumerate(doc_ids)}
    out = np.zeros((len(query_ids), len(doc_ids)))
    for row, qid in enumerate(query_ids):
        out[row, [column[d] for d in gold.get(qid, ()) if d in column]] = 1.0
    return out


def linear_datamodeling_score(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray,
                              top_k: int = 0) -> np.ndarray:
    """Per-query LDS ``[q]`` from ``scores [q, n]``, ``masks [K, n]`` and ``losses [K, q]``.

    Predicted effect ``[K, q] = masks @ scores.T`` (sum of the kept documents' scores, only
    each query's ``top_k`` highest when ``top_k > 0``), correlated with ``-losses`` (see
    the module docstring for the sign).
    """
    scores, masks, losses = np.asarray(scores), np.asarray(masks), np.asarray(losses)
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes do not fit: scores {scores.shape} [q, n], masks {masks.shape} "
                         f"[K, n], losses {losses.shape} [K, q]")
    kept = keep_top_k(scores, top_k).astype(np.float64)
    predicted = masks.astype(np.float64) @ kept.T
    return per_query_spearman(predicted, -losses)


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap CI of the mean over the non-NaN values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def seed_agreement(losses_a: np.ndarray, losses_b: np.ndarray) -> np.ndarray:
    """``[q]``: per-query Spearman between two retrain seeds' losses ``[K, q]`` on the same subsets."""
    return per_query_spearman(np.asarray(losses_a), np.asarray(losses_b))


def noise_ceiling(losses_a: np.ndarray, losses_b: np.ndarray) -> float:
    """``sqrt(max(0, mean seed agreement))``: the LDS bound set by retraining noise."""
    return float(np.sqrt(max(0.0, np.nanmean(seed_agreement(losses_a, losses_b)))))


def _variant(top_k: int) -> str:
    return "all" if top_k == 0 else f"top {top_k}"


def lds_table(scores_by_method: Mapping[str, np.ndarray], masks: np.ndarray, losses: np.ndarray,
              losses_seed_b: np.ndarray | None = None, top_k: Sequence[int] = (0,),
              references: Mapping[str, np.ndarray] | None = None, n_boot: int = 1000,
              seed: int = 0) -> tuple[pl.DataFrame, str]:
    """Mean LDS with a bootstrap 95% CI per method and score variant, plus noise rows.

    ``top_k``: the variants, 0 = every score, ``k`` = each query's top ``k`` scores.
    ``references``: ``[q, n]`` predictors scored with every score only (e.g.
    :func:`gold_indicator`). With ``losses_seed_b``, two more rows: ``seed agreement``
    (mean per-query Spearman of the two seeds' losses, with its CI) and ``noise ceiling``
    (its square root, CI bounds likewise).

    Long frame columns: ``method, scores, lds, ci_low, ci_high, queries`` (queries with a
    defined correlation), ``subsets``. The Markdown is wide: one row per method, one
    ``LDS (95% CI)`` column per variant. Returns ``(frame, markdown)``.
    """
    top_k = list(dict.fromkeys(top_k))
    if not top_k or any(k < 0 for k in top_k):
        raise ValueError(f"top_k must be a non-empty list of ints >= 0 (0 = every score), got {top_k}")
    rows = []
    for name, scores in scores_by_method.items():
        for k in top_k:
            per_query = linear_datamodeling_score(scores, masks, losses, top_k=k)
            rows.append((name, _variant(k), *bootstrap_ci(per_query, n_boot, seed),
                         int(np.sum(~np.isnan(per_query)))))
    for name, scores in (references or {}).items():
        per_query = linear_datamodeling_score(scores, masks, losses)
        rows.append((name, "all", *bootstrap_ci(per_query, n_boot, seed),
                     int(np.sum(~np.isnan(per_query)))))
    if losses_seed_b is not None:
        per_query = seed_agreement(losses, losses_seed_b)
        mean, lo, hi = bootstrap_ci(per_query, n_boot, seed)
        count = int(np.sum(~np.isnan(per_query)))
        rows.append(("seed agreement (seed a vs b)", "-", mean, lo, hi, count))
        root = [float(np.sqrt(max(0.0, v))) for v in (mean, lo, hi)]
        rows.append(("noise ceiling (sqrt of agreement)", "-", *root, count))
    frame = pl.DataFrame(rows, schema=["method", "scores", "lds", "ci_low", "ci_high", "queries"],
                         orient="row", infer_schema_length=None)
    frame = frame.with_columns(pl.lit(masks.shape[0]).alias("subsets"))
    return frame, _wide_markdown(frame, [_variant(k) for k in top_k])


def _wide_markdown(frame: pl.DataFrame, variants: list[str]) -> str:
    """One row per method; a ``LDS (95% CI)`` cell per score variant."""
    cells: dict[str, dict[str, str]] = {}
    for name, variant, mean, lo, hi in frame.select("method", "scores", "lds", "ci_low",
                                                    "ci_high").iter_rows():
        text = "nan" if np.isnan(mean) else f"{mean:.3f} ({lo:.3f} to {hi:.3f})"
        cells.setdefault(name, {})[variants[0] if variant == "-" else variant] = text
    header = ["method"] + [f"LDS, {v} scores" if v == "all" else f"LDS, {v}" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name] + [row.get(v, "") for v in variants]) + " |"
              for name, row in cells.items()]
    return "\n".join(lines) + "\n"
