"""FAISS index engine: exactness of Flat, sharding, recall of approximate indexes and its
calibration, I/O."""

import json

import faiss
import numpy as np
import pytest

from attribution_assets.engine.search.build import _sample, auto_nlist, build_index
from attribution_assets.engine.search.calibration import CONFIDENCE_Z
from attribution_assets.engine.search.index import FaissIndex, recall_at_k, self_recall
from attribution_assets.spec import IndexSpec, SpecValueError

ENGINE_SETTINGS = ("seed", "calibration_k", "calibration_queries", "shard_groups", "add_batch")


def setting(**values):
    """``(IndexSpec, build_index keyword arguments)`` from one mapping of settings."""
    engine = {k: values.pop(k) for k in ENGINE_SETTINGS if k in values}
    return IndexSpec(**values), engine


def build(blocks, settings, out, **kwargs):
    spec, engine = settings
    return build_index(blocks, spec, out, **engine, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP barriers spin badly on shared, busy cores; one thread is faster here."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n, d, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_unit(n, d, seed=0, clusters=32, rank=32, noise=2.0):
    """Gradient-like unit vectors: topic centre + low-rank variation + isotropic noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) / np.sqrt(d)
    basis = rng.standard_normal((rank, d)) / np.sqrt(d)
    scale = 1 / np.sqrt(np.arange(1, rank + 1))
    x = centers[rng.integers(0, clusters, n)]
    x = x + (rng.standard_normal((n, rank)) * scale / np.linalg.norm(scale)) @ basis
    return unit(x + noise * rng.standard_normal((n, d)) / np.sqrt(d))


def blocks_of(x, ids, size):
    return lambda: ((ids[s:s + size], x[s:s + size]) for s in range(0, len(x), size))


def ids_for(n):
    return [f"doc-{i:05d}" for i in range(n)]


def brute_force(x, ids, q, k):
    scores = q @ x.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in top], np.take_along_axis(scores, top, axis=1)


@pytest.fixture(scope="module")
def flat_data():
    x, q = random_unit(2000, 64, seed=1), random_unit(25, 64, seed=2)
    return x, ids_for(len(x)), q


def test_flat_equals_numpy_brute_force(tmp_path, flat_data):
    x, ids, q = flat_data
    info = build(blocks_of(x, ids, 500), setting(factory="Flat"), tmp_path / "ix",
                       calibration=q)
    assert (info.factory, info.dims, info.vectors, info.parts) == ("Flat", 64, 2000, 1)
    assert (info.nprobe, info.hnsw_ef_search, info.calibration) == (None, None, None)
    found, scores = FaissIndex.load(tmp_path / "ix").search(q, 10)
    want_ids, want_scores = brute_force(x, ids, q, 10)
    assert found == want_ids
    assert scores.dtype == np.float32 and scores.shape == (25, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("config, parts", [
    (setting(shard_groups=1), 4),
    (setting(shard_groups=3), 2),
    (setting(max_vectors_per_index=700, add_batch=256), 3),
])
def test_sharded_flat_equals_single_flat(tmp_path, flat_data, config, parts):
    x, ids, q = flat_data
    build(blocks_of(x, ids, 500), setting(), tmp_path / "one")
    info = build(blocks_of(x, ids, 500), config, tmp_path / "many")
    assert info.parts == parts and info.vectors == 2000
    assert sum(p["vectors"] for p in info.part_files) == 2000
    one_ids, one_scores = FaissIndex.load(tmp_path / "one").search(q, 10)
    many_ids, many_scores = FaissIndex.load(tmp_path / "many").search(q, 10)
    assert many_ids == one_ids
    np.testing.assert_array_equal(many_scores, one_scores)


def recall_lower_bound(found, exact, k=10):
    """The calibration's criterion: mean recall@k minus CONFIDENCE_Z standard errors."""
    hits = np.array([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)])
    return hits.mean() - CONFIDENCE_Z * hits.std(ddof=1) / np.sqrt(len(hits))


def counting(blocks):
    """``blocks`` that counts its calls in ``.calls``."""
    def counted():
        counted.calls += 1
        return blocks()
    counted.calls = 0
    return counted


