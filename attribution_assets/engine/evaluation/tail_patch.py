"""Tail patch: does one training step on a method's top documents raise the query's answer?

TrackStar's headline metric. For each query and method, take the method's ``k`` best
training documents, do ONE training step on them from the final model and measure the
increase of the query's target log-probability ``log p(answer | prompt)`` (the sum over
the query's ``loss_mask`` tokens, the completion):

    increase(q) = log p_{θ'}(answer_q) - log p_θ(answer_q),  θ' = θ - lr · u

with ``L`` the mean next-token cross-entropy over the ``loss_mask`` tokens of the ``k``
documents as one batch (the demo's training loss) and the update ``u``:

* ``sgd`` (fresh optimizer state): ``u = ∇L``;
* ``adam`` (stored optimizer state): ``u = ∇L / (sqrt(v̂) + eps)``, ``v̂`` the stored
  ``exp_avg_sq`` bias-corrected as AdamW divides by it (``engine.gradients.normalizers``).
  The stored first moment and weight decay are left out: they move the model the same way
  whatever the documents, and the metric is about the documents.

The step is taken on a float32 copy of the trainable parameters (``torch.func``), so the
model is never modified; everything is deterministic (no dropout: eval mode). A method's
tail patch is the mean increase over queries; ``random`` documents are the no-information
reference. Cost per method: one forward/backward on ``k`` documents and one forward on the
query, per query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call

from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.spec import TAIL_PATCH_OPTIMIZERS


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """``[q, k]`` column indices of each row's ``k`` highest scores, best first (ties: lower
    index first)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _padded(docs: Sequence[TokenizedDoc], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(d.input_ids) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(docs), width), dtype=torch.long)
    targets = torch.zeros((len(docs), width), dtype=torch.bool)
    for row, d in enumerate(docs):
        n = len(d.input_ids)
        ids[row, :n] = torch.tensor(d.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(d.loss_mask, dtype=torch.bool)
    return ids.to(device), attention.to(device), targets.to(device)


def _token_log_probs(model, params: Mapping[str, torch.Tensor], docs: Sequence[TokenizedDoc],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T-1] log p of each next token, [B, T-1] target mask)`` under ``params``."""
    device = next(iter(params.values())).device
    ids, attention, targets = _padded(docs, pad_id, device)
    logits = functional_call(model, dict(params), (ids,), {"attention_mask": attention}).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return picked, targets[:, 1:]


def target_log_probs(model, params: Mapping[str, torch.Tensor], queries: Sequence[TokenizedDoc],
                     pad_id: int = 0) -> torch.Tensor:
    """``[q]`` float64 ``log p(target tokens)`` of each query (sum over its ``loss_mask``)."""
    with torch.no_grad():
        picked, mask = _token_log_probs(model, params, queries, pad_id)
    return (picked.double() * mask).sum(dim=1)


def batch_loss(model, params: Mapping[str, torch.Tensor], docs: Sequence[TokenizedDoc],
               pad_id: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over the ``loss_mask`` tokens of ``docs`` as one batch."""
    picked, mask = _token_log_probs(model, params, docs, pad_id)
    return -(picked * mask).sum() / mask.sum().clamp_min(1)


def adam_denominators(model, optimizer_state, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """``{name: sqrt(v̂) + eps}`` of every trainable parameter from a stored Adam(W) state
    (an ``optimizer.pt``, a checkpoint directory or a live optimizer)."""
    from attribution_assets.engine.gradients.normalizers import load_optimizer_state

    state = load_optimizer_state(optimizer_state, model)
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        st = state.states.get(name)
        if st is None or "exp_avg_sq" not in st:
            raise ValueError(f"the `adam` tail patch needs the stored `exp_avg_sq` of parameter {name!r}; "
                             "set `evaluation.tail_patch_optimizer: sgd` or point "
                             "`gradients.optimizer_state` at an Adam(W) optimizer state")
        v = st["exp_avg_sq"].detach().to(param.device, torch.float32)
        betas = state.hyper.get(name, {}).get("betas")
        step = float(st.get("step", torch.tensor(0.0)))
        if betas is not None and step > 0:
            v = v / (1.0 - float(betas[1]) ** step)
        out[name] = v.sqrt() + eps
    return out


class TailPatcher:
    """One-step patches of a model: ``increase(docs, queries)`` for many document sets.

    ``optimizer``: ``sgd`` or ``adam`` (then ``optimizer_state`` is required: see the module
    docstring). The model's parameters are copied once to float32 and never modified.
    """

    def __init__(self, model, lr: float, optimizer: str = "sgd", optimizer_state=None,
                 pad_id: int | None = None):
        if optimizer not in TAIL_PATCH_OPTIMIZERS:
            raise ValueError(f"tail patch optimizer must be one of {TAIL_PATCH_OPTIMIZERS}, got {optimizer!r}")
        if optimizer == "adam" and optimizer_state is None:
            raise ValueError("the `adam` tail patch needs the optimizer state: set "
                             "`gradients.optimizer_state`, or use `tail_patch_optimizer: sgd`")
        self.model, self.lr = model.eval(), float(lr)
        self.params = {n: p.detach().float() for n, p in model.named_parameters()}
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.denominators = adam_denominators(model, optimizer_state) if optimizer == "adam" else None
        config_pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = pad_id if pad_id is not None else (config_pad if config_pad is not None else 0)

    def patched(self, docs: Sequence[TokenizedDoc]) -> dict[str, torch.Tensor]:
        """The parameters after one step on ``docs`` (one batch)."""
        live = {n: self.params[n].clone().requires_grad_(True) for n in self.trainable}
        loss = batch_loss(self.model, {**self.params, **live}, docs, self.pad_id)
        grads = torch.autograd.grad(loss, [live[n] for n in self.trainable])
        out = dict(self.params)
        for name, grad in zip(self.trainable, grads, strict=True):
            update = grad if self.denominators is None else grad / self.denominators[name]
            out[name] = self.params[name] - self.lr * update
        return out

    def base(self, queries: Sequence[TokenizedDoc]) -> torch.Tensor:
        """``[q]`` target log-probabilities under the unpatched model."""
        return target_log_probs(self.model, self.params, queries, self.pad_id)

    def increase(self, docs: Sequence[TokenizedDoc], queries: Sequence[TokenizedDoc],
                 base: torch.Tensor | None = None) -> torch.Tensor:
        """``[q]`` increase of each query's target log-probability after one step on ``docs``."""
        base = self.base(queries) if base is None else base
        return target_log_probs(self.model, self.patched(docs), queries, self.pad_id) - base


def tail_patch_increases(patcher: TailPatcher, docs: Sequence[TokenizedDoc],
                         queries: Sequence[TokenizedDoc], scores: np.ndarray, k: int,
                         rows: Sequence[int] | None = None) -> np.ndarray:
    """``[len(rows)]`` float64 increase for each query row after a step on its top-``k`` docs.

    ``scores`` ``[q, n]`` (columns in ``docs`` order, rows in ``queries`` order); ``rows``:
    the query rows to patch (default every row)."""
    rows = list(range(len(queries))) if rows is None else list(rows)
    top = top_k_indices(np.asarray(scores)[rows], k)
    picked = [queries[r] for r in rows]
    base = patcher.base(picked)
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        out[i] = float(patcher.increase([docs[j] for j in top[i]], [queries[r]], base[i:i + 1])[0])
    return out


def sample_rows(n: int, count: int, seed: int = 0) -> list[int]:
    """``count`` sorted query rows drawn without replacement (every row when ``count`` is 0
    or at least ``n``)."""
    if count <= 0 or count >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())
