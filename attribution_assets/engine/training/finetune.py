"""The ``finetune`` asset's engine: a ``transformers.Trainer`` over a pipeline's tokenized corpus
with ``AttributionCallback`` (train-time gradient shards; ``engine.training.recorder`` reads them
back as per-document rows).

Outputs (``PipelinePaths``): ``finetuned_model`` (``save_pretrained`` + tokenizer +
``optimizer.pt``, written atomically), ``train_time_gradients(steps_<first>-<last>)`` (one
store per ``finetune.steps_per_shard`` optimizer steps, rows tagged with step and epoch) and
``finetune_record`` (fingerprint, steps, shards, skipped rows). With GRPO / Dr. GRPO
``corpus.advantage_weighting`` the loss weights each sequence (``AdvantageTrainer``) and the rows
carry the same weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.advantages import sequence_weights
from attribution_assets.engine.io.atomic import atomic_dir, write_text_atomic
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.digests import model_fingerprint
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.training.callback import AttributionCallback, AttributionCollator
from attribution_assets.engine.training.trainer import AdvantageTrainer
from attribution_assets.spec import PipelineSpec

_OPTIMIZERS = {"adamw": "adamw_torch", "adafactor": "adafactor"}


def finetune(spec: PipelineSpec, paths: PipelinePaths, model, tokenizer, docs: Sequence[TokenizedDoc],
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` on ``docs`` as ``spec.finetune`` says and write the outputs (module
    docstring); returns the record (also written to ``paths.finetune_record``)."""
    from transformers import Trainer, TrainingArguments

    settings, weighting = spec.finetune, spec.corpus.advantage_weighting
    weights = None
    if weighting != "none":
        weights = sequence_weights([d.advantage for d in docs], [d.targets for d in docs], weighting)
    examples = [{"input_ids": d.input_ids, "loss_mask": d.loss_mask, "doc_index": i,
                 **({"loss_weight": float(weights[i])} if weights is not None else {})}
                for i, d in enumerate(docs)]
    if paths.train_time_root.exists():  # a previous run's shards would mix with this run's
        shutil.rmtree(paths.train_time_root)
    callback = AttributionCallback(spec.gradients, [d.doc_id for d in docs], paths.train_time_gradients,
                                   doc_weights=weights, steps_per_shard=settings.steps_per_shard,
                                   dropout=settings.record_dropout)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            warmup_steps=settings.warmup_steps, lr_scheduler_type="constant_with_warmup",
            weight_decay=settings.weight_decay, optim=_OPTIMIZERS[settings.optimizer], seed=settings.seed,
            data_seed=settings.seed, report_to=[], remove_unused_columns=False, save_strategy="no",
            logging_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer_cls = AdvantageTrainer if weights is not None else Trainer
        trainer = trainer_cls(model=model, args=args, train_dataset=examples,
                              data_collator=AttributionCollator(tokenizer.pad_token_id or 0),
                              callbacks=[callback])
        result = trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        model.eval()
        with atomic_dir(paths.finetuned_model) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / paths.finetuned_optimizer.name)
    record = {"fingerprint": model_fingerprint(model), "steps": int(trainer.state.global_step),
              "epochs": settings.epochs, "train_loss": round(float(result.training_loss), 6),
              "documents": len(docs), "shards": [p.name for p in callback.shards],
              "rows": int(sum(GradientStore(p).rows for p in callback.shards)),
              "skipped_rows": callback.skipped_docs, "advantage_weighting": weighting,
              "record_dropout": settings.record_dropout, "model_dropout": callback.recorder.model_dropout}
    write_text_atomic(paths.finetune_record, json.dumps(record, indent=2))
    log(f"fine-tuned {record['steps']} steps, {record['rows']} train-time rows in {len(record['shards'])} shards")
    return record