@pytest.mark.parametrize("factory, param", [("IVF{auto},Flat", "nprobe"), ("HNSW8", "ef_search")])
def test_auto_search_parameter_is_the_smallest_reaching_the_target(tmp_path, factory, param):
    x = clustered_unit(2656, 32, seed=11)
    x, calib, held_out, ids = x[:2000], x[2000:2256], x[2256:], ids_for(2000)
    blocks = counting(blocks_of(x, ids, 500))
    info = build(blocks, setting(factory=factory), tmp_path / "ix", calibration=calib)
    chosen = info.nprobe if param == "nprobe" else info.hnsw_ef_search
    report = info.calibration
    assert blocks.calls == (2 if param == "nprobe" else 1)
    assert {k: report[k] for k in ("target_recall", "k", "queries", "source", "reachable")} == {
        "target_recall": 0.95, "k": 10, "queries": 256, "source": "queries", "reachable": True}
    meta = json.loads((tmp_path / "ix/index.json").read_text())
    assert meta["calibration"] == report and chosen == meta["nprobe" if param == "nprobe" else
                                                           "hnsw_ef_search"]

    def found(value, queries):
        return FaissIndex.load(tmp_path / "ix", **{param: value}).search(queries, 10)[0]

    exact = brute_force(x, ids, calib, 10)[0]
    assert report["lower_bound"] >= 0.95 > recall_lower_bound(found(chosen - 1, calib), exact)
    assert recall_lower_bound(found(chosen, calib), exact) == pytest.approx(report["lower_bound"],
                                                                             abs=1e-4)
    approx, _ = FaissIndex.load(tmp_path / "ix").search(held_out, 10)
    assert recall_at_k(approx, brute_force(x, ids, held_out, 10)[0], 10) >= 0.95


@pytest.mark.parametrize("factory, calls", [("IVF{auto},Flat", 2), ("HNSW16", 2)])
def test_auto_search_parameter_without_queries_calibrates_on_indexed_rows(tmp_path, factory,
                                                                          calls):
    x = clustered_unit(5000, 256, seed=3)
    ids = ids_for(5000)
    blocks = counting(blocks_of(x, ids, 1000))
    info = build(blocks, setting(factory=factory), tmp_path / "ix")
    assert blocks.calls == calls
    if factory.startswith("IVF"):
        assert info.factory == f"IVF{auto_nlist(5000, 5000)},Flat" == "IVF128,Flat"
        assert info.trained_on == 5000 and 1 < info.nprobe < 128
    report = info.calibration
    assert report["source"] == "indexed rows" and report["queries"] == 256
    assert report["reachable"] and report["lower_bound"] >= 0.95
    # Indexed rows as queries (every 5th) reach the target too. Held-out queries need not:
    # an indexed row finds itself, so it is an easier query (docs/index-benchmark.md).
    docs = x[::5]
    approx, _ = FaissIndex.load(tmp_path / "ix").search(docs, 10)
    assert recall_at_k(approx, brute_force(x, ids, docs, 10)[0], 10) >= 0.95


def test_unreachable_target_keeps_the_smallest_setting_near_the_best(tmp_path):
    x = clustered_unit(2256, 32, seed=12)
    x, calib, ids = x[:2000], x[2000:], ids_for(2000)
    info = build(blocks_of(x, ids, 500), setting(factory="IVF{auto},PQ8x4"),
                       tmp_path / "ix", calibration=calib)
    exact = brute_force(x, ids, calib, 10)[0]

    def recall(nprobe):
        found, _ = FaissIndex.load(tmp_path / "ix", nprobe=nprobe).search(calib, 10)
        return recall_at_k(found, exact, 10)

    best = recall(auto_nlist(2000, 2000))
    report = info.calibration
    assert report["reachable"] is False and report["recall@k"] < 0.95
    assert report["recall@k"] == pytest.approx(recall(info.nprobe), abs=1e-4)
    assert report["recall@k"] >= best - 0.01 > recall(info.nprobe - 1)


