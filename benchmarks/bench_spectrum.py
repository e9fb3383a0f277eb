"""TrackStar's preconditioner step: the query spectrum of the auto mixing weight from the
``[n, n]`` Gram matrices (``RowMatrices.eigenvalues``) against ``eigvalsh`` of the ``[d, d]``
matrices (the computation before), and the whole ``trackstar_preconditioner`` (two spectra,
one ``eigh`` of the mixed matrix per module) with each, on random rows; prints seconds, the
ratio and the largest difference of the spectra and of lambda.

    .venv/bin/python benchmarks/bench_spectrum.py --dims 1024 2048 --modules 2 --queries 100
"""

import argparse
import time

import numpy as np

from attribution_assets.engine.preconditioning import autocorrelation as ac
from attribution_assets.engine.preconditioning.preconditioners import trackstar_preconditioner
from attribution_assets.engine.runtime import limit_threads
from attribution_assets.spec import ScoringSpec


def dense_spectrum(self) -> np.ndarray:  # the computation before: eigvalsh of every [d, d]
    vals = [np.linalg.eigvalsh(self.matrices[m.name]) for m in self.layout]
    return np.sort(np.clip(np.concatenate(vals), 0.0, None))[::-1]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048], help="columns per module (p^2)")
    parser.add_argument("--modules", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    limit_threads(args.threads)
    rng = np.random.default_rng(0)
    gram_spectrum = ac.Autocorrelation.spectrum
    for d in args.dims:
        layout = [(f"m{i}", i * d, (i + 1) * d) for i in range(args.modules)]
        train = ac.accumulate([rng.standard_normal((args.train, d * args.modules)).astype(np.float32)], layout)
        query = ac.row_autocorrelation(rng.standard_normal((args.queries, d * args.modules)).astype(np.float32),
                                       layout)
        new, t_new = timed(query.spectrum)
        ac.Autocorrelation.spectrum = dense_spectrum
        old, t_old = timed(query.spectrum)
        before, p_old = timed(trackstar_preconditioner, train, query, ScoringSpec())
        ac.Autocorrelation.spectrum = gram_spectrum
        after, p_new = timed(trackstar_preconditioner, train, query, ScoringSpec())
        print(f"d={d} x {args.modules} modules, {args.queries} queries: query spectrum {t_old:.2f} s -> "
              f"{t_new:.3f} s ({t_old / t_new:.0f}x), max |diff| / top {np.abs(new - old).max() / old[0]:.1e}; "
              f"preconditioner {p_old:.2f} s -> {p_new:.2f} s ({p_old / p_new:.2f}x), "
              f"lambda {before.lam:.12f} vs {after.lam:.12f}", flush=True)


if __name__ == "__main__":
    main()
