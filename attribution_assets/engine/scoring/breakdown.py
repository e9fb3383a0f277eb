"""Score breakdowns (``scoring.breakdown``): each module's or head's exact share of a score.

Every score is a dot product of prepared rows, ``s = <q̂, t̂>`` (``scorer``): cosine,
``q̂ = normalize(P^{-1/2} g_q)`` and ``t̂ = normalize(P^{-1/2} g_t)``; inner product,
``q̂ = P^{-1} g_q`` (unit-normalized for mean/sum) and ``t̂ = g_t``. Splitting the columns into
*groups* (a layout entry: a whole module or, with ``gradients.split: head``, one head's block;
or all entries of one module) gives ``s = sum_g <q̂_g, t̂_g>``: group ``g``'s contribution is the
dot product restricted to its columns, and the contributions add up to the score. The
preconditioner is block-diagonal per layout entry, so ``q̂_g`` depends on group ``g``'s gradient
columns only (cosine: up to the row's one normalization, which all groups share); contributions
are exact, not attributions by approximation. ``aggregate: nearest`` scores a document by its
best query row; its contributions are those of that row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from attribution_assets.engine.gradients.heads import block_labels
from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    as_float32_tensor,
)
from attribution_assets.engine.scoring.scorer import prepare_train

LEVELS = ("module", "head")
_PAIR_BUDGET = 1 << 24  # floats of [q, chunk] products formed at once


class Group(NamedTuple):
    """Columns ``[start, stop)`` of one module (``head`` None) or one head block."""

    module: str
    layer: int | None
    head: int | None
    kind: str | None
    start: int
    stop: int


def breakdown_groups(layout: Sequence[Mapping], level: str) -> list[Group]:
    """The groups of a store layout (``info["modules"]``) at ``level`` ``module`` or ``head``.

    ``head``: one group per layout entry (whole modules that are not split stay one group);
    ``module``: the blocks of each module merged (they are contiguous).
    """
    if level not in LEVELS:
        raise ValueError(f"breakdown level must be one of {LEVELS}, got {level!r}")
    groups: list[Group] = []
    for entry in layout:
        module, layer, head, kind = block_labels(entry)
        if level == "module" and groups and groups[-1].module == module:
            groups[-1] = groups[-1]._replace(stop=int(entry["stop"]))
        elif level == "module":
            groups.append(Group(module, layer, None, None, int(entry["start"]), int(entry["stop"])))
        else:
            groups.append(Group(module, layer, head, kind, int(entry["start"]), int(entry["stop"])))
    if level == "head" and all(g.head is None for g in groups):
        raise ValueError("a head breakdown needs per-head gradient blocks, and this store has none: "
                         "set `gradients.split: head` (or `scoring.breakdown: module`)")
    return groups


def contributions(prepared: np.ndarray, train: np.ndarray, preconditioner: Preconditioner | None,
                  metric: str, groups: Sequence[Group], pair_rows: np.ndarray, pair_docs: np.ndarray,
                  *, nearest: bool = False, device: str | torch.device | None = None) -> np.ndarray:
    """``[P, G]`` float32: pair ``i``'s contribution of each group, ``<q̂_g, t̂_g>`` of prepared
    query row ``pair_rows[i]`` and training row ``pair_docs[i]`` (``train [n, d]``, raw rows as
    ``score_prepared`` takes them). ``nearest``: ``pair_rows`` are ignored and each pair uses the
    query row with the highest score for its document (the ``nearest`` aggregate's score)."""
    device = torch.device(device or "cpu")
    q = as_float32_tensor(prepared, device)
    pair_rows, pair_docs = np.asarray(pair_rows, np.int64), np.asarray(pair_docs, np.int64)
    out = np.zeros((len(pair_docs), len(groups)), dtype=np.float32)
    order = np.argsort(pair_docs, kind="stable")
    sorted_docs = pair_docs[order]
    chunk = max(1, _PAIR_BUDGET // max(1, q.shape[0]))
    for start in range(0, train.shape[0], chunk):
        lo, hi = np.searchsorted(sorted_docs, [start, start + chunk])
        if lo == hi:
            continue
        picked = order[lo:hi]
        t = torch.from_numpy(prepare_train(train[start:start + chunk], preconditioner, metric, device=device))
        t = t.to(device)
        cols = torch.from_numpy(pair_docs[picked] - start).to(device)
        rows = (q @ t.T).argmax(dim=0)[cols] if nearest else torch.from_numpy(pair_rows[picked]).to(device)
        for g, group in enumerate(groups):
            block = q[:, group.start:group.stop] @ t[:, group.start:group.stop].T
            out[picked, g] = block[rows, cols].cpu().numpy()
    return out
