"""Gradient shard format: round trip, atomic writes, determinism and error cases."""

import json

import numpy as np
import pytest

from attribution_assets.engine.gradients.collect import collect_to_store
from attribution_assets.engine.gradients.store import GradientStore, check_compatible, write_store
from attribution_assets.spec import GradientSpec

from .test_collector import make_docs, tiny_neox

pytestmark = pytest.mark.usefixtures("one_thread")


def shard(path, **overrides):
    settings = {"projection_dim": 4, "include_bias": True, "max_tokens_per_batch": 30} | overrides
    docs = make_docs()
    ids = [f"doc-{i}" for i in range(len(docs))]
    return collect_to_store(tiny_neox(), docs, ids, path, GradientSpec(**settings), "fp-1")


def test_round_trip(tmp_path):
    store = shard(tmp_path / "shard-00000")
    info = json.loads((tmp_path / "shard-00000" / "info.json").read_text())
    assert info["format_version"] == 1 and info["per_token"] is False
    assert info["token_offsets"] is None and info["model_fingerprint"] == "fp-1"
    assert info["projection"] == {"dim": 4, "kind": "rademacher", "seed": 0}
    assert info["normalizer"] is None and len(info["config_hash"]) == 16
    assert store.rows == 5 and store.dims == 8 * (16 + 4) and store.doc_ids[0] == "doc-0"
    assert isinstance(store.array, np.memmap) and store.array.dtype == np.float32
    name = store.module_names[1]
    assert store.module_view(name).shape == (5, 20)
    assert np.array_equal(store.module_view(name), store.array[:, 20:40])
    assert store.info["modules"][1] == {
        "name": name,
        "start": 20,
        "stop": 40,
        "shape": [4, 4],
        "has_bias": True,
    }
    with pytest.raises(KeyError, match="nope"):
        store.module_slice("nope")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000"]


def test_per_token_and_float16(tmp_path):
    store = shard(tmp_path / "s", per_token=True, dtype="float16")
    assert store.array.dtype == np.float16 and store.info["dtype"] == "float16"
    offsets = store.info["token_offsets"]
    assert len(offsets) == 6 and offsets[-1] == store.rows
    assert store.doc_rows(2).shape == (offsets[3] - offsets[2], store.dims)


def test_byte_identical_and_overwrite(tmp_path):
    shard(tmp_path / "a")
    shard(tmp_path / "b")
    first = (tmp_path / "a" / "gradients.npy").read_bytes()
    assert first == (tmp_path / "b" / "gradients.npy").read_bytes()
    shard(tmp_path / "a", seed=1)  # replaces an existing shard atomically
    assert GradientStore(tmp_path / "a").info["projection"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_damaged_shards_name_the_file(tmp_path):
    path = tmp_path / "s"
    shard(path)
    npy = path / "gradients.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    with pytest.raises(ValueError, match="gradients.npy"):
        GradientStore(path)
    (path / "info.json").write_text("{not json")
    with pytest.raises(ValueError, match="info.json is not valid JSON"):
        GradientStore(path)
    (path / "info.json").unlink()
    with pytest.raises(FileNotFoundError, match="info.json"):
        GradientStore(path)


def test_shape_disagreeing_with_info(tmp_path):
    path = tmp_path / "s"
    shard(path)
    np.save(path / "gradients.npy", np.zeros((4, 160), np.float32))
    with pytest.raises(
        ValueError, match=r"holds float32\[4, 160\] but .*info.json says float32\[5, 160\]"
    ):
        GradientStore(path)


def test_incompatible_stores(tmp_path):
    a = shard(tmp_path / "a")
    check_compatible(a, shard(tmp_path / "same", per_token=True))
    with pytest.raises(ValueError, match="projection differs"):
        check_compatible(a, shard(tmp_path / "b", seed=3))
    with pytest.raises(ValueError, match="modules differs"):
        check_compatible(a, shard(tmp_path / "c", include=("*mlp*",)))
    with pytest.raises(ValueError, match="model_fingerprint differs"):
        check_compatible(a.info, a.info | {"model_fingerprint": "fp-2"})
    with pytest.raises(ValueError, match="normalizer differs"):
        check_compatible(a.info, a.info | {"normalizer": {"kind": "adam"}})


def test_float16_overflow_names_module(tmp_path):
    info = {
        "dims": 4,
        "per_token": False,
        "projection": {"dim": 0, "kind": "rademacher", "seed": 0},
        "modules": [
            {"name": "a", "start": 0, "stop": 2, "shape": [1, 2], "has_bias": False},
            {"name": "b", "start": 2, "stop": 4, "shape": [1, 2], "has_bias": False},
        ],
    }
    array = np.ones((3, 4), np.float32)
    array[1, 3] = 1e6
    with pytest.raises(ValueError, match="module 'b': values overflow float16"):
        write_store(
            tmp_path / "s",
            array,
            info,
            doc_ids=["x", "y", "z"],
            model_fingerprint="f",
            dtype="float16",
        )
    array[1, 3] = np.nan
    with pytest.raises(ValueError, match="module 'b': gradients contain NaN"):
        write_store(tmp_path / "s", array, info, doc_ids=["x", "y", "z"], model_fingerprint="f")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="2 doc_ids for 3 documents"):
        write_store(
            tmp_path / "s",
            np.ones((3, 4), np.float32),
            info,
            doc_ids=["x", "y"],
            model_fingerprint="f",
        )