@pytest.mark.parametrize("factory, min_recall", [
    ("HNSW16", 0.9), ("IVF{auto},PQ16x4", 0.3), ("PQ16x4", 0.3), ("SQfp16", 0.99),
    ("IVF{auto},SQfp16", 0.9),
])
def test_approximate_indexes_save_load_search(tmp_path, factory, min_recall):
    x = clustered_unit(3050, 64, seed=4)
    x, q, ids = x[:3000], x[3000:], ids_for(3000)
    build(blocks_of(x, ids, 1000), setting(factory=factory, shard_groups=2),
                tmp_path / "ix")
    index = FaissIndex.load(tmp_path / "ix", mmap=True)
    assert len(index) == 3000 and len(index.parts) == 2
    approx, scores = index.search(q, 10)
    assert scores.shape == (50, 10) and np.all(np.diff(scores, axis=1) <= 0)
    assert all(d in set(ids) for row in approx for d in row)
    assert recall_at_k(approx, brute_force(x, ids, q, 10)[0], 10) >= min_recall
    in_ram_ids, in_ram_scores = FaissIndex.load(tmp_path / "ix", mmap=False).search(q, 10)
    assert in_ram_ids == approx
    np.testing.assert_array_equal(in_ram_scores, scores)


def test_fixed_hnsw_ef_search_and_nprobe_are_applied_without_calibration(tmp_path):
    x, ids = clustered_unit(2000, 32, seed=5), ids_for(2000)
    info = build(blocks_of(x, ids, 2000), setting(factory="HNSW8", ef_search=77),
                       tmp_path / "h", calibration=x[:50])
    assert (info.hnsw_ef_search, info.nprobe, info.calibration) == (77, None, None)
    hnsw = FaissIndex.load(tmp_path / "h").parts[0]
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77
    info = build(blocks_of(x, ids, 2000), setting(factory="IVF{auto},Flat", nprobe=5),
                       tmp_path / "i", calibration=x[:50])
    assert (info.nprobe, info.hnsw_ef_search, info.calibration) == (5, None, None)
    assert faiss.extract_index_ivf(FaissIndex.load(tmp_path / "i").parts[0]).nprobe == 5
    loaded = FaissIndex.load(tmp_path / "i", nprobe=9)
    assert faiss.extract_index_ivf(loaded.parts[0]).nprobe == 9


def test_train_sample_bounds_auto_nlist(tmp_path):
    x, ids = clustered_unit(3000, 32, seed=6), ids_for(3000)
    config = setting(factory="IVF{auto},Flat", train_sample=780, seed=1)
    info = build(blocks_of(x, ids, 700), config, tmp_path / "a")
    assert info.trained_on == 780 and info.factory == "IVF20,Flat"
    again = build(blocks_of(x, ids, 700), config, tmp_path / "b")
    assert (tmp_path / "a/index-00000.faiss").read_bytes() == \
        (tmp_path / "b/index-00000.faiss").read_bytes()
    assert again.factory == info.factory


def test_training_sample_is_a_seeded_subset():
    x = random_unit(5000, 8, seed=9)
    blocks = [(ids_for(5000)[s:s + 97], x[s:s + 97]) for s in range(0, 5000, 97)]
    rows, total = _sample(blocks, 8, 300, seed=3)
    again, _ = _sample(blocks, 8, 300, seed=3)
    assert total == 5000 and rows.shape == (300, 8) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, again)
    where = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in rows]
    assert where == sorted(set(where))
    assert not np.array_equal(rows, _sample(blocks, 8, 300, seed=4)[0])
    assert _sample(blocks[:2], 8, 300, seed=3)[0].shape == (194, 8)


def test_missing_hits_are_padded(tmp_path):
    x, ids = clustered_unit(2000, 32, seed=10), ids_for(2000)
    build(blocks_of(x, ids, 2000), setting(factory="IVF{auto},Flat", nprobe=1),
                tmp_path / "ix")
    found, scores = FaissIndex.load(tmp_path / "ix").search(x[:3], 1000)
    assert scores.shape == (3, 1000) and found[0][0] == ids[0]
    assert "" in found[0] and scores[0, -1] == -np.inf
    real = [d for d in found[0] if d]
    assert len(set(real)) == len(real) and np.isfinite(scores[0, :len(real)]).all()


