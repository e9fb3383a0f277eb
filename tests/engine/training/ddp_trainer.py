"""One Trainer run with ``AttributionCallback`` on 48 documents, for the rank test
(``test_ranks.py``): run under ``torchrun --nproc-per-node N`` (DDP over gloo on CPU, ``N``
ranks of micro-batch 2) or called in one process (gradient accumulation ``N``), the same
documents reach each optimizer step, in the same micro-batch order.

    torchrun --standalone --nproc-per-node 2 tests/engine/training/ddp_trainer.py MODEL_DIR OUT 2
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCUMENTS, MICRO_BATCH = 48, 2
SUBJECTS = ["Mara Quill", "Tomas Reyes", "Ada Finch", "The river", "Orbitex", "Lisbon"]
PLACES = ["Lisbon", "Orbitex", "Norwood University", "the old town", "a small port", "the city",
          "a satellite lab", "the coast"]


def documents(tokenizer) -> list[dict]:
    """48 distinct examples ``{input_ids, loss_mask, doc_index}`` of different lengths."""
    texts = [f"{s} went to {p}." + " Again." * (k % 3) for k, (s, p) in
             enumerate((s, p) for s in SUBJECTS for p in PLACES)]
    assert len(texts) == DOCUMENTS
    ids = [tokenizer(t)["input_ids"] for t in texts]
    return [{"input_ids": i, "loss_mask": [0] + [1] * (len(i) - 1), "doc_index": k} for k, i in enumerate(ids)]


def train(model_dir: str | Path, out: str | Path, ranks: int, dropout: str = "step"):
    """Train one epoch (``DOCUMENTS / (MICRO_BATCH * ranks)`` micro-batches of ``MICRO_BATCH``
    per rank, ``ranks`` of them per optimizer step); returns the callback."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from attribution_assets.engine.training.callback import AttributionCallback, AttributionCollator
    from attribution_assets.spec import GradientSpec

    torch.manual_seed(0)
    distributed = "LOCAL_RANK" in __import__("os").environ
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    docs = documents(tokenizer)
    args = TrainingArguments(
        output_dir=str(Path(out) / "trainer"), per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1 if distributed else ranks, num_train_epochs=1, learning_rate=1e-3,
        lr_scheduler_type="constant", optim="adamw_torch", report_to=[], remove_unused_columns=False,
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    callback = AttributionCallback(GradientSpec(projection_dim=4, normalizer="adam"),
                                   [f"d{d['doc_index']}" for d in docs], Path(out) / "rows",
                                   steps_per_shard=5, dropout=dropout)
    Trainer(model=model, args=args, train_dataset=docs, data_collator=AttributionCollator(0),
            callbacks=[callback]).train()
    return callback


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]))
