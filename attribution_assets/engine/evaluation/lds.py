"""Linear datamodeling score (LDS): do attribution scores predict retraining outcomes?

Protocol (Park et al. 2023, "TRAK"):

1. :func:`lds_subsets` draws ``K`` random subsets of the training corpus, a bool mask
   ``[K, n]`` (True = kept), each keeping ``round(fraction * n)`` documents.
2. :func:`retrain_partition` retrains the demo model on one subset with
   ``demo_model.train_demo_model``: same initialization, data order and number of steps
   as the full model (same ``config.seed``); removed documents get loss weight 0. A
   second retrain per subset ("seed b", :func:`retrain_seeds`) changes the data order and
   the init, or only the data order. One (subset, seed) pair is one independent job, so
   retrains run in parallel and incrementally (one Dagster partition each). It stores the
   query losses of the retrained model (:func:`query_losses`, the attribution query loss:
   summed NLL over ``loss_mask`` tokens, i.e. the completion).
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
   ``sqrt(r)`` with one retrain's loss (the classical attenuation bound). Averaging the
   losses of ``m`` seeds per subset (TRAK averages several models per subset) halves the
   noise variance at ``m = 2``: the mean's ceiling is :func:`mean_noise_ceiling`,
   ``sqrt(m r / (1 + (m - 1) r))`` (Spearman-Brown), e.g. 0.30 -> 0.41 at ``r = 0.09``.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from attribution_assets.engine.demo.model import train_demo_model
from attribution_assets.engine.gradients.batching import collate
from attribution_assets.engine.io.atomic import write_text_atomic
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.spec import LDS_SEED_B_VARIES, DemoSpec


def lds_subsets(n_docs: int, k: int, fraction: float, seed: int = 0) -> np.ndarray:
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


def subset_digest(keep: np.ndarray) -> str:
    """16 hex digits naming one subset mask ``[n]`` (its length and kept positions)."""
    keep = np.asarray(keep, dtype=bool)
    return hashlib.sha256(len(keep).to_bytes(8, "little") + np.packbits(keep).tobytes()).hexdigest()[:16]


def retrain_seeds(seed: int, seed_b_varies: str) -> dict[str, tuple[int, int]]:
    """The two retrains of every subset, ``{"seed a": (init, order), "seed b": (init, order)}``
    seeds: seed a is the attributed model's ``seed``; seed b takes ``seed + 1`` for the data
    order and, unless ``seed_b_varies == "data_order"``, for the init (``EvaluationSpec``)."""
    if seed_b_varies not in LDS_SEED_B_VARIES:
        raise ValueError(f"seed_b_varies must be one of {LDS_SEED_B_VARIES}, got {seed_b_varies!r}")
    return {"seed a": (seed, seed), "seed b": (seed if seed_b_varies == "data_order" else seed + 1, seed + 1)}


def retrain_on_subset(tokenizer, texts: Sequence[str], keep: np.ndarray, config: DemoSpec,
                      output_dir: str | Path, *, seed: int | None = None, order_seed: int | None = None,
                      log: Callable[[str], None] = lambda _: None) -> dict:
    """Train the demo model on ``texts`` with loss weight ``keep[i]`` (0/1) and save it.

    ``seed`` (default ``config.seed``) sets the initialization, ``order_seed`` (default
    ``seed``) the data order; the number of steps never depends on ``keep``. Returns the
    training metrics.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(texts),):
        raise ValueError(f"keep must be a bool mask of shape ({len(texts)},), got {keep.shape}")
    config = config if seed is None else dataclasses.replace(config, seed=seed)
    return train_demo_model(tokenizer, texts, config, output_dir, log=log, order_seed=order_seed,
                            loss_weights=keep.astype(np.float32).tolist())


def retrain_partition(tokenizer, texts: Sequence[str], keep: np.ndarray, config: DemoSpec,
                      queries: Sequence[TokenizedDoc], output_dir: str | Path, *,
                      seed: int | None = None, order_seed: int | None = None,
                      keep_model: bool = False) -> np.ndarray:
    """One LDS job: retrain on a subset, write ``output_dir/query_losses.json``, return ``[q]``.

    The model goes to ``output_dir/model`` with ``keep_model``, else to a temporary folder.
    """
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = None if keep_model else Path(tempfile.mkdtemp(prefix=".retrain-", dir=output_dir))
    target = output_dir / "model" if scratch is None else scratch / "model"
    try:
        metrics = retrain_on_subset(tokenizer, texts, keep, config, target, seed=seed, order_seed=order_seed)
        model = AutoModelForCausalLM.from_pretrained(target)
        losses = query_losses(model, queries, pad_id=tokenizer.pad_token_id or 0)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    seed = config.seed if seed is None else seed
    record = {"seed": seed, "order_seed": seed if order_seed is None else order_seed, "kept": int(np.sum(keep)),
              "subset": subset_digest(keep), "query_ids": [q.doc_id for q in queries],
              "losses": losses.tolist(), "metrics": metrics}
    write_text_atomic(output_dir / "query_losses.json", json.dumps(record))
    return losses