def test_self_recall_of_flat_is_one(tmp_path, flat_data):
    x, ids, _ = flat_data
    build(blocks_of(x, ids, 300), setting(shard_groups=2), tmp_path / "ix")
    index = FaissIndex.load(tmp_path / "ix")
    assert self_recall(index, x[::7], ids[::7], k=10) == 1.0


def test_ids_round_trip_and_float16_blocks(tmp_path):
    x = random_unit(300, 16, seed=7)
    ids = [f"übung/{i}" + "x" * (i % 13) for i in range(300)]
    build(blocks_of(x.astype(np.float16), ids, 64), setting(shard_groups=2),
                tmp_path / "ix")
    index = FaissIndex.load(tmp_path / "ix")
    assert [str(i) for part in index.ids for i in part] == ids
    found, _ = index.search(x[:40], 1)
    assert [row[0] for row in found] == ids[:40]
    meta = json.loads((tmp_path / "ix/index.json").read_text())
    assert meta["metric"] == "inner_product" and meta["vectors"] == 300
    assert meta["bytes"] == sum((tmp_path / "ix" / p["index"]).stat().st_size
                                for p in meta["part_files"])


def test_k_larger_than_index_and_ties_by_id(tmp_path):
    x = np.tile(random_unit(1, 8, seed=8), (5, 1))
    ids = ["e", "c", "a", "d", "b"]
    build(blocks_of(x, ids, 2), setting(shard_groups=1), tmp_path / "ix")
    found, scores = FaissIndex.load(tmp_path / "ix").search(x[:1], 50)
    assert found == [["a", "b", "c", "d", "e"]] and scores.shape == (1, 5)


def failing_blocks(x, ids):
    def blocks():
        yield ids[:100], x[:100]
        raise OSError("shard unreadable")
    return blocks


def test_failed_build_leaves_no_directory(tmp_path, flat_data):
    x, ids, _ = flat_data
    with pytest.raises(OSError, match="shard unreadable"):
        build(failing_blocks(x, ids), setting(), tmp_path / "ix")
    assert list(tmp_path.iterdir()) == []


def test_existing_index_replaced_only_on_success(tmp_path, flat_data):
    x, ids, _ = flat_data
    out = tmp_path / "ix"
    build(blocks_of(x[:500], ids[:500], 100), setting(), out)
    with pytest.raises(OSError):
        build(failing_blocks(x, ids), setting(), out)
    assert len(FaissIndex.load(out)) == 500 and [p.name for p in tmp_path.iterdir()] == ["ix"]
    build(blocks_of(x, ids, 1000), setting(shard_groups=1), out)
    assert len(FaissIndex.load(out)) == 2000 and [p.name for p in tmp_path.iterdir()] == ["ix"]
    assert sorted(p.name for p in out.iterdir()) == [
        "ids-00000.npy", "ids-00001.npy", "index-00000.faiss", "index-00001.faiss",
        "index.json"]


