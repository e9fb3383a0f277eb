"""Train-time attribution: per-example projected gradients from a training loop's own forward and
backward passes (no second forward), written as gradient shards, and read back as document rows.
:class:`TrainTimeRecorder` does the work for any loop (the demo's ``engine.demo.model`` calls it
directly); ``engine.training.callback.AttributionCallback`` drives it from a
``transformers.Trainer``. This module does not import the Trainer (nor, through it, peft or
bitsandbytes), so the demo and the scoring assets load without them.

Conventions (as ``engine.gradients.collector``, whose projection and normalization code this
reuses through :meth:`GradientCollector.hook_rows`):

- A training example is ``{"input_ids", "loss_mask", "doc_index"}`` (``callback.AttributionCollator``
  pads a batch and turns ``loss_mask`` into ``labels``, ``-100`` where no loss is taken). The
  callback's pre-hook on the model removes ``doc_index`` from the forward's keyword arguments.
- A document's row is the gradient of ITS summed token loss ``S_b`` at the parameters the
  optimizer step used (before the update), times its weight ``w_b`` (1, or the GRPO / Dr. GRPO
  advantage weight: ``engine.training.advantages``). Whatever the Trainer backpropagates
  (a mean over tokens, a sum over ``num_items_in_batch``, a division by the accumulation steps,
  an fp16 loss scale, an advantage-weighted loss) is ``sum_b c_b S_b`` for per-document scalars
  ``c_b``; the recorder reads each ``c_b`` off the gradient of the logits, which is exactly
  ``c_b (softmax - onehot(label))`` at the document's target positions (least squares over
  them), and divides it out. Rows therefore do not depend on the micro-batch split or on
  the reduction. Label smoothing breaks that form and is refused.
- Normalization (``gradients.normalizer``): by the live optimizer's second moments right after
  the step (``on_optimizer_step``): the ``v_t`` Adam divides this step's update by (bias
  corrected with the state's own ``step``) or Adafactor's factored moments, as
  ``engine.gradients.normalizers`` do for a saved optimizer. Unnormalized rows are projected
  in each module's backward hook (only the ``[B, p*p]`` block is kept); normalized ones keep
  each micro-batch's hook tensors until the step's optimizer update.
- Dropout (``dropout``): ``step`` (default) rows come from the training's own forward and
  backward, so they carry that step's dropout masks: what the optimizer saw, but not what a
  post-hoc collector (eval mode, no dropout) computes at the same parameters. ``off``: rows come
  from one more forward and backward of each micro-batch in eval mode (no dropout), at the same
  parameters and before the optimizer update; they equal post-hoc rows, the training itself is
  unchanged, and recording costs about one more forward and backward per micro-batch. With a
  model whose dropout is 0 both give the same rows (``step`` without the extra pass).
  :func:`dropout_probability` finds the model's dropout; recording ``step`` rows of a model with
  dropout > 0 warns, and so does :func:`train_time_document_rows` reading them back.
- Ranks (DDP, FSDP, DeepSpeed: every rank of an initialized ``torch.distributed`` default group
  is a data-parallel rank with its own documents): each rank writes its rows as a hidden part
  ``.<shard>.rank<r>-of-<n>`` next to the shard; after an all-gather of the part paths (a
  barrier) rank 0 merges them into the one shard, rows ordered by (step, rank, position in the
  rank's step: micro-batch order), i.e. the order one process with ``n`` times the gradient
  accumulation writes, removes the parts, and a barrier lets every rank list the shard.
- Rows are tagged with the optimizer step (1-based ``global_step`` after the update), the
  Trainer's fractional epoch after it, and the document id; every ``steps_per_shard`` steps
  (and at the end of training) they are written as one gradient shard (``store.write_store``;
  ``info.json["training"] = {steps, epochs}``, one entry per row, plus ``dropout`` (the mode),
  ``model_dropout`` (:func:`dropout_probability`) and ``ranks``).
- Reading them back (merging the ranks' parts, a document's rows summed over steps):
  ``engine.training.stored_rows``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import make_normalizer
from attribution_assets.engine.gradients.store import GradientStore, write_store
from attribution_assets.engine.training.stored_rows import DROPOUT_WARNING, merge_parts
from attribution_assets.spec import GradientSpec

DOC_INDEX = "doc_index"
IGNORE = -100
DROPOUT_MODES = ("step", "off")


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``S_b [B]``: summed ``-log p(label_t)`` over each sequence's target positions
    (``labels[:, 1:] != -100``, predicted from ``logits[:, :-1]``)."""
    target = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(target != IGNORE, nll, 0.0).sum(1)


