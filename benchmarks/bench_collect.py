"""Throughput of hooked ``GradientCollector.collect`` vs a naive per-document backward loop,
and of per-token rows against document rows.

The naive loop runs one ``loss.backward()`` per document and then projects each
module's ``weight.grad`` with the same ``L G R^T`` matrices. Both phases run in
this process on the same random GPT-NeoX weights and documents. "phase MiB" is
the peak of the resident set sampled every 2 ms during the phase; the final line
gives the process's ``resource.getrusage(...).ru_maxrss``. The ``positional`` line
collects one-pass per-token rows (``per_token: positional``) of the same documents; its
"x doc" column is its time over the hooked per-document time (target <= 1.5). With
``--loss-docs N`` the per-target-loss rows (``per_token: loss``, one backward pass per
target position) of the first N documents are timed against their document rows too.

    .venv/bin/python benchmarks/bench_collect.py --sizes 2x128 4x256 --docs 32 --threads 1
    .venv/bin/python benchmarks/bench_collect.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import threading
import time

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.projection import Projector
from attribution_assets.spec import GradientSpec


def build(layers: int, width: int, vocab: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        intermediate_size=4 * width,
        max_position_embeddings=1024,
    )
    return GPTNeoXForCausalLM(cfg).float().eval()


def make_docs(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    docs = []
    for length in rng.integers(min_len, max_len + 1, size=n):
        docs.append((rng.integers(0, vocab, size=length).tolist(), [0] + [1] * (int(length) - 1)))
    return docs


def naive(model, docs, config: GradientSpec) -> np.ndarray:
    """One backward per document, then ``L G R^T`` of each hooked module's ``weight.grad``."""
    collector = GradientCollector(model, config)  # only for module selection and layout
    device = next(model.parameters()).device
    proj = Projector(config.projection_dim, config.projection_kind, config.seed, device)
    rows = np.zeros((len(docs), collector.dims), np.float32)
    for i, (ids, mask) in enumerate(docs):
        model.zero_grad(set_to_none=True)
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
        (nll * torch.tensor(mask[1:], dtype=nll.dtype, device=device)).sum().backward()
        for s in collector.specs:
            grad = s.module.weight.grad.float()
            rows[i, s.start : s.stop] = proj.project(s.name, grad).flatten().cpu().numpy()
    return rows


def hooked(model, docs, config: GradientSpec) -> np.ndarray:
    return GradientCollector(model, config).collect(docs)[0]


def positional(model, docs, config: GradientSpec) -> np.ndarray:
    return hooked(model, docs, dataclasses.replace(config, per_token="positional"))


def per_target_loss(model, docs, config: GradientSpec) -> np.ndarray:
    return hooked(model, docs, dataclasses.replace(config, per_token="loss"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def best_of(repeat: int, model, docs, config, *fns):
    """Each of ``fns`` timed ``repeat`` times, alternating (so load changes hit all alike):
    per function, the fastest time, the highest phase peak and the rows."""
    runs = [[run_phase(fn, model, docs, config) for fn in fns] for _ in range(repeat)]
    return [(min(r[i][0] for r in runs), max(r[i][1] for r in runs), runs[-1][i][2])
            for i in range(len(fns))]


def run_phase(fn, model, docs, config):
    """``(seconds, peak RSS MiB during the phase, rows)``."""
    peak, done = [_rss_mib()], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    rows = fn(model, docs, config)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(peak[0], _rss_mib()), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["2x128", "4x256"], help="LAYERSxWIDTH")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--projection-dim", type=int, default=16)
    ap.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=1024,
        help="1024 suits CPU caches; GradientSpec defaults to 4096",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model weights' dtype (products stay float32)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the phases this many times, alternating, and keep each one's fastest")
    ap.add_argument("--loss-docs", type=int, default=0,
                    help="also time per-target-loss rows on this many documents (slow: 0 skips)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = GradientSpec(
        projection_dim=args.projection_dim, max_tokens_per_batch=args.max_tokens_per_batch
    )
    docs = make_docs(args.docs, args.min_len, args.max_len, args.vocab)
    tokens = sum(len(ids) for ids, _ in docs)
    print(
        f"{args.docs} docs, {tokens} tokens, p={args.projection_dim}, "
        f"torch threads={torch.get_num_threads()}, device={args.device}, dtype={args.dtype}"
    )
    header = f"{'model':>8} {'method':>8} {'seconds':>8} {'tokens/s':>10} {'phase MiB':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        layers, width = (int(v) for v in size.split("x"))
        model = build(layers, width, args.vocab).to(args.device, getattr(torch, args.dtype))
        hooked(model, docs[:2], config)  # warm-up
        (t_naive, rss_naive, ref), (t_hook, rss_hook, rows), (t_pos, rss_pos, token_rows) = best_of(
            args.repeat, model, docs, config, naive, hooked, positional)
        err = float(np.abs(rows - ref).max() / np.abs(ref).max())
        print(
            f"{size:>8} {'naive':>8} {t_naive:8.2f} {tokens / t_naive:10.0f} {rss_naive:9.0f} {1.0:8.2f}"
        )
        print(
            f"{size:>8} {'hooked':>8} {t_hook:8.2f} {tokens / t_hook:10.0f} {rss_hook:9.0f} "
            f"{t_naive / t_hook:8.2f}   (max rel. diff vs naive {err:.1e})"
        )
        print(
            f"{size:>8} {'position':>8} {t_pos:8.2f} {tokens / t_pos:10.0f} {rss_pos:9.0f} "
            f"{t_naive / t_pos:8.2f}   ({t_pos / t_hook:.2f} x doc; {token_rows.shape[0]} rows)"
        )
        if args.loss_docs:
            few = docs[: args.loss_docs]
            t_doc, _, _ = run_phase(hooked, model, few, config)
            t_loss, rss_loss, _ = run_phase(per_target_loss, model, few, config)
            print(
                f"{size:>8} {'loss':>8} {t_loss:8.2f} {sum(len(i) for i, _ in few) / t_loss:10.0f} "
                f"{rss_loss:9.0f} {'':>8}   ({t_loss / t_doc:.1f} x doc on {len(few)} docs)"
            )
    print(
        f"process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
