"""EK-FAC / K-FAC at the shape of a 135M-parameter Llama (SmolLM-135M: hidden 576, intermediate
1536, 30 layers, 9 heads, 3 key-value heads, vocabulary 49152, tied embeddings), randomly
initialised (nothing is downloaded): time and peak memory of each phase on a few short
sequences, and the bytes each asset holds. Prints one table.

    .venv/bin/python benchmarks/bench_kfac.py                     # 8 sequences of 64 tokens
    .venv/bin/python benchmarks/bench_kfac.py --sequences 16 --length 128 --threads 2

Phases: the covariance pass (forward + backward with sampled labels, float64 token sums of
``a aᵀ`` and ``g gᵀ`` per module), the eigendecomposition of every ``A`` and ``S``, EK-FAC's
eigenvalue-correction pass, each saved as its asset saves it, preconditioning one query's full
gradient (then projecting it, ``projection_dim`` 16); then the projected space (``kfac_space:
projected``, the default): eigendecomposition of ``R A Rᵀ`` and ``L S Lᵀ``, its correction pass
and one query. Peak memory is the process's peak
resident set size after the phase (it only grows), next to the size after building the model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attribution_assets.engine.gradients.collect import peak_rss_mb
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector
from attribution_assets.engine.preconditioning.kfac import (
    KroneckerEigen,
    KroneckerPreconditioner,
)
from attribution_assets.engine.preconditioning.kfac_files import projection_for
from attribution_assets.spec import GradientSpec


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def smollm_shape(layers: int = 30, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).float().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens-per-batch", type=int, default=512)
    parser.add_argument("--layers", type=int, default=30, help="30 for the 135M shape; fewer for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    def phase(name: str, start: float, **extra) -> None:
        rows.append((name, time.perf_counter() - start, peak_rss_mb(), extra))
        print(f"{name}: {rows[-1][1]:.1f} s, peak RSS {rows[-1][2]:.0f} MiB {extra}", flush=True)

    start = time.perf_counter()
    model = smollm_shape(args.layers)
    parameters = sum(p.numel() for p in model.parameters())
    phase("build model", start, parameters=parameters)
    gen = torch.Generator().manual_seed(1)
    docs = [(torch.randint(0, 49152, (args.length,), generator=gen).tolist(), [0] + [1] * (args.length - 1))
            for _ in range(args.sequences)]
    gradients = GradientSpec(projection_dim=16, max_tokens_per_batch=args.tokens_per_batch)
    collector = CurvatureCollector(model, gradients, "sampled", 0)
    hooked = sum(m.out_features * m.in_features for m in collector.modules)

    tmp = Path(tempfile.mkdtemp(prefix="bench-kfac-"))
    try:
        start = time.perf_counter()
        covariance = collector.covariance(docs)
        phase("covariance pass", start, modules=len(collector.modules), factor_bytes=covariance.nbytes)
        start = time.perf_counter()
        phase("save kfac_factors", start, file_bytes=dir_bytes(covariance.save(tmp / "factors")))
        start = time.perf_counter()
        eigen = KroneckerEigen.from_covariance(covariance)
        report = eigen.report()
        conditions = [v[k] for v in report.values() for k in ("condition_A", "condition_S")]
        phase("eigendecomposition", start, eigen_bytes=eigen.nbytes, max_condition=f"{max(conditions):.3g}")
        start = time.perf_counter()
        phase("save kfac_eigendecomposition", start, file_bytes=dir_bytes(eigen.save(tmp / "eigen")))
        start = time.perf_counter()
        correction = collector.correction(docs, eigen)
        phase("eigenvalue correction", start, correction_bytes=correction.nbytes)
        start = time.perf_counter()
        phase("save ekfac_eigenvalues", start, file_bytes=dir_bytes(correction.save(tmp / "eigenvalues")))
    finally:
        shutil.rmtree(tmp)
    start = time.perf_counter()
    ekfac = KroneckerPreconditioner(eigen, correction, damping=0.1)
    query = GradientCollector(model, gradients, transform=ekfac).collect(docs[:1])[0]
    phase("precondition 1 query (full space)", start, dims=query.shape[1], ok=ekfac.report()["ok"],
          preconditioner_bytes=ekfac.nbytes)
    del ekfac, eigen, correction
    start = time.perf_counter()
    projected = KroneckerEigen.from_covariance(covariance, projection_for(gradients, "projected"))
    phase("eigendecomposition (projected, p = 16)", start, eigen_bytes=projected.nbytes)
    start = time.perf_counter()
    projected_correction = collector.correction(docs, projected)
    phase("eigenvalue correction (projected)", start, correction_bytes=projected_correction.nbytes)
    start = time.perf_counter()
    small = KroneckerPreconditioner(projected, projected_correction, damping=0.1)
    projected_query = GradientCollector(model, gradients, transform=small).collect(docs[:1])[0]
    phase("precondition 1 query (projected)", start, ok=small.report()["ok"])

    print(f"\n{args.sequences} sequences x {args.length} tokens, {args.threads} threads, "
          f"{parameters / 1e6:.1f}M parameters ({hooked / 1e6:.1f}M in {len(collector.modules)} hooked "
          f"modules; their (I*O)^2 Gauss-Newton blocks would hold "
          f"{sum((m.out_features * m.in_features) ** 2 for m in collector.modules) * 8 / 2**40:.0f} TiB "
          "in float64)\n")
    print("| phase | seconds | peak RSS MiB | notes |\n|---|---|---|---|")
    for name, seconds, rss, extra in rows:
        notes = ", ".join(f"{k} {v / 2**20:.1f} MiB" if k.endswith("bytes") else f"{k} {v}"
                          for k, v in extra.items())
        print(f"| {name} | {seconds:.1f} | {rss:.0f} | {notes} |")
    finite = all(v["finite"] for v in report.values()) and bool(np.isfinite(query).all()) \
        and bool(np.isfinite(projected_query).all())
    print(f"\nall factors and the preconditioned query finite: {finite}")


if __name__ == "__main__":
    main()
