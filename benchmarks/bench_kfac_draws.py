"""What biases and several label draws cost EK-FAC, and what the draws buy: a randomly initialised
GPT-NeoX of the demo's shape (biased linears; nothing is downloaded), random documents, the
projected space (``kfac_space: projected``). Prints one table.

    .venv/bin/python benchmarks/bench_kfac_draws.py                      # 256 documents of 48 tokens
    .venv/bin/python benchmarks/bench_kfac_draws.py --documents 128 --draws 1 4 16 --threads 1

Per setting (``gradients.include_bias``, ``curvature.label_samples``): CPU seconds of the process
(``time.process_time``: less disturbed than wall time by other jobs on shared cores) in the
covariance pass and in the eigenvalue-correction pass (both with ``kfac_seed`` 0), the bytes of the factors
and eigenvalues, and the agreement of the influence scores of every query-document pair computed
with ``kfac_seed`` 0 and with ``kfac_seed`` 1 (Spearman over each query's documents, mean over
queries): the label-sampling noise that more draws average out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector
from attribution_assets.engine.preconditioning.kfac import KroneckerEigen, KroneckerPreconditioner
from attribution_assets.spec import GradientSpec


def demo_shape(vocab: int, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=512,
                                            max_position_embeddings=64)).float().eval()


def documents(n: int, length: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (length,), generator=gen).tolist(), [0] + [1] * (length - 1))
            for _ in range(n)]


def scores(model, gradients, train, queries, draws: int, seed: int) -> tuple[np.ndarray, dict]:
    """EK-FAC influence ``[queries, documents]`` and the timings and sizes of its passes."""
    curvature = CurvatureCollector(model, gradients, "sampled", seed, label_samples=draws)
    start = time.process_time()
    covariance = curvature.covariance(train)
    middle = time.process_time()
    eigen = KroneckerEigen.from_covariance(covariance, {"dim": gradients.projection_dim,
                                                        "kind": gradients.projection_kind, "seed": gradients.seed})
    correction = curvature.correction(train, eigen)
    end = time.process_time()
    ekfac = KroneckerPreconditioner(eigen, correction, damping=0.1)
    rows_q, _ = GradientCollector(model, gradients, transform=ekfac).collect(queries)
    rows_t, _ = GradientCollector(model, gradients).collect(train)
    info = {"covariance_s": middle - start, "correction_s": end - middle,
            "factor_mib": covariance.nbytes / 2**20, "eigenvalue_kib": correction.nbytes / 2**10}
    return rows_q.astype(np.float64) @ rows_t.astype(np.float64).T, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--projection", type=int, default=16)
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = demo_shape(args.vocab)
    train = documents(args.documents, args.length, args.vocab, 1)
    queries = documents(args.queries, args.length, args.vocab, 2)
    CurvatureCollector(model, GradientSpec(projection_dim=args.projection)).covariance(train[:8])  # warm-up
    print("| include_bias | label_samples | covariance pass CPU s | correction pass CPU s | factors MiB | "
          "eigenvalues KiB | seed-to-seed Spearman |")
    print("|---|---|---|---|---|---|---|")
    for bias in (False, True):
        gradients = GradientSpec(projection_dim=args.projection, include_bias=bias)
        for draws in args.draws:
            first, info = scores(model, gradients, train, queries, draws, 0)
            second, _ = scores(model, gradients, train, queries, draws, 1)
            rho = np.mean([stats.spearmanr(a, b).statistic for a, b in zip(first, second)])
            print(f"| {str(bias).lower()} | {draws} | {info['covariance_s']:.2f} | {info['correction_s']:.2f} | "
                  f"{info['factor_mib']:.2f} | {info['eigenvalue_kib']:.1f} | {rho:.3f} |", flush=True)


if __name__ == "__main__":
    main()
