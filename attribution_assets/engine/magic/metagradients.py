"""MAGIC metagradients: ``d query_loss(theta_T(w)) / d w`` by reverse mode through training.

For a :class:`~attribution_assets.engine.magic.training.TrainingRun` with states
``s_{t+1} = step_t(s_t, w)`` (parameters and optimizer moments) and a query loss
``f(theta_T)``, the adjoint ``a_t = df/ds_t`` runs backward::

    a_T = (df/dtheta_T, 0 for every moment),
    a_t = (d step_t / d s_t)^T a_{t+1},    dF/dw += (d step_t / d w)^T a_{t+1}

Each vector-Jacobian product is one ``torch.autograd.grad`` through a step built with
``create_graph`` (a second-order pass through the model). Segment by segment from the last:
the states of one segment are recomputed forward from its checkpoint (bit-identical to the
original run), then the segment is walked backward, so memory holds one segment's states
plus one step's graph. One reverse pass gives the metagradient of every document for one
query loss (or a sum of query losses).

Score convention: ``score_i = -dF/dw_i``: a document whose upweighting lowers the query's
loss gets a positive score (a proponent), as in every score table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from attribution_assets.engine.gradients.batching import Document
from attribution_assets.engine.magic.training import State, TrainingRun, params_of

QueryLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def sequence_loss(run: TrainingRun, queries: Sequence[Document]) -> QueryLoss:
    """``f(params)``: the summed NLL of the ``loss_mask`` tokens of every query in ``queries``
    (the attribution query loss, summed over the queries)."""
    docs = [(list(ids), list(mask)) for ids, mask in queries]
    return lambda params: run.objective.summed_losses(params, docs, range(len(docs))).sum()


def metagradient(run: TrainingRun, query_loss: QueryLoss,
                 final: State | None = None) -> tuple[torch.Tensor, dict]:
    """``dF/dw`` ``[n]`` for ``F = query_loss(params after the last step)`` at ``run.weights``,
    by reverse mode over the run's checkpoints (``final``: the last state, else loaded).
    Returns ``(metagradient, stats)`` with ``seconds`` and ``query_loss``."""
    started = time.perf_counter()
    total, marks = run.total_steps, run.checkpoints
    final = run.load(total) if final is None else final
    leaves = {k: v.detach().requires_grad_(True) for k, v in params_of(final).items()}
    loss = query_loss(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    adjoint = {k: torch.zeros_like(v) for k, v in final.items()}
    adjoint |= {f"param/{k}": g for k, g in zip(leaves, grads)}
    w_bar = torch.zeros_like(run.weights)
    for start, stop in reversed(list(zip(marks[:-1], marks[1:]))):
        states = run.segment_states(start, stop)
        for t in range(stop - 1, start - 1, -1):
            adjoint, w_step = _step_vjp(run, states.pop(), t, adjoint)
            w_bar += w_step
    return w_bar, {"seconds": round(time.perf_counter() - started, 3), "query_loss": float(loss.detach())}


def _step_vjp(run: TrainingRun, state: State, step: int, adjoint: State) -> tuple[State, torch.Tensor]:
    """``((d step/d s)^T a, (d step/d w)^T a)`` for the adjoint ``a`` of the state after ``step``."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
    weights = run.weights.detach().requires_grad_(True)
    new = run.step(leaves, step, weights, create_graph=True)
    keys = [k for k in new if new[k].requires_grad]
    inputs = list(leaves.values()) + [weights]
    grads = torch.autograd.grad([new[k] for k in keys], inputs, [adjoint[k] for k in keys],
                                allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(leaves.items(), grads)}
    return out, (torch.zeros_like(weights) if grads[-1] is None else grads[-1].detach())


def magic_scores(run: TrainingRun, queries: Sequence[Document], final: State | None = None,
                 log: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, list[dict]]:
    """``[q, n]`` float64 MAGIC scores ``-d loss_q / d w`` (one reverse pass per query), and
    each pass's stats."""
    final = run.load(run.total_steps) if final is None else final
    rows, stats = [], []
    for j, query in enumerate(queries):
        grad, info = metagradient(run, sequence_loss(run, [query]), final)
        rows.append(-grad.double().cpu().numpy())
        stats.append(info)
        log(f"magic query {j + 1}/{len(queries)}: {info['seconds']} s")
    return np.stack(rows) if rows else np.zeros((0, run.objective.n_docs)), stats
