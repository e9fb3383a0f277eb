"""Training overhead of ``AttributionCallback``: the same ``transformers.Trainer`` run with and
without the callback (issue #14; target <= 15 % wall time at ``projection_dim: 16``).

Model: the demo's GPT-NeoX (``DemoSpec`` defaults: 2 layers, hidden 128, vocab 1024) or, with
``--model llama135m``, the 135M-shape Llama of ``compare_bergson.py`` (random init, ~7 GiB with
AdamW at batch 8 x 256; minutes on CPU). Data: random token ids, ``--docs`` documents of
``--seq-len`` tokens, loss on every token but the first. Each variant (``plain``, ``callback``
with ``normalizer`` none, and ``callback`` with the live-optimizer ``adafactor`` or ``adam``
normalizer; a variant ``<normalizer>:off`` records with ``dropout="off"``, one more forward and
backward per micro-batch) trains 2 warm-up + ``--steps`` optimizer steps; a step is timed from
``on_step_begin`` to the end of ``on_step_end`` (the callback's per-step work included), in wall
and in process CPU seconds (CPU time is what a shared machine's load disturbs least). Runs
alternate the variants ``--repeats`` times; the table shows medians over steps and runs.
Threads: ``--threads`` (default 1: a shared machine).

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


class StepTimer:
    """Wall and process CPU seconds of each optimizer step, from ``on_step_begin`` to the end of
    ``on_step_end`` (registered after the attribution callback, so its per-step work is inside;
    the Trainer's setup and the final shard write are not)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                wall, cpu = timer.start
                timer.steps.append((time.perf_counter() - wall, time.process_time() - cpu))

        self.steps: list[tuple[float, float]] = []
        self.callback = _Callback()


def run(args, variant: str, steps: int, out: Path) -> tuple[float, float]:
    """``(wall, cpu)`` median seconds per optimizer step of one training run after 2 warm-up steps
    (``variant``: plain | none | adafactor | adam, each optionally ``:off`` for ``dropout="off"``)."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = build_model(args.model, args.seq_len)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    n = steps * args.batch
    docs = [{"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=gen).tolist(),
             "loss_mask": [0] + [1] * (args.seq_len - 1), "doc_index": i} for i in range(n)]
    normalizer, _, dropout = variant.partition(":")
    optim = "adafactor" if normalizer == "adafactor" else "adamw_torch"
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=1e-4, optim=optim, report_to=[], remove_unused_columns=False, save_strategy="no",
        logging_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    callbacks = []
    if variant != "plain":
        gradients = GradientSpec(projection_dim=args.projection_dim, normalizer=normalizer)
        callbacks.append(AttributionCallback(gradients, [str(i) for i in range(n)], out / variant,
                                             steps_per_shard=steps, dropout=dropout or "step"))
    timer = StepTimer()
    trainer = Trainer(model=model, args=targs, train_dataset=docs, data_collator=AttributionCollator(0),
                      callbacks=[*callbacks, timer.callback])
    trainer.train()
    kept = timer.steps[2:]
    return statistics.median(w for w, _ in kept), statistics.median(c for _, c in kept)


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
                        help="comma-separated callback variants besides the plain run (none, adafactor, "
                             "adam; with ':off' for dropout='off', e.g. none:off)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["plain", *args.normalizers.split(",")]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for v in variants:
                times[v].append(run(args, v, args.steps + 2, Path(tmp) / f"{r}-{v.replace(':', '-')}"))
    wall0 = statistics.median(w for w, _ in times["plain"])
    cpu0 = statistics.median(c for _, c in times["plain"])
    print(f"model={args.model} batch={args.batch} seq_len={args.seq_len} steps={args.steps} "
          f"projection_dim={args.projection_dim} threads={args.threads} repeats={args.repeats}")
    print("| variant | wall s/step | CPU s/step | wall overhead | CPU overhead | per-run wall medians |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        wall = statistics.median(w for w, _ in times[v])
        cpu = statistics.median(c for _, c in times[v])
        runs = ", ".join(f"{w:.4f}" for w, _ in times[v])
        normalizer, _, dropout = v.partition(":")
        label = "plain Trainer" if v == "plain" else \
            f"callback, normalizer {normalizer}" + (", dropout off" if dropout else "")
        print(f"| {label} | {wall:.4f} | {cpu:.4f} | {wall / wall0 - 1:+.1%} | {cpu / cpu0 - 1:+.1%} | {runs} |")


if __name__ == "__main__":
    main()