def test_error_messages(tmp_path, flat_data):
    x, ids, q = flat_data
    with pytest.raises(ValueError, match="block 1: dims mismatch: block has 32 dims, the index "
                                         "has 64"):
        build(lambda: [(ids[:5], x[:5]), (ids[5:10], x[5:10, :32])], setting(),
                    tmp_path / "a")
    with pytest.raises(ValueError, match="empty index"):
        build(lambda: [], setting(), tmp_path / "a")
    with pytest.raises(ValueError, match="empty index"):
        build(lambda: [([], x[:0])], setting(factory="IVF{auto},Flat"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"'Bogus42'.*could not parse.*IVF\{auto\},Flat"):
        build(blocks_of(x, ids, 500), setting(factory="Bogus42"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"'IVF8,PQ7' for dims=64.*multiple of"):
        build(blocks_of(x, ids, 500), setting(factory="IVF8,PQ7"), tmp_path / "a")
    with pytest.raises(ValueError, match="3 ids for 5 rows"):
        build(lambda: [(ids[:3], x[:5])], setting(), tmp_path / "a")
    bad = x[:5].copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build(lambda: [(ids[:5], bad)], setting(), tmp_path / "a")
    with pytest.raises(TypeError, match="callable"):
        build(iter([(ids, x)]), setting(), tmp_path / "a")
    with pytest.raises(SpecValueError, match="use_gpu"):
        IndexSpec(use_gpu="yes")
    for bad in ("fast", 0, 2.5, True):
        with pytest.raises(SpecValueError, match=r"`nprobe` must be an integer >= 1, or `auto` "
                                                 r"\(calibrated .*, got"):
            IndexSpec(nprobe=bad)
    with pytest.raises(SpecValueError, match="`ef_search` must be an integer >= 1, or `auto`"):
        IndexSpec(ef_search="big")
    for bad in (0, 1.5, "0.95", None):
        with pytest.raises(SpecValueError, match=r"`target_recall` must be a number in \(0.0, 1.0\]"):
            IndexSpec(target_recall=bad)
    with pytest.raises(ValueError, match="calibration_queries must be >= 1"):
        build(blocks_of(x, ids, 500), setting(calibration_queries=0), tmp_path / "a")
    with pytest.raises(ValueError, match=r"calibration must be query rows \[m >= 1, 64\]"):
        build(blocks_of(x, ids, 500), setting(factory="IVF{auto},Flat"), tmp_path / "a",
                    calibration=q[:, :32])
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        FaissIndex.load(tmp_path / "missing")
    assert not (tmp_path / "a").exists()
    build(blocks_of(x, ids, 500), setting(), tmp_path / "ok")
    index = FaissIndex.load(tmp_path / "ok")
    with pytest.raises(ValueError, match="queries have 63 dims, the index has 64"):
        index.search(q[:, :63], 5)
    with pytest.raises(ValueError, match="2-D"):
        index.search(q[0], 5)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is present")
def test_use_gpu_without_gpu_falls_back_to_cpu(tmp_path, flat_data):
    x, ids, q = flat_data
    with pytest.warns(UserWarning, match="no GPU"):
        info = build(blocks_of(x, ids, 500), setting(use_gpu=True), tmp_path / "ix")
    assert info.gpu is False
    assert FaissIndex.load(tmp_path / "ix").search(q, 3)[0] == brute_force(x, ids, q, 3)[0]


def test_recall_at_k():
    assert recall_at_k([["a", "b", "x"]], [["a", "b", "c"]], 3) == pytest.approx(2 / 3)
    assert recall_at_k([["a"], ["z"]], [["a"], ["b"]], 1) == 0.5
    with pytest.raises(ValueError, match="same non-zero number"):
        recall_at_k([["a"]], [], 1)


def test_faiss_index_asset_calibrates_on_the_pipeline_queries(tiny_demo, tmp_path):
    import dataclasses
    import json
    import shutil

    import dagster as dg

    from attribution_assets.defs.common import shards_partitions
    from tests.helpers import definitions_for

    spec, paths = tiny_demo
    shutil.copytree(paths.root, tmp_path / "demo")  # leave the shared tiny demo's Flat index alone
    ivf = dataclasses.replace(spec, index=dataclasses.replace(spec.index, factory="IVF{auto},Flat"))
    index_key = dg.AssetKey(["demo", "faiss_index"])
    defs = definitions_for([ivf], tmp_path)
    assert dg.AssetKey(["demo", "query_gradients"]) in defs.resolve_assets_def(index_key).asset_deps[index_key]
    flat_defs = definitions_for([spec], tmp_path)
    flat_deps = flat_defs.resolve_assets_def(index_key).asset_deps[index_key]
    assert dg.AssetKey(["demo", "query_gradients"]) not in flat_deps  # nothing to calibrate
    instance = dg.DagsterInstance.ephemeral()
    shards = sorted(p.name for p in (tmp_path / "demo" / "train_gradients").iterdir())
    instance.add_dynamic_partitions(shards_partitions(ivf).name, shards)
    result = dg.materialize(defs.assets, selection=[index_key], instance=instance, resources=defs.resources)
    metadata = result.asset_materializations_for_node("demo__faiss_index")[0].metadata
    saved = json.loads((tmp_path / "demo" / "faiss_index" / "index.json").read_text())
    assert saved["factory"].startswith("IVF") and saved["calibration"]["source"] == "queries"
    assert metadata["nprobe"].value == saved["nprobe"] >= 1
    assert saved["calibration"]["lower_bound"] >= 0.95 or not saved["calibration"]["reachable"]
