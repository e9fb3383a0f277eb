"""Deterministic training with bit-identical replay: the run that MAGIC differentiates.

The run (settings: a resolved :class:`~attribution_assets.spec.MagicSpec`):

* **Data order**: one seeded permutation of the ``n`` documents per epoch, cut into batches
  of ``batch_size`` (``demo.model.data_order``); it never depends on the weights.
* **Loss of step t** over its batch ``B_t``, per-document weights ``w`` (default 1)::

      L_t(theta, w) = sum_{i in B_t} w_i * sum_j l_ij(theta) / N_t,   N_t = sum_{i in B_t} n_i

  ``l_ij`` the next-token NLL of document ``i``'s ``j``-th target token, ``n_i`` its target
  count. ``N_t`` does not depend on ``w``: with ``w = 1`` this is the mean token loss of
  the batch; ``w_i = 0`` removes document ``i`` and changes nothing else. ``L_t`` is
  linear in ``w``.
* **No dropout**: the model runs in eval mode (dropout layers are identities).
* **Optimizer**, written functionally so that a step is differentiable in the state and in
  ``w``, with ``lr_t = lr * lr_factor(t)`` (linear warmup over ``warmup_steps``, then
  ``cosine`` / ``linear`` decay to 0 or ``constant``):

  - ``adamw`` (``torch.optim.AdamW``'s update): ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2)
    g^2``, ``theta = theta (1 - lr_t wd) - lr_t (m / (1-b1^k)) / (sqrt(v / (1-b2^k)) + eps)``
    with ``k = t + 1``;
  - ``sgd`` (``torch.optim.SGD``'s, no dampening): ``g' = g + wd theta``, ``b = mu b + g'``,
    ``theta = theta - lr_t b``.

* **State** (:data:`State`): ``{"param/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"}``
  (AdamW) or ``{"param/<name>", "momentum/<name>"}`` (SGD); the step count travels beside it.
  Checkpoints hold the state after ``k * checkpoint_every`` steps (and after 0 and the last
  step) as safetensors with ``step`` in the metadata.

Replaying a segment from its first checkpoint recomputes the next checkpoint bit for bit
(same process settings: CPU, thread count, dtype), which the tests check with ``torch.equal``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from attribution_assets.engine.demo.model import data_order
from attribution_assets.engine.gradients.batching import Document, collate, validate_documents
from attribution_assets.engine.io.atomic import atomic_file
from attribution_assets.spec import MAGIC_FROM_DEMO, DemoSpec, MagicSpec

State = dict[str, torch.Tensor]
CheckpointPath = Callable[[int], Path]


def lr_factor(step: int, total_steps: int, magic: MagicSpec) -> float:
    """Multiplier of ``magic.lr`` at ``step`` (0-based): linear warmup, then the decay."""
    if step < magic.warmup_steps:
        return (step + 1) / magic.warmup_steps
    progress = min(1.0, (step - magic.warmup_steps) / max(1, total_steps - magic.warmup_steps))
    if magic.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if magic.schedule == "linear":
        return 1.0 - progress
    return 1.0


def training_batches(n_docs: int, magic: MagicSpec) -> list[list[int]]:
    """Document indices of every step: one ``magic.seed`` permutation per epoch."""
    order = DemoSpec(seed=magic.seed, epochs=magic.epochs, batch_size=magic.batch_size)
    return data_order(n_docs, order)


def checkpoint_steps(total_steps: int, every: int) -> list[int]:
    """Steps whose state is checkpointed: ``0, every, 2 every, ..., total_steps``."""
    return sorted(set(range(0, total_steps, every)) | {total_steps})


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at ``x = 0`` is 0, not infinite (the Adam second moment
    of a parameter that never had a gradient; its first moment is 0 there too)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class Objective:
    """Next-token losses of ``docs`` (``(input_ids, loss_mask)``) under ``model``'s architecture
    with parameters given as a dict (``torch.func.functional_call``), so that losses are
    differentiable in the parameters (attention through SDPA's math kernel, which is twice
    differentiable, in every pass). ``model`` supplies the architecture and the initial
    parameters (:meth:`initial_params`); it is put in eval mode (no dropout)."""

    def __init__(self, model: torch.nn.Module, docs: Sequence[Document], pad_id: int = 0):
        self.model = model.eval()
        self.docs = [(list(ids), list(mask)) for ids, mask in docs]
        self.targets = torch.tensor(validate_documents(self.docs), dtype=torch.long)
        self.pad_id = pad_id
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @property
    def n_docs(self) -> int:
        return len(self.docs)

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The model's current parameters, detached copies, by name."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def summed_losses(self, params: dict[str, torch.Tensor], docs: Sequence[Document],
                      indices: Sequence[int]) -> torch.Tensor:
        """``[len(indices)]``: per document the summed NLL of its ``loss_mask`` tokens."""
        batch = collate(docs, indices, self.pad_id, self.device)
        with sdpa_kernel(SDPBackend.MATH):  # twice differentiable, the same in every pass
            out = torch.func.functional_call(self.model, params, (),
                                             {"input_ids": batch.input_ids,
                                              "attention_mask": batch.attention_mask})
        logits = out.logits if hasattr(out, "logits") else out
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        return (nll * batch.loss_mask[:, 1:].to(nll.dtype)).sum(dim=1)

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Sequence[int],
                   weights: torch.Tensor) -> torch.Tensor:
        """``L_t = sum_i w_i sum_j l_ij / N_t`` over ``batch`` (see the module docstring)."""
        losses = self.summed_losses(params, self.docs, batch)
        return (weights[list(batch)] * losses).sum() / self.targets[list(batch)].sum().to(self.device)


def initial_state(params: dict[str, torch.Tensor], magic: MagicSpec) -> State:
    """Parameters plus zero optimizer moments (``adamw``) or momentum buffers (``sgd``)."""
    state = {f"param/{k}": v.detach().clone() for k, v in params.items()}
    slots = ("exp_avg", "exp_avg_sq") if magic.optimizer == "adamw" else ("momentum",)
    for slot in slots:
        state |= {f"{slot}/{k}": torch.zeros_like(v) for k, v in params.items()}
    return state


def params_of(state: State) -> dict[str, torch.Tensor]:
    """The ``param/`` entries of ``state``, by parameter name."""
    return {k[len("param/"):]: v for k, v in state.items() if k.startswith("param/")}


def train_step(state: State, step: int, batch: Sequence[int], weights: torch.Tensor,
               objective: Objective, magic: MagicSpec, total_steps: int,
               create_graph: bool = False) -> State:
    """The state after step ``step`` (0-based) on ``batch``: a pure function of ``state`` and
    ``weights`` [n]. With ``create_graph`` the result stays differentiable in both (the
    entries of ``state`` and ``weights`` must then require grad); otherwise every returned
    tensor is detached."""
    names = list(params_of(state))
    params = {k: state[f"param/{k}"] if create_graph else state[f"param/{k}"].detach().requires_grad_(True)
              for k in names}
    with torch.enable_grad():
        loss = objective.batch_loss(params, batch, weights)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    lr = magic.lr * lr_factor(step, total_steps, magic)
    new: State = {}
    with torch.set_grad_enabled(create_graph):
        for name, g in zip(names, grads):
            p = state[f"param/{name}"]
            if magic.optimizer == "adamw":
                m = magic.beta1 * state[f"exp_avg/{name}"] + (1 - magic.beta1) * g
                v = magic.beta2 * state[f"exp_avg_sq/{name}"] + (1 - magic.beta2) * g * g
                k = step + 1
                update = (m / (1 - magic.beta1 ** k)) / (_safe_sqrt(v / (1 - magic.beta2 ** k)) + magic.eps)
                new[f"param/{name}"] = p * (1 - lr * magic.weight_decay) - lr * update
                new[f"exp_avg/{name}"], new[f"exp_avg_sq/{name}"] = m, v
            else:
                b = magic.momentum * state[f"momentum/{name}"] + g + magic.weight_decay * p
                new[f"param/{name}"] = p - lr * b
                new[f"momentum/{name}"] = b
    return new if create_graph else {k: v.detach() for k, v in new.items()}


def save_checkpoint(path: Path, state: State, step: int) -> Path:
    """Write ``state`` after ``step`` steps to ``path`` (safetensors, atomically)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"step": str(step)})
    return path