def _wide_info(dims: int) -> dict:
    half = dims // 2
    return {"dims": dims, "per_token": False, "projection": {"dim": 0, "kind": "rademacher", "seed": 0},
            "modules": [{"name": "a", "start": 0, "stop": half, "shape": [1, half], "has_bias": False},
                        {"name": "b", "start": half, "stop": dims, "shape": [1, half], "has_bias": False}]}


def test_blocks_digest_and_finite_check_read_the_file_as_written(tmp_path, monkeypatch):
    from attribution_assets.engine.gradients import store as store_module
    from attribution_assets.engine.io.digests import chain_digest

    monkeypatch.setattr(store_module, "BLOCK_BYTES", 3 * 8 * 4)  # blocks of 3 rows
    array = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    array[7, 6] = 1e6
    with pytest.raises(ValueError, match=r"module 'b': values overflow float16 .*rows 6:9"):
        write_store(tmp_path / "h", array, _wide_info(8), doc_ids=list("abcdefghij"), model_fingerprint="f",
                    dtype="float16")
    store = write_store(tmp_path / "s", array, _wide_info(8), doc_ids=list("abcdefghij"), model_fingerprint="f")
    blocks = [block.copy() for block in store.blocks()]
    assert [len(b) for b in blocks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), array)
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "gradients.npy"), array)
    assert store.all_finite()
    assert store.digest() == chain_digest(["", "f", array.tobytes()])


def test_writing_and_checking_a_store_never_copies_the_rows(tmp_path):
    """A 128 MiB gradient matrix is written (and hashed and checked) with at most a block
    (64 MiB) of extra resident memory, not a second copy."""
    from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss

    array = np.ones((1024, 32768), np.float32)
    if not reset_peak_rss():
        pytest.skip("no per-window peak RSS on this platform")
    base = peak_rss_mb()
    store = write_store(tmp_path / "s", array, _wide_info(32768), doc_ids=[str(i) for i in range(1024)],
                        model_fingerprint="f")
    assert store.all_finite() and len(store.digest()) == 16
    assert peak_rss_mb() - base < 100


def test_document_rows_of_token_rows_with_empty_documents():
    from attribution_assets.engine.gradients.store import document_rows

    rows = np.arange(12, dtype=np.float16).reshape(4, 3)
    info = {"per_token": True, "token_offsets": [0, 0, 3, 3, 4, 4]}
    expected = [[0, 0, 0], [9, 12, 15], [0, 0, 0], [9, 10, 11], [0, 0, 0]]
    np.testing.assert_array_equal(document_rows(rows, info), expected)
