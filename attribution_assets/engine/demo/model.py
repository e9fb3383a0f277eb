"""Tiny GPT-NeoX and byte-level BPE tokenizer trained on the demo corpus (CPU, seconds).

Training is deterministic: fixed random init (``torch.manual_seed``), a seeded data
order, no dropout, float32, and one torch thread whatever the machine (the model is too small
for a second thread to pay off: with passive OpenMP waits two threads took 55 ms per step and
one 46 ms, 41.5 ms with the fused AdamW kernel; and held-out accuracy, which swings with float
rounding, no longer depends on the core count). The loss is the mean token cross-entropy over all
non-pad tokens of a batch (each document gets an appended eos); with ``loss_weights``
it is the weighted mean ``sum_i w_i sum_t l_it / sum_i w_i n_i``, so a weight of 0
removes a document while keeping the data order and the number of steps unchanged.

The output folder holds the model (``save_pretrained``, safetensors), the tokenizer,
``optimizer.pt`` (AdamW state, loadable with ``torch.load(weights_only=True)``) and
``training.json`` (config and metrics). It is written to a temporary sibling and
renamed into place.

With ``record`` (a ``GradientSpec``) and ``DemoSpec.record_epochs`` = N >= 1, the last N
epochs record train-time rows with ``engine.training.recorder.TrainTimeRecorder`` (the
Trainer callback's machinery, driven by this loop): a document's row is ``w_i`` times the
gradient of its summed token loss at the parameters of its step, normalized by AdamW's state
right after that step; documents of weight 0 get none. One store per epoch, in
``PipelinePaths.recorded_gradients(<output folder>)``. The hooks only read tensors: the model
is the same with and without recording.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, PreTrainedTokenizerFast

from attribution_assets.engine.demo.corpus import DemoCorpus
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.runtime import limit_threads
from attribution_assets.engine.training.recorder import IGNORE, TrainTimeRecorder
from attribution_assets.spec import DemoSpec, GradientSpec

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_demo_tokenizer(
    texts: Sequence[str], vocab_size: int = 1024, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with eos/bos and pad tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def gpt_neox_config(demo: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> GPTNeoXConfig:
    """The demo's ``GPTNeoXConfig`` for ``demo``'s architecture and ``tokenizer`` (no dropout)."""
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=demo.hidden,
        num_hidden_layers=demo.layers,
        num_attention_heads=demo.heads,
        intermediate_size=demo.intermediate,
        max_position_embeddings=demo.max_position_embeddings,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode_documents(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = [ids + [tokenizer.eos_token_id] for ids in encoded]
    too_long = [i for i, ids in enumerate(out) if len(ids) > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} documents exceed {max_length} tokens (+eos)")
    return out


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def weighted_lm_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i sum_t l_it / sum_i w_i n_i`` over next-token losses of non-pad tokens."""
    token_loss = (
        F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
    )
    numerator = (token_loss.sum(dim=1) * weights).sum()
    denominator = (mask[:, 1:].sum(dim=1) * weights).sum()
    return numerator / denominator.clamp_min(1e-12)


def data_order(n: int, config: DemoSpec, seed: int | None = None) -> list[list[int]]:
    """Deterministic list of batches (document indices): one shuffle per epoch, seeded by
    ``seed`` (default ``config.seed``)."""
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    batches = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=generator).tolist()
        batches += [perm[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    return batches


@torch.no_grad()
def fact_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 64,
) -> float:
    """Fraction of ``(prompt, completion)`` pairs whose completion tokens are all argmax.

    Teacher-forced greedy check: every completion token must be the argmax of the
    model's next-token distribution given the prompt and the preceding completion
    tokens. Prompt and completion are tokenized separately (no special tokens).
    Puts ``model`` in eval mode.
    """
    if not pairs:
        return float("nan")
    model.eval()
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = range(start, min(start + batch_size, len(pairs)))
        ids, mask = _pad([prompts[i] + completions[i] for i in chunk], tokenizer.pad_token_id)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1)
        for row, i in enumerate(chunk):
            p, c = len(prompts[i]), len(completions[i])
            correct += predicted[row, p - 1 : p + c - 1].tolist() == completions[i]
    return correct / len(pairs)