def dropout_probability(model: nn.Module) -> float:
    """The largest dropout probability of ``model``'s training forward: ``nn.Dropout`` modules'
    ``p`` (GPT-2, PEFT's ``lora_dropout``) and float ``attention_dropout`` / ``dropout``
    attributes of modules (Llama, GPT-NeoX attention pass them to the attention function)."""
    found = [0.0]
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            found.append(float(module.p))
        for attr in ("attention_dropout", "dropout"):
            value = module.__dict__.get(attr)
            if isinstance(value, float):
                found.append(value)
    return max(found)


def data_parallel_rank() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized ``torch.distributed`` default group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loss_scales(logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-document ``c_b [B]`` with ``grad = c_b (softmax(logits) - onehot(label))`` at the target
    positions (``labels[:, 1:] != -100``, predicted from ``logits[:, :-1]``), read by least
    squares at each document's first and last target (two ``V``-wide rows per document, not
    ``T``); 0 for a document without targets or without gradient. Raises when the two disagree
    (the loss is then not ``c_b`` times the document's summed token cross-entropy).
    The least squares leave out the target entry ``c_b (p_t - 1)``, which cancels to float32
    noise when ``p_t`` rounds near 1 (a memorized token); the other entries ``c_b p_v`` keep
    their relative precision (the full row is used where they all underflow to 0)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    has = keep.any(1)
    width = keep.shape[1]
    first = torch.where(has, keep.int().argmax(1), 0)
    last = torch.where(has, width - 1 - keep.flip(1).int().argmax(1), 0)
    batch = torch.arange(labels.shape[0], device=labels.device).repeat(2)
    pos = torch.cat([first, last])
    d = torch.softmax(logits[batch, pos].detach().float(), dim=-1).double()
    rows, cols = torch.arange(len(d), device=d.device), target[batch, pos].clamp_min(0)
    g = grad[batch, pos].double()
    other = torch.ones_like(d)
    other[rows, cols] = 0.0
    d_other = d * other
    d[rows, cols] -= 1.0
    num, den = (g * d_other).sum(-1), (d_other * d_other).sum(-1)
    full = (g * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-300)
    c = torch.where(den > 0, num / den.clamp_min(1e-300), full).view(2, -1)
    c = torch.where(has, c, 0.0)
    spread = (c[0] - c[1]).abs()
    if bool((spread > 1e-3 * c.abs().amax(0) + 1e-30).any()):
        raise ValueError("the training loss is not a per-document multiple of each document's summed "
                         "token cross-entropy (two target positions of one document are weighted "
                         "differently): per-token loss weights and label smoothing cannot be undone")
    return c[0]


def _valid(micro: dict, a: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]``: the micro-batch's attention mask (all ones without one)."""
    if micro["mask"] is not None:
        return micro["mask"].bool()[..., None]
    return torch.ones(a.shape[0], a.shape[1], 1, dtype=torch.bool, device=a.device)


def shard_name(first_step: int, last_step: int) -> str:
    """``steps_000001-000010``: the optimizer steps (inclusive) whose rows a shard holds."""
    return f"steps_{first_step:06d}-{last_step:06d}"


class TrainTimeRecorder:
    """Records per-document projected gradients of a training loop's own backward passes (module
    docstring); :class:`AttributionCallback` drives it from a ``transformers.Trainer``, any other
    loop calls it directly:

    ``attach(model)``; per micro-batch ``start_micro_batch(doc_index, labels, attention_mask,
    input_ids)`` before its forward (``labels``: ``-100`` where no loss is taken; ``input_ids``
    needed with ``dropout="off"``, which runs them again without dropout), its forward and backward,
    then ``finish_micro_batch()``; after each ``optimizer.step()`` ``optimizer_step(optimizer)``
    (the live optimizer, for the normalizer) and ``step_end(step, epoch)``; at the end
    ``close(last_step)`` (writes the last shard, removes the hooks).

    ``gradients``: the projection, module globs and normalizer (as the post-hoc collector);
    ``doc_ids``: document id per ``doc_index``; ``out``: the directory that receives one shard
    directory per step range, or a callable ``shard name -> shard path``;
    ``doc_weights``: ``w_b`` per ``doc_index`` (None: 1); ``steps_per_shard``: optimizer steps
    per shard; ``model_fingerprint``: recorded in each shard; ``dropout``: ``step`` or ``off``
    (module docstring). ``shards`` lists the written shard paths; ``skipped_docs`` counts rows that were not
    recorded because their document's loss had no gradient (``c_b == 0``, e.g. zero advantage
    or loss weight).
    """

    def __init__(self, gradients: GradientSpec, doc_ids: Sequence[str],
                 out: str | Path | Callable[[str], Path], *, doc_weights: Sequence[float] | None = None,
                 steps_per_shard: int = 100, model_fingerprint: str = "", dropout: str = "step"):
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {DROPOUT_MODES} (the training step's own masks, or "
                             f"rows without dropout, comparable with post-hoc rows), got {dropout!r}")
        if gradients.token_rows:
            raise ValueError("train-time recording writes document rows: set `gradients.per_token: "
                             f"none` (got {gradients.per_token!r})")
        if steps_per_shard < 1:
            raise ValueError(f"steps_per_shard must be >= 1, got {steps_per_shard}")
        if doc_weights is not None and len(doc_weights) != len(doc_ids):
            raise ValueError(f"{len(doc_weights)} doc_weights for {len(doc_ids)} doc_ids")
        self.gradients, self.doc_ids = gradients, [str(d) for d in doc_ids]
        self.doc_weights = None if doc_weights is None else torch.as_tensor(
            np.asarray(doc_weights, dtype=np.float64))
        self.shard_path = out if callable(out) else (lambda name, root=Path(out): root / name)
        self.steps_per_shard, self.model_fingerprint = steps_per_shard, model_fingerprint
        self.dropout, self.model_dropout = dropout, 0.0
        self.collector: GradientCollector | None = None
        self.shards: list[Path] = []
        self.skipped_docs = 0
        self._handles: list = []
        self._micro: dict | None = None  # the current micro-batch's hook records
        self._raw: list[dict] = []  # finished micro-batches awaiting normalization
        self._step_rows: list[tuple[np.ndarray, np.ndarray]] = []  # (doc_index, rows) of the step
        self._buffer: list[tuple[np.ndarray, np.ndarray, int, float]] = []
        self._first_step: int | None = None

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Hook ``model``'s logits and the selected modules (the collector's globs)."""
        self.collector = GradientCollector(model, self.gradients, live_normalizer=True)
        names = {id(s.module): s.name for s in self.collector.specs}
        self.model_dropout = dropout_probability(model)
        if self.dropout == "step" and self.model_dropout > 0:
            warnings.warn(DROPOUT_WARNING.format(p=self.model_dropout), stacklevel=2)
        replay = self.dropout == "off"

        def model_hook(module, args, kwargs, output):
            micro = self._micro
            logits = getattr(output, "logits", None)
            if micro is None or logits is None or not logits.requires_grad:
                return

            micro["logits"] = logits.detach()

            def on_logits_grad(grad, micro=micro):
                micro["scales"] = loss_scales(micro.pop("logits"), grad, micro["labels"])

            logits.register_hook(on_logits_grad)

        def module_hook(module, args, output):
            micro = self._micro
            if replay or micro is None or not (module.training and output.requires_grad):
                return  # dropout off: rows come from the micro-batch's replay
            name = names[id(module)]
            entry = [args[0].detach(), None]
            micro["calls"].setdefault(name, []).append(entry)

            def on_grad(grad, entry=entry, name=name, micro=micro):
                if self.gradients.normalizer == "none":  # project now; keep only the block
                    block = self.collector.module_rows(name, entry[0], grad.detach(), _valid(micro, entry[0]))
                    blocks = micro["blocks"]
                    blocks[name] = block if name not in blocks else blocks[name] + block
                    entry[0] = None
                else:
                    entry[1] = grad.detach()

            output.register_hook(on_grad)

        self._handles = [model.register_forward_hook(model_hook, with_kwargs=True)]
        self._handles += [s.module.register_forward_hook(module_hook) for s in self.collector.specs]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- micro-batches and steps ---------------------------------------------------------------
    def start_micro_batch(self, doc_index: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          input_ids: torch.Tensor | None = None) -> None:
        """Record the next forward/backward: ``doc_index [B]``, ``labels [B, T]`` (-100: no
        loss), ``attention_mask [B, T]`` (None: all valid), ``input_ids [B, T]`` (needed with
        ``dropout="off"``). Closes the previous micro-batch."""
        self.finish_micro_batch()
        if self.dropout == "off" and input_ids is None:
            raise ValueError("dropout='off' runs each micro-batch again without dropout: pass its "
                             "input_ids to start_micro_batch")
        self._micro = {"index": doc_index.detach().cpu(), "labels": labels.detach(),
                       "mask": attention_mask, "input_ids": input_ids, "calls": {}, "blocks": {},
                       "scales": None}

    def finish_micro_batch(self) -> None:
        """Close the current micro-batch (its backward has run): project it now, or keep its
        tensors for the normalizer of the step's optimizer update."""
        micro, self._micro = self._micro, None
        if micro is None:
            return
        if micro["scales"] is None:  # forward without backward (e.g. a skipped batch)
            return
        if self.dropout == "off":
            self._replay(micro)
        micro["calls"] = {name: [(a, g) for a, g in entries if g is not None]
                          for name, entries in micro["calls"].items()}
        if self.gradients.normalizer == "none":
            self._step_rows.append(self._rows(micro))
        else:
            self._raw.append(micro)

    def optimizer_step(self, optimizer) -> None:
        """After ``optimizer.step()``: normalize the step's micro-batches with its live state."""
        if self._raw:
            if optimizer is None:
                raise ValueError("the normalizer needs the live optimizer (on_optimizer_step got none)")
            live = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            self.collector.bind_normalizer(
                make_normalizer(self.gradients.normalizer, live, self.collector.model))
            self._step_rows += [self._rows(micro) for micro in self._raw]
            self._raw = []

    def step_end(self, step: int, epoch: float) -> None:
        """Tag the step's rows with ``step`` (1-based) and ``epoch``; write a shard when due."""
        self.finish_micro_batch()
        for index, rows in self._step_rows:
            self._buffer.append((index, rows, step, epoch))
        self._step_rows = []
        if self._first_step is None:
            self._first_step = step
        if step - self._first_step + 1 >= self.steps_per_shard:
            self._flush(step)

    def close(self, last_step: int) -> None:
        """Drop an unfinished step, write the buffered rows (shard ending at ``last_step``) and
        remove the hooks."""
        self._micro, self._raw, self._step_rows = None, [], []
        if self._first_step is not None:
            self._flush(last_step)
        self._detach()

    def _replay(self, micro: dict) -> None:
        """Dropout off: the micro-batch's forward and backward again in eval mode at the same
        parameters, of ``sum_b S_b`` (so ``c_b = 1``; documents the training gave no gradient
        keep ``c_b = 0``); gradients reach only the hooked outputs (no parameter ``.grad``)."""
        model = self.collector.model
        calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

        def keep(name):
            def hook(module, args, output):
                if output.requires_grad:
                    calls.append((name, args[0].detach(), output))
            return hook

        handles = [s.module.register_forward_hook(keep(s.name)) for s in self.collector.specs]
        was_training = model.training
        try:
            model.eval()
            with torch.enable_grad():
                logits = model(input_ids=micro["input_ids"], attention_mask=micro["mask"]).logits
                grads = torch.autograd.grad(sequence_losses(logits, micro["labels"]).sum(),
                                            [out for _, _, out in calls], allow_unused=True) if calls else []
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        micro["calls"] = {}
        for (name, a, _), g in zip(calls, grads):
            micro["calls"].setdefault(name, []).append((a, g))
        micro["scales"] = (micro["scales"] != 0).double()

    # -- rows --------------------------------------------------------------------------------
    def _rows(self, micro: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(doc_index [B], rows [B, dims])`` of one micro-batch: hook rows / ``c_b`` * ``w_b``."""
        n = len(micro["index"])
        if micro["blocks"]:  # projected during the backward pass
            rows = self.collector.assemble(micro["blocks"], n).double()
        else:
            pairs = [p for ps in micro["calls"].values() for p in ps]
            valid = _valid(micro, pairs[0][0]) if pairs else torch.ones(n, 1, 1, dtype=torch.bool)
            rows = self.collector.hook_rows(micro["calls"], valid).double()
        scales = micro["scales"].to(rows.device)
        index = micro["index"]
        weights = (self.doc_weights[index] if self.doc_weights is not None
                   else torch.ones(len(index), dtype=torch.float64)).to(rows.device)
        factor = torch.where(scales != 0, weights / torch.where(scales != 0, scales, 1.0), 0.0)
        self.skipped_docs += int((scales == 0).sum())
        keep = (scales != 0).cpu()
        rows = (rows * factor[:, None]).float().cpu().numpy()
        return index.numpy()[keep.numpy()], rows[keep.numpy()]

    def _flush(self, last_step: int) -> None:
        """Write the buffered rows as the shard ``steps_<first>-<last_step>``: directly in one
        process; as this rank's part, merged by rank 0, under ``torch.distributed``."""
        first, self._first_step = self._first_step, None
        buffer, self._buffer = self._buffer, []
        name = shard_name(first, last_step)
        final = Path(self.shard_path(name))
        rank, world = data_parallel_rank()
        if world == 1:
            if buffer:
                self.shards.append(self._write(final, buffer, world).path)
            return
        import torch.distributed as dist

        part = final.with_name(f".{name}.rank{rank:05d}-of-{world:05d}")
        mine = str(self._write(part, buffer, world).path) if buffer else None
        parts: list[str | None] = [None] * world
        dist.all_gather_object(parts, mine)  # also the barrier: every part is written
        if rank == 0 and any(parts):
            merge_parts([GradientStore(p) for p in parts if p is not None], final)
        dist.barrier()  # the merged shard exists before any rank lists it
        if any(parts):
            self.shards.append(final)

    def _write(self, path: Path, buffer: list, ranks: int) -> GradientStore:
        """One store of ``buffer``'s rows (``(doc_index, rows, step, epoch)`` per micro-batch)."""
        collector = self.collector
        index = np.concatenate([b[0] for b in buffer])
        array = np.concatenate([b[1] for b in buffer]) if len(index) else \
            np.zeros((0, collector.dims), dtype=np.float32)
        info = collector.layout_info()
        info["rows"] = int(array.shape[0])
        info["training"] = {"steps": [b[2] for b in buffer for _ in b[0]],
                            "epochs": [round(b[3], 6) for b in buffer for _ in b[0]],
                            "dropout": self.dropout, "model_dropout": self.model_dropout, "ranks": ranks}
        return write_store(path, array, info, doc_ids=[self.doc_ids[i] for i in index],
                           model_fingerprint=self.model_fingerprint, dtype=self.gradients.dtype)
