"""Training overhead of ``AttributionCallback``: the same ``transformers.Trainer`` run with and
without the callback (issue #14; target <= 15 % wall time at ``projection_dim: 16``).

Model: the demo's GPT-NeoX (``DemoSpec`` defaults: 2 layers, hidden 128, vocab 1024) or, with
``--model llama135m``, the 135M-shape Llama of ``compare_bergson.py`` (random init, ~7 GiB with
AdamW at batch 8 x 256; minutes on CPU). Data: random token ids, ``--docs`` documents of
``--seq-len`` tokens, loss on every token but the first. Each variant (``plain``, ``callback``
with ``normalizer`` none, and ``callback`` with the live-optimizer ``adafactor`` or ``adam``
normalizer) trains ``--steps`` optimizer steps after a warm-up run of 2 steps; runs alternate
plain / callback ``--repeats`` times and the table shows the median seconds per step and the
overhead ratio. Threads: ``--threads`` (default 1: a shared machine).

    .venv/bin/python benchmarks/bench_callback.py --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attribution_assets.engine.training.callback import AttributionCallback, AttributionCollator
from attribution_assets.spec import DemoSpec, GradientSpec


def build_model(name: str, seq_len: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama135m":  # the shape of a 135M Llama (SmolLM-135M), as compare_bergson.py
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(2048, seq_len),
            tie_word_embeddings=True))
    demo = DemoSpec()
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=demo.vocab_size, hidden_size=demo.hidden, num_hidden_layers=demo.layers,
        num_attention_heads=demo.heads, intermediate_size=demo.intermediate,
        max_position_embeddings=max(demo.max_position_embeddings, seq_len), hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False))


def run(args, variant: str, steps: int, out: Path) -> float:
    """Seconds per optimizer step of one training run (``variant``: plain | none | adafactor | adam)."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = build_model(args.model, args.seq_len)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    n = steps * args.batch
    docs = [{"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=gen).tolist(),
             "loss_mask": [0] + [1] * (args.seq_len - 1), "doc_index": i} for i in range(n)]
    optim = "adafactor" if variant == "adafactor" else "adamw_torch"
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=1e-4, optim=optim, report_to=[], remove_unused_columns=False, save_strategy="no",
        logging_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    callbacks = []
    if variant != "plain":
        gradients = GradientSpec(projection_dim=args.projection_dim, normalizer=variant)
        callbacks.append(AttributionCallback(gradients, [str(i) for i in range(n)], out / variant,
                                             steps_per_shard=steps))
    trainer = Trainer(model=model, args=targs, train_dataset=docs, data_collator=AttributionCollator(0),
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "llama135m"], default="demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--normalizers", default="none,adafactor,adam",
                        help="comma-separated callback variants besides the plain run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["plain", *args.normalizers.split(",")]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:  # warm-up
            run(args, v, 2, Path(tmp) / f"warm-{v}")
        for r in range(args.repeats):
            for v in variants:
                times[v].append(run(args, v, args.steps, Path(tmp) / f"{r}-{v}"))
    plain = statistics.median(times["plain"])
    print(f"model={args.model} batch={args.batch} seq_len={args.seq_len} steps={args.steps} "
          f"projection_dim={args.projection_dim} threads={args.threads} repeats={args.repeats}")
    print("| variant | s/step (median) | runs | overhead vs plain |")
    print("|---|---|---|---|")
    for v in variants:
        med = statistics.median(times[v])
        runs = ", ".join(f"{t:.4f}" for t in times[v])
        label = "plain Trainer" if v == "plain" else f"callback, normalizer {v}"
        print(f"| {label} | {med:.4f} | {runs} | {med / plain - 1:+.1%} |")


if __name__ == "__main__":
    main()
