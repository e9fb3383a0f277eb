"""``transformers.Trainer`` integration of train-time attribution: :class:`AttributionCallback`
drives an ``engine.training.recorder.TrainTimeRecorder`` (its module docstring states the
conventions: examples, rows, normalization, shards) from the Trainer's events, and
:class:`AttributionCollator` pads the examples it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from attribution_assets.engine.training.recorder import DOC_INDEX, IGNORE, TrainTimeRecorder
from attribution_assets.spec import GradientSpec


class AttributionCollator:
    """Pads ``{"input_ids", "loss_mask", "doc_index"[, "loss_weight"]}`` examples on the right to
    ``input_ids``, ``attention_mask``, ``labels`` (``input_ids`` where ``loss_mask`` is 1, else
    ``-100``), ``doc_index`` and, when present, ``loss_weight`` (float32 ``[B]``)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            tokens = torch.as_tensor(list(e["input_ids"]), dtype=torch.long)
            mask = torch.as_tensor(list(e["loss_mask"]), dtype=torch.bool)
            n = len(tokens)
            ids[row, :n], attn[row, :n] = tokens, 1
            labels[row, :n] = torch.where(mask, tokens, IGNORE)
        batch = {"input_ids": ids, "attention_mask": attn, "labels": labels,
                 DOC_INDEX: torch.as_tensor([int(e[DOC_INDEX]) for e in examples], dtype=torch.long)}
        if "loss_weight" in examples[0]:
            batch["loss_weight"] = torch.as_tensor([float(e["loss_weight"]) for e in examples],
                                                   dtype=torch.float32)
        return batch


class AttributionCallback(TrainerCallback):
    """A ``transformers.Trainer`` driving a :class:`TrainTimeRecorder` (same arguments): a
    pre-hook on the model takes each training batch's ``doc_index`` out of the forward's keyword
    arguments and starts a micro-batch; the Trainer's events close micro-batches and steps.
    ``dropout``: ``step`` (rows with the step's own dropout masks) or ``off`` (rows without
    dropout, from one more forward and backward per micro-batch). Under ``torchrun`` each rank
    records its own documents and rank 0 merges them into one shard per step range (the
    recorder's module docstring). ``shards`` and ``skipped_docs`` are the recorder's."""

    def __init__(self, gradients: GradientSpec, doc_ids: Sequence[str],
                 out: str | Path | Callable[[str], Path], *, doc_weights: Sequence[float] | None = None,
                 steps_per_shard: int = 100, model_fingerprint: str = "", dropout: str = "step"):
        self.recorder = TrainTimeRecorder(gradients, doc_ids, out, doc_weights=doc_weights,
                                          steps_per_shard=steps_per_shard,
                                          model_fingerprint=model_fingerprint, dropout=dropout)
        self._handle = None

    @property
    def shards(self) -> list[Path]:
        return self.recorder.shards

    @property
    def skipped_docs(self) -> int:
        return self.recorder.skipped_docs

    def _attach(self, model: torch.nn.Module) -> None:
        recorder = self.recorder

        def model_pre_hook(module, args, kwargs):
            index = kwargs.pop(DOC_INDEX, None)
            if not (module.training and torch.is_grad_enabled()):
                return args, kwargs
            if index is None:
                raise ValueError(f"training batch has no `{DOC_INDEX}`: build examples with a "
                                 f"`{DOC_INDEX}` and collate with AttributionCollator, and set "
                                 "TrainingArguments(remove_unused_columns=False)")
            labels = kwargs.get("labels")
            if labels is None:
                raise ValueError("the training forward got no `labels`: the callback reads each "
                                 "document's target positions from them (-100 = no loss)")
            recorder.start_micro_batch(index, labels, kwargs.get("attention_mask"), kwargs.get("input_ids"))
            return args, kwargs

        recorder.attach(model)
        self._handle = model.register_forward_pre_hook(model_pre_hook, with_kwargs=True)

    # -- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AttributionCallback needs the Trainer's model (on_train_begin got none)")
        if getattr(args, "remove_unused_columns", False):
            raise ValueError("AttributionCallback needs `doc_index` in each batch: set "
                             "TrainingArguments(remove_unused_columns=False)")
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError("AttributionCallback cannot undo label smoothing (the loss is then not "
                             "a scaled sum of each document's token losses): set "
                             "label_smoothing_factor=0")
        if getattr(args, "gradient_checkpointing", False):
            raise ValueError("AttributionCallback hooks the training forward once per batch; "
                             "gradient checkpointing runs it twice: set gradient_checkpointing=False")
        self._attach(model)

    def on_substep_end(self, args, state, control, **kwargs):
        self.recorder.finish_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.finish_micro_batch()

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        self.recorder.optimizer_step(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.step_end(int(state.global_step), float(state.epoch or 0.0))

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.close(int(state.global_step))
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