def load_checkpoint(path: Path) -> tuple[State, int]:
    """``(state, step)`` from a :func:`save_checkpoint` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
    return load_file(str(path)), step


@dataclass
class TrainingRun:
    """One deterministic run: ``objective`` (model and documents), resolved ``magic`` settings,
    ``weights`` [n] (default all 1) and where checkpoints go (``checkpoint_path(step)``)."""

    objective: Objective
    magic: MagicSpec
    checkpoint_path: CheckpointPath | None = None
    weights: torch.Tensor | None = None

    def __post_init__(self):
        missing = [k for k in MAGIC_FROM_DEMO if getattr(self.magic, k) is None]
        if missing:
            raise ValueError(f"magic settings {missing} are unset; pass `magic.resolved(demo)`")
        n = self.objective.n_docs
        if self.weights is None:
            self.weights = torch.ones(n, dtype=self.objective.dtype)
        self.weights = self.weights.to(self.objective.device)
        if tuple(self.weights.shape) != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per document), got {tuple(self.weights.shape)}")
        self.batches = training_batches(n, self.magic)
        self.total_steps = len(self.batches)
        self.checkpoints = checkpoint_steps(self.total_steps, self.magic.checkpoint_every)

    def step(self, state: State, step: int, weights: torch.Tensor | None = None,
             create_graph: bool = False) -> State:
        return train_step(state, step, self.batches[step], self.weights if weights is None else weights,
                          self.objective, self.magic, self.total_steps, create_graph)

    def replay(self, state: State, start: int, stop: int) -> State:
        """The state after step ``stop`` from ``state``, the state after ``start`` steps."""
        for t in range(start, stop):
            state = self.step(state, t)
        return state

    def segment_states(self, start: int, stop: int) -> list[State]:
        """The states after ``start, ..., stop - 1`` steps, replayed from checkpoint ``start``."""
        states = [self.load(start)]
        for t in range(start, stop - 1):
            states.append(self.step(states[-1], t))
        return states

    def train(self, log: Callable[[str], None] = lambda _: None) -> tuple[State, dict]:
        """Train from the objective's initial parameters; write every checkpoint (when
        ``checkpoint_path`` is set). Returns ``(final state, metrics)``."""
        started = time.perf_counter()
        state = initial_state(self.objective.initial_params(), self.magic)
        for step in range(self.total_steps + 1):
            if step in self.checkpoints and self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path(step), state, step)
            if step < self.total_steps:
                state = self.step(state, step)
                if (step + 1) % 100 == 0:
                    log(f"magic training step {step + 1}/{self.total_steps}")
        metrics = {"steps": self.total_steps, "documents": self.objective.n_docs,
                   "checkpoints": len(self.checkpoints), "train_seconds": round(time.perf_counter() - started, 3)}
        return state, metrics

    def load(self, step: int) -> State:
        """The checkpointed state after ``step`` steps (one of :attr:`checkpoints`)."""
        if self.checkpoint_path is None:
            raise ValueError("this run has no checkpoint_path")
        state, stored = load_checkpoint(self.checkpoint_path(step))
        state = {k: v.to(self.objective.device) for k, v in state.items()}
        if stored != step:
            raise ValueError(f"{self.checkpoint_path(step)} holds step {stored}, expected {step}")
        return state