def _lr_lambda(config: DemoSpec, total_steps: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def train_demo_model(
    tokenizer: PreTrainedTokenizerFast,
    documents_texts: Sequence[str],
    config: DemoSpec,
    output_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    loss_weights: Sequence[float] | None = None,
    eval_pairs: dict[str, Sequence[tuple[str, str]]] | None = None,
    record: GradientSpec | None = None,
    doc_ids: Sequence[str] | None = None,
    order_seed: int | None = None,
) -> dict:
    """Train the demo GPT-NeoX from a seeded init on all documents and save it.

    ``config.seed`` seeds the initialization and, unless ``order_seed`` is given, the data
    order (:func:`data_order`).

    ``loss_weights`` (one float per document) scale each document's loss; 0 drops a
    document without changing data order or step count. ``eval_pairs`` maps a name
    to ``(prompt, completion)`` pairs; metric ``f"{name}_accuracy"`` is reported.
    ``record``/``doc_ids``: record train-time rows during the last ``config.record_epochs``
    epochs (module docstring; ``doc_ids`` name the documents in the stores).
    Returns the metrics (also written to ``training.json``).
    """
    if loss_weights is not None and len(loss_weights) != len(documents_texts):
        raise ValueError("loss_weights needs one weight per document")
    recording = record is not None and config.record_epochs > 0
    if recording and (doc_ids is None or len(doc_ids) != len(documents_texts)):
        raise ValueError("recording train-time rows needs one doc_id per document")
    started = time.perf_counter()
    encoded = _encode_documents(tokenizer, documents_texts, config.max_position_embeddings)
    weights = torch.tensor(
        [1.0] * len(encoded) if loss_weights is None else list(loss_weights),
        dtype=torch.float32,
    )
    torch.manual_seed(config.seed)
    # the modeling code, imported only to train (it costs seconds; importing this module must not)
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(gpt_neox_config(config, tokenizer)).float()
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    batches = data_order(len(encoded), config, order_seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, len(batches)))
    steps_per_epoch = len(batches) // config.epochs
    first_recorded = (config.epochs - config.record_epochs) * steps_per_epoch
    losses = []
    restore_threads = limit_threads(1)  # see the module docstring
    try:
        with atomic_dir(Path(output_dir)) as folder:
            recorder = None
            if recording:
                recorder = TrainTimeRecorder(record, doc_ids, PipelinePaths.recorded_gradients(folder),
                                             doc_weights=weights.tolist(), steps_per_shard=steps_per_epoch)
            for step, batch in enumerate(batches):
                ids, mask = _pad([encoded[i] for i in batch], tokenizer.pad_token_id)
                record_step = recorder is not None and step >= first_recorded
                if record_step:
                    if step == first_recorded:
                        recorder.attach(model)
                    recorder.start_micro_batch(torch.tensor(batch), torch.where(mask.bool(), ids, IGNORE), mask)
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = weighted_lm_loss(logits, ids, mask, weights[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if record_step:
                    recorder.finish_micro_batch()
                    recorder.optimizer_step(optimizer)
                    recorder.step_end(step + 1, (step + 1) / steps_per_epoch)
                scheduler.step()
                losses.append(loss.item())
                if (step + 1) % config.log_every == 0 or step + 1 == len(batches):
                    recent = losses[-config.log_every :]
                    log(f"step {step + 1}/{len(batches)} loss {sum(recent) / len(recent):.4f}")
            if recorder is not None:
                recorder.close(len(batches))
            train_seconds = time.perf_counter() - started

            metrics: dict = {
                "steps": len(batches),
                "documents": len(encoded),
                "documents_with_weight": int((weights != 0).sum()),
                "first_loss": losses[0],
                "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                "train_seconds": round(train_seconds, 3),
            }
            if recorder is not None:
                metrics["train_time_rows"] = sum(GradientStore(p).rows for p in recorder.shards)
            for name, pairs in (eval_pairs or {}).items():
                metrics[f"{name}_accuracy"] = fact_accuracy(model, tokenizer, pairs)
                log(f"{name} accuracy {metrics[f'{name}_accuracy']:.4f}")

            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            record_json = {"config": dataclasses.asdict(config), "metrics": metrics}
            (folder / "training.json").write_text(json.dumps(record_json, indent=2) + "\n")
    finally:
        restore_threads()
    return metrics


def train_demo(
    corpus: DemoCorpus,
    output_dir: str | os.PathLike,
    config: DemoSpec | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train tokenizer and model on ``corpus.documents``; report both accuracies.

    Metrics include ``train_phrasings_accuracy`` (``corpus.training_prompts``) and
    ``heldout_phrasings_accuracy`` (queries), plus ``total_seconds``.
    """
    config = config or DemoSpec()
    started = time.perf_counter()
    texts = [d["text"] for d in corpus.documents]
    tokenizer = train_demo_tokenizer(texts, config.vocab_size, config.max_position_embeddings)
    metrics = train_demo_model(
        tokenizer,
        texts,
        config,
        output_dir,
        log=log,
        eval_pairs={
            "train_phrasings": corpus.training_prompts,
            "heldout_phrasings": corpus.query_pairs,
        },
    )
    metrics["total_seconds"] = round(time.perf_counter() - started, 3)
    return metrics