def read_partition_losses(paths: Sequence[str | Path], query_ids: Sequence[str] | None = None,
                          masks: np.ndarray | None = None) -> np.ndarray:
    """``[K, q]`` losses from the ``query_losses.json`` of each partition folder, in order.

    Every partition must have been retrained against the same queries, in the same order,
    as ``query_ids`` (default: the first partition's), and with ``masks`` ``[K, n]`` on the
    subset ``masks[k]`` (:func:`subset_digest`); a mismatch raises ValueError.
    """
    records = [json.loads((Path(p) / "query_losses.json").read_text()) for p in paths]
    if not records:
        raise ValueError("no LDS partitions given")
    if masks is not None and len(masks) != len(records):
        raise ValueError(f"{len(records)} LDS partitions for {len(masks)} subsets")
    expected = list(query_ids) if query_ids is not None else records[0]["query_ids"]
    for k, (path, record) in enumerate(zip(paths, records)):
        if record["query_ids"] != expected:
            raise ValueError(f"{path}: retrained against other queries than the scores "
                             f"({len(record['query_ids'])} vs {len(expected)} query ids, or another "
                             "order); re-materialize every lds_retrain partition and fact_tracing from "
                             "the same tokenized_queries")
        if masks is not None and record.get("subset") != subset_digest(masks[k]):
            raise ValueError(f"{path}: retrained on another subset than the current settings draw "
                             "(evaluation.lds_fraction, lds_subsets or lds_seed, or the corpus, changed "
                             "since); re-materialize the lds_retrain partitions")
    return np.array([r["losses"] for r in records], dtype=np.float64)


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

    ``top_k = 0`` (or ``>= n``) keeps every score. Ties at the cut go to the lower column
    index (a stable sort, as the score tables' top k).
    """
    scores = np.asarray(scores)
    if isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every score), got {top_k!r}")
    if top_k == 0 or top_k >= scores.shape[1]:
        return scores.copy()
    top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
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


def mean_noise_ceiling(agreement: float, seeds: int = 2) -> float:
    """LDS bound against the mean loss of ``seeds`` retrains per subset, from the one-seed
    ``agreement`` ``r``: ``sqrt(m r / (1 + (m - 1) r))`` (Spearman-Brown; ``r <= 0`` gives 0)."""
    r = max(0.0, float(agreement))
    return float(np.sqrt(seeds * r / (1 + (seeds - 1) * r)))


def ratio_ci(values: np.ndarray, baseline: np.ndarray, n: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """``(ratio, low, high)``: ``mean(values) / mean(baseline)`` over the queries where both
    are defined, with a paired percentile bootstrap CI (the same resampled queries for both)."""
    values, baseline = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    both = ~np.isnan(values) & ~np.isnan(baseline)
    values, baseline = values[both], baseline[both]
    if values.size == 0 or baseline.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, values.size, size=(n, values.size))
    denominators = baseline[picks].mean(axis=1)
    keep = denominators != 0  # a resample whose baseline mean is 0 has no ratio
    ratios = values[picks[keep]].mean(axis=1) / denominators[keep]
    ratio, tail = float(values.mean() / baseline.mean()), (1 - level) / 2 * 100
    if ratios.size == 0:
        return ratio, float("nan"), float("nan")
    return ratio, float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def _variant(top_k: int) -> str:
    return "all" if top_k == 0 else f"top {top_k}"


COLUMNS = ["method", "scores", "target", "lds", "ci_low", "ci_high", "ratio", "ratio_low",
           "ratio_high", "queries"]


def lds_table(scores_by_method: Mapping[str, np.ndarray], masks: np.ndarray, losses: np.ndarray,
              losses_seed_b: np.ndarray | None = None, top_k: Sequence[int] = (0,),
              references: Mapping[str, np.ndarray] | None = None, baseline: str | None = None,
              n_boot: int = 1000, seed: int = 0) -> tuple[pl.DataFrame, str]:
    """Mean LDS with a bootstrap 95% CI per method, score variant and retrain seed.

    ``losses`` ``[K, q]`` are the retrains with the attributed model's seed (``target``
    "seed a"), ``losses_seed_b`` another seed on the same subsets ("seed b"): scores come
    from the seed-a model, so LDS against seed b shows that they predict the subset's
    effect, not seed a's own noise. ``top_k``: the variants, 0 = every score, ``k`` = each
    query's top ``k``. ``references``: ``[q, n]`` predictors scored with every score only
    (e.g. :func:`gold_indicator`). ``baseline``: a method name; every row gets
    ``ratio`` = its LDS / the baseline's (same variant and target) with a paired bootstrap
    CI (:func:`ratio_ci`). With ``losses_seed_b``, a third target, ``mean of seeds`` (the
    two seeds' losses averaged per subset: less retraining noise, a higher ceiling), and
    three rows more: ``seed agreement``, ``noise ceiling`` (its square root: the bound
    against one seed) and ``noise ceiling, mean of seeds`` (:func:`mean_noise_ceiling`).

    Long frame columns: ``method, scores, target, lds, ci_low, ci_high, ratio, ratio_low,
    ratio_high, queries`` (queries with a defined correlation), ``subsets``. The Markdown
    has one wide table per target (a method per row, a variant per column), the ratios to
    the baseline, and the noise figures. Returns ``(frame, markdown)``.
    """
    top_k = list(dict.fromkeys(top_k))
    if not top_k or any(isinstance(k, bool) or k < 0 for k in top_k):
        raise ValueError(f"top_k must be a non-empty list of ints >= 0 (0 = every score), got {top_k}")
    if baseline is not None and baseline not in scores_by_method:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {sorted(scores_by_method)}")
    targets = {"seed a": losses}
    if losses_seed_b is not None:
        targets |= {"seed b": losses_seed_b, "mean of seeds": (np.asarray(losses) + losses_seed_b) / 2}
    predictors = [(name, s, k) for name, s in scores_by_method.items() for k in top_k]
    predictors += [(name, s, 0) for name, s in (references or {}).items()]
    rows = []
    for target, target_losses in targets.items():
        per_query = {(name, k): linear_datamodeling_score(s, masks, target_losses, top_k=k)
                     for name, s, k in predictors}
        for name, _, k in predictors:
            values = per_query[(name, k)]
            base = per_query.get((baseline, k))
            ratio = ratio_ci(values, base, n_boot, seed) if base is not None else (np.nan,) * 3
            rows.append((name, _variant(k), target, *bootstrap_ci(values, n_boot, seed), *ratio,
                         int(np.sum(~np.isnan(values)))))
    if losses_seed_b is not None:
        values = seed_agreement(losses, losses_seed_b)
        mean, lo, hi = bootstrap_ci(values, n_boot, seed)
        count = int(np.sum(~np.isnan(values)))
        nan3 = (np.nan,) * 3
        rows.append(("seed agreement (seed a vs b)", "-", "-", mean, lo, hi, *nan3, count))
        root = [float(np.sqrt(max(0.0, v))) for v in (mean, lo, hi)]
        rows.append(("noise ceiling (sqrt of agreement)", "-", "-", *root, *nan3, count))
        rows.append(("noise ceiling, mean of seeds (Spearman-Brown)", "-", "-",
                     *(mean_noise_ceiling(v) for v in (mean, lo, hi)), *nan3, count))
    frame = pl.DataFrame(rows, schema=COLUMNS, orient="row", infer_schema_length=None)
    frame = frame.with_columns(pl.lit(masks.shape[0]).alias("subsets"))
    return frame, _markdown(frame, [_variant(k) for k in top_k], baseline)


def _cell(mean: float, lo: float, hi: float, suffix: str = "") -> str:
    return "" if np.isnan(mean) else f"{mean:.3f}{suffix} ({lo:.3f} to {hi:.3f})"


def _wide(frame: pl.DataFrame, variants: list[str], columns: tuple[str, str, str], suffix: str,
          title: str) -> list[str]:
    cells: dict[str, dict[str, str]] = {}
    for row in frame.iter_rows(named=True):
        cells.setdefault(row["method"], {})[row["scores"]] = _cell(*(row[c] for c in columns), suffix)
    header = ["method"] + [f"{v} scores" if v == "all" else v for v in variants]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name] + [row.get(v, "") for v in variants]) + " |"
              for name, row in cells.items() if any(row.values())]
    return lines + [""]


def _markdown(frame: pl.DataFrame, variants: list[str], baseline: str | None) -> str:
    """Wide tables: LDS per target, ratios to the baseline (seed a), then the noise figures."""
    lines = []
    for target in ("seed a", "seed b", "mean of seeds"):
        part = frame.filter(pl.col("target") == target)
        if part.height:
            against = "the mean loss of both seeds' retrains" if target == "mean of seeds" else \
                f"the {target} retrains"
            lines += _wide(part, variants, ("lds", "ci_low", "ci_high"), "",
                           f"LDS (95% CI) against {against}:")
            if baseline is not None and target == "seed a":
                lines += _wide(part, variants, ("ratio", "ratio_low", "ratio_high"), "x",
                               f"Ratio to {baseline} against the seed a retrains (paired bootstrap 95% CI):")
    for row in frame.filter(pl.col("target") == "-").iter_rows(named=True):
        lines.append(f"* {row['method']}: {_cell(row['lds'], row['ci_low'], row['ci_high'])}")
    return "\n".join(lines).rstrip() + "\n"
