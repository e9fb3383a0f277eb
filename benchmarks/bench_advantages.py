"""GRPO group advantages (``engine.io.advantages.group_advantages``) at RL data-set sizes; prints
a table. Completions come in prompt groups of ``--group-size`` (string keys ``p<index>``, as
``corpus.group_column`` gives them), rewards standard normal with 1 % NaN. Each size is timed
``--repeats`` times (median, wall seconds, the whole call: key conversion included). At
``--baseline`` completions the quadratic implementation that preceded the group-by (one mask
over all completions per group) is timed in the same process and both results are compared.

    .venv/bin/python benchmarks/bench_advantages.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from attribution_assets.engine.io.advantages import GRPO_EPS, group_advantages


def quadratic_group_advantages(rewards, groups, weighting):
    """The implementation before the group-by: O(n) mask per group, O(n^2) in all."""
    r = np.asarray(rewards, dtype=np.float64)
    keys = list(groups) if groups is not None else ["" for _ in range(len(r))]
    out = np.full(len(r), np.nan)
    finite = np.isfinite(r)
    for key in dict.fromkeys(keys):
        members = np.array([k == key for k in keys]) & finite
        values = r[members]
        if not len(values):
            continue
        centered = values - values.mean()
        if weighting == "dr_grpo":
            out[members] = centered
        else:
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            out[members] = centered / (std + GRPO_EPS)
    return out


def completions(n: int, group_size: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``(rewards [n], group keys [n])``: shuffled prompt groups, 1 % NaN rewards."""
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal(n)
    rewards[rng.random(n) < 0.01] = np.nan
    groups = [f"p{i}" for i in rng.permutation(np.arange(n) // group_size)]
    return rewards, groups


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--baseline", type=int, default=4_000, help="completions for the quadratic baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weighting", default="grpo", choices=["grpo", "dr_grpo"])
    args = parser.parse_args()

    rewards, groups = completions(args.baseline, args.group_size)
    old_s, old = timed(lambda: quadratic_group_advantages(rewards, groups, args.weighting), 1)
    new_s, new = timed(lambda: group_advantages(rewards, groups, args.weighting), args.repeats)
    both = np.isfinite(old)
    assert (both == np.isfinite(new)).all()
    diff = float(np.abs(old[both] - new[both]).max())
    print(f"baseline at {args.baseline:,} completions (groups of {args.group_size}): quadratic {old_s:.3f} s, "
          f"group-by {new_s:.4f} s, {old_s / new_s:.0f}x; largest difference {diff:.1e}")
    print("| completions | groups | group-by s | s per 1M |")
    print("|---|---|---|---|")
    for n in args.sizes:
        rewards, groups = completions(n, args.group_size)
        seconds, _ = timed(lambda r=rewards, g=groups: group_advantages(r, g, args.weighting), args.repeats)
        print(f"| {n:,} | {-(-n // args.group_size):,} | {seconds:.3f} | {seconds / n * 1e6:.3f} |")


if __name__ == "__main__":
    main()
