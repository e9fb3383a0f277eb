"""Preconditioners vs explicit NumPy/SciPy ground truth (small random data, CPU)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.linalg

from attribution_assets.engine.preconditioning.autocorrelation import (
    Autocorrelation,
    AutocorrelationAccumulator,
    load_autocorrelation,
    normalize_layout,
    row_autocorrelation,
    save_autocorrelation,
)
from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    auto_mixing_lambda,
    check_preconditioner,
)

LAYOUT = [("attn.q", 0, 3), {"name": "mlp.up", "start": 3, "stop": 7}, ("mlp.down", 7, 12)]
DIMS = 12


def grads(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return (rng.normal(size=(n, DIMS)) * scale).astype(np.float32)


def autocorr(x: np.ndarray) -> Autocorrelation:
    return AutocorrelationAccumulator(LAYOUT).update(x).finalize()


def explicit_r(x: np.ndarray, layout=LAYOUT) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    return {
        m.name: x[:, m.start : m.stop].T @ x[:, m.start : m.stop] / len(x)
        for m in normalize_layout(layout)
    }


def test_accumulator_matches_explicit_and_streaming_equals_one_shot():
    x = grads(np.random.default_rng(0), 50)
    one_shot = autocorr(x)
    acc = AutocorrelationAccumulator(LAYOUT, chunk_rows=4)
    for start, stop in [(0, 7), (7, 7), (7, 31), (31, 50)]:
        acc.update(x[start:stop])
    streamed = acc.finalize()
    assert one_shot.n == streamed.n == 50
    for name, r in explicit_r(x).items():
        assert one_shot.matrices[name].dtype == np.float64
        np.testing.assert_allclose(one_shot.matrices[name], r, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(streamed.matrices[name], r, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(streamed.matrices[name], streamed.matrices[name].T)


def test_row_autocorrelation_equals_the_accumulator():
    x = grads(np.random.default_rng(7), 9)
    lazy, streamed = row_autocorrelation(x, LAYOUT), autocorr(x)
    assert lazy.n == 9 and sorted(lazy.matrices) == sorted(streamed.matrices)
    for name, r in streamed.matrices.items():
        np.testing.assert_allclose(lazy.matrices[name], r, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(lazy.matrices[name], lazy.matrices[name].T)
    x[3, 8] = np.nan
    with pytest.raises(ValueError, match="non-finite gradients in module 'mlp.down'"):
        row_autocorrelation(x, LAYOUT)


def test_merge_equals_combined_and_memmap_float16(tmp_path):
    rng = np.random.default_rng(1)
    a, b = grads(rng, 20), grads(rng, 13)
    mm = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.float16, shape=b.shape)
    mm[:] = b
    mm.flush()
    merged = AutocorrelationAccumulator(LAYOUT).update(a)
    merged.merge(
        AutocorrelationAccumulator(LAYOUT).update(np.load(tmp_path / "b.npy", mmap_mode="r"))
    )
    combined = autocorr(np.concatenate([a, b.astype(np.float16).astype(np.float32)]))
    result = merged.finalize()
    assert result.n == combined.n == 33
    for name in combined.matrices:
        np.testing.assert_allclose(result.matrices[name], combined.matrices[name], rtol=1e-12)


def explicit_ops(r: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(R + c*mean(eig) I)^{-1/2} and ^{-1}, via scipy sqrtm/inv (no eigh)."""
    damped = r + damping * np.trace(r) / len(r) * np.eye(len(r))
    return np.linalg.inv(scipy.linalg.sqrtm(damped).real), np.linalg.inv(damped)


@pytest.mark.parametrize("damping", [0.1, 0.5])
def test_preconditioner_matches_explicit_formula(damping):
    rng = np.random.default_rng(2)
    train, query, x = grads(rng, 40), grads(rng, 6, scale=3.0), grads(rng, 9)
    p = Preconditioner.from_autocorrelation(
        autocorr(train), autocorr(query), lam=0.3, damping=damping
    )
    assert (p.lam, p.damping, p.n_train, p.n_query) == (0.3, damping, 40, 6)
    half, inv = p.apply(x, -0.5), p.apply(x, -1.0)
    assert half.dtype == inv.dtype == np.float32
    rt, rq = explicit_r(train), explicit_r(query)
    for m in p.layout:
        r = 0.3 * rq[m.name] + 0.7 * rt[m.name]
        np.testing.assert_allclose(p.matrices[m.name], r, rtol=1e-12)
        inv_half, inv_full = explicit_ops(r, damping)
        xm = x[:, m.start : m.stop].astype(np.float64)
        np.testing.assert_allclose(half[:, m.start : m.stop], xm @ inv_half, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(inv[:, m.start : m.stop], xm @ inv_full, rtol=1e-4, atol=1e-5)
        op_half = p.operator(m.name, -0.5)
        np.testing.assert_allclose(op_half @ op_half, p.operator(m.name, -1.0), rtol=1e-10)
    np.testing.assert_allclose(p.apply(half, -0.5), inv, rtol=1e-4, atol=1e-5)


def test_tiny_negative_eigenvalues_are_clamped_and_zero_module_is_identity():
    r = np.diag([-1e-15, 1.0, 2.0])
    zero = np.zeros((9, 9))
    p = Preconditioner(LAYOUT, {"attn.q": r, "mlp.up": zero[:4, :4], "mlp.down": zero[:5, :5]})
    clamped_mean = 1.0
    expected = 1.0 / (np.array([0.0, 1.0, 2.0]) + 0.1 * clamped_mean)
    np.testing.assert_allclose(np.diag(p.operator("attn.q", -1.0)), expected, rtol=1e-12)
    np.testing.assert_allclose(p.operator("mlp.up", -1.0), np.eye(4) / 0.1, rtol=1e-12)
    assert check_preconditioner(p)["ok"]


def test_mixing_off_and_lam_validation():
    rng = np.random.default_rng(3)
    train, query = autocorr(grads(rng, 30)), autocorr(grads(rng, 5))
    for p in (
        Preconditioner.from_autocorrelation(train),
        Preconditioner.from_autocorrelation(train, query, lam=None),
    ):
        assert p.lam is None and p.n_query == 0
        for name, r in train.matrices.items():
            np.testing.assert_array_equal(p.matrices[name], r)
    with pytest.raises(ValueError, match="needs a query"):
        Preconditioner.from_autocorrelation(train, lam=0.5)
    for bad in (1.5, -0.1, "median"):
        with pytest.raises(ValueError, match="lam must be"):
            Preconditioner.from_autocorrelation(train, query, lam=bad)


def diag_autocorr(values: list[float], n: int = 10) -> Autocorrelation:
    layout = normalize_layout(LAYOUT)
    return Autocorrelation(layout, {m.name: np.diag(values[m.start : m.stop]) for m in layout}, n)


def test_auto_lambda_follows_trackstar_rule():
    t_vals = [float(v) for v in range(1, 13)]  # pooled, sorted desc: 12, 11, 10, ...
    q_vals = [0.0] * 8 + [40.0, 30.0, 20.0, 10.0]  # rank 4, sorted desc: 40, 30, 20, 10
    train, query = diag_autocorr(t_vals), diag_autocorr(q_vals)
    lam, k = auto_mixing_lambda(train, query, top_k=3)
    assert k == 3
    assert lam == pytest.approx(10.0 / (20.0 + 10.0))
    assert lam * 20.0 == pytest.approx((1 - lam) * 10.0)  # curves cross at the k-th value
    assert auto_mixing_lambda(train, query, top_k=50) == (pytest.approx(9.0 / 19.0), 4)
    assert auto_mixing_lambda(train, query)[1] == 1  # 12 dims * 1000/65536 -> k = 1
    p = Preconditioner.from_autocorrelation(train, query, lam="auto", auto_top_k=3)
    assert (p.lam, p.auto_top_k) == (pytest.approx(1.0 / 3.0), 3)
    with pytest.raises(ValueError, match="all zero"):
        auto_mixing_lambda(train, diag_autocorr([0.0] * 12))


@pytest.mark.parametrize("n_query", [2, 5, 20])
def test_query_spectrum_from_the_gram_matrix_equals_the_full_eigendecomposition(n_query):
    """Fewer query rows than a module's columns: the spectrum (and TrackStar's auto lambda)
    from the [n, n] Gram matrices equals eigvalsh of the [d, d] matrices (2 and 5 rows: every
    module or some; 20 rows: none, the matrices themselves)."""
    rng = np.random.default_rng(n_query)
    train, rows = autocorr(grads(rng, 60)), grads(rng, n_query, scale=3.0)
    lazy = row_autocorrelation(rows, LAYOUT)
    dense = Autocorrelation(normalize_layout(LAYOUT), explicit_r(rows), n_query)
    old = np.sort(np.clip(np.concatenate([np.linalg.eigvalsh(dense.matrices[m.name]) for m in dense.layout]),
                          0.0, None))[::-1]
    got = lazy.spectrum()
    assert got.shape == old.shape == (DIMS,)
    np.testing.assert_allclose(got, old, rtol=1e-10, atol=1e-12 * old[0])
    for top_k in (1, 3, 50):
        lam, k = auto_mixing_lambda(train, lazy, top_k)
        lam_old, k_old = auto_mixing_lambda(train, dense, top_k)
        assert k == k_old and lam == pytest.approx(lam_old, rel=1e-10)


def test_save_load_round_trip_exact(tmp_path):
    rng = np.random.default_rng(4)
    p = Preconditioner.from_autocorrelation(autocorr(grads(rng, 30)), autocorr(grads(rng, 4)))
    target = tmp_path / "pc"
    p.save(target)
    p.save(target)  # overwrite in place, atomically
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pc"]
    q = Preconditioner.load(target)
    assert q.settings() == p.settings()
    assert q.layout == p.layout
    for m in p.layout:
        np.testing.assert_array_equal(q.matrices[m.name], p.matrices[m.name])
        np.testing.assert_array_equal(q.eigvals[m.name], p.eigvals[m.name])
        np.testing.assert_array_equal(q.eigvecs[m.name], p.eigvecs[m.name])
    x = grads(rng, 5)
    np.testing.assert_array_equal(q.apply(x, -0.5), p.apply(x, -0.5))
    (target / "preconditioner.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a"):
        Preconditioner.load(target)


def test_check_preconditioner_detects_bad_matrices():
    good = np.eye(3)
    healthy = {"attn.q": good, "mlp.up": np.eye(4), "mlp.down": np.eye(5)}
    report = check_preconditioner(Preconditioner(LAYOUT, healthy))
    assert report["ok"] and report["modules"]["attn.q"]["min_damped_eigenvalue"] == pytest.approx(
        1.1
    )

    asym = good.copy()
    asym[0, 1] = 0.5
    non_psd = np.diag([1.0, 1.0, -5.0])
    nonfinite = good.copy()
    nonfinite[2, 2] = np.nan
    for bad, flag in [(asym, "symmetric"), (non_psd, "positive_definite"), (nonfinite, "finite")]:
        report = check_preconditioner(Preconditioner(LAYOUT, healthy | {"attn.q": bad}))
        assert not report["ok"]
        assert report["modules"]["attn.q"][flag] is False
        assert (
            report["modules"]["mlp.up"]
            == check_preconditioner(Preconditioner(LAYOUT, healthy))["modules"]["mlp.up"]
        )
    assert check_preconditioner(Preconditioner(LAYOUT, healthy | {"attn.q": asym}))["modules"][
        "attn.q"
    ]["max_asymmetry"] == pytest.approx(0.5)


def test_clear_errors_for_layout_and_dims_mismatch():
    with pytest.raises(ValueError, match="'b'.*start at column 3"):
        normalize_layout([("a", 0, 3), ("b", 4, 6)])
    with pytest.raises(ValueError, match="duplicate module name 'a'"):
        normalize_layout([("a", 0, 3), ("a", 3, 6)])
    acc = AutocorrelationAccumulator(LAYOUT)
    with pytest.raises(ValueError, match=r"shape \(4, 10\).*'mlp.down' is columns \[7:12\)"):
        acc.update(np.zeros((4, 10), dtype=np.float32))
    bad = np.zeros((2, DIMS), dtype=np.float32)
    bad[1, 8] = np.inf
    with pytest.raises(ValueError, match="non-finite gradients in module 'mlp.down'"):
        acc.update(bad)
    other = AutocorrelationAccumulator([("attn.q", 0, 3), ("mlp.up", 3, 8), ("mlp.down", 8, 12)])
    with pytest.raises(ValueError, match="module #1.*mlp.up"):
        acc.merge(other)
    train = autocorr(grads(np.random.default_rng(5), 8))
    with pytest.raises(ValueError, match="module #1"):
        Preconditioner.from_autocorrelation(train, other.update(np.ones((2, DIMS))).finalize())
    with pytest.raises(ValueError, match=r"'mlp.up' has shape \(3, 3\), expected \(4, 4\)"):
        Preconditioner(LAYOUT, {"attn.q": np.eye(3), "mlp.up": np.eye(3), "mlp.down": np.eye(5)})
    with pytest.raises(ValueError, match=r"missing \['mlp.down'\]"):
        Preconditioner(LAYOUT, {"attn.q": np.eye(3), "mlp.up": np.eye(4)})
    p = Preconditioner.from_autocorrelation(train)
    with pytest.raises(ValueError, match=r"shape \(2, 5\).*'mlp.up' is columns \[3:7\)"):
        p.apply(np.zeros((2, 5)), -0.5)
    with pytest.raises(ValueError, match="no gradient rows"):
        AutocorrelationAccumulator(LAYOUT).finalize()


def test_memory_holds_the_result_and_a_few_modules_at_a_time(tmp_path):
    """NumPy allocations (tracemalloc) of accumulate, finalize, save, build, save, load, check
    and apply, in units of one module's ``d x d`` float64 matrix: never a second full set."""
    d, k = 256, 6
    layout = normalize_layout([(f"m{i}", i * d, (i + 1) * d) for i in range(k)])
    rng, module = np.random.default_rng(0), d * d * 8
    rows = {"train": rng.normal(size=(300, k * d)).astype(np.float32),
            "query": rng.normal(size=(20, k * d)).astype(np.float32) * 3}
    tracemalloc.start()
    try:
        for name, x in rows.items():
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            acc = AutocorrelationAccumulator(layout, chunk_rows=64)
            acc.update(x)
            save_autocorrelation(tmp_path / name, acc.finalize())
            del acc
            assert (tracemalloc.get_traced_memory()[1] - base) / module < k + 2
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        train, query = load_autocorrelation(tmp_path / "train"), load_autocorrelation(tmp_path / "query")
        p = Preconditioner.from_autocorrelation(train, query, lam="auto")
        assert (tracemalloc.get_traced_memory()[1] - base) / module < k + 3  # eigenvectors + temporaries
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        lazy = Preconditioner.from_autocorrelation(train, row_autocorrelation(rows["query"], layout), lam=p.lam)
        assert (tracemalloc.get_traced_memory()[1] - base) / module < k + 3
        np.testing.assert_allclose(lazy.eigvals["m2"], p.eigvals["m2"], rtol=1e-9, atol=1e-12)
        del lazy
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        p.save(tmp_path / "p")
        assert check_preconditioner(Preconditioner.load(tmp_path / "p"))["ok"]
        assert (tracemalloc.get_traced_memory()[1] - held) / module < 4
        del p
        loaded = Preconditioner.load(tmp_path / "p")
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loaded.apply(rows["query"], -0.5)
        assert (tracemalloc.get_traced_memory()[1] - base) / module < k / 2 + 5  # float32 operators
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(loaded.matrices["m1"], loaded.lam * explicit_r(rows["query"], layout)["m1"]
                               + (1 - loaded.lam) * explicit_r(rows["train"], layout)["m1"], rtol=1e-10)


def test_the_spectrum_is_computed_once_and_read_only(monkeypatch):
    """Auto mixing and the spectrum figure read the same spectrum: one eigvalsh per module."""
    rng = np.random.default_rng(0)
    train = autocorr(grads(rng, 60))
    calls = []
    eigvalsh = np.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda m: calls.append(m.shape) or eigvalsh(m))
    first = train.spectrum()
    assert train.spectrum() is first and len(calls) == len(train.layout)
    np.testing.assert_array_equal(first, np.sort(np.concatenate([eigvalsh(train.matrices[m.name])
                                                                for m in train.layout]).clip(0.0))[::-1])
    with pytest.raises(ValueError):
        first[0] = 1.0
