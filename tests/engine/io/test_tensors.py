"""Safetensors streamed one tensor at a time and read per key: the standard format, exactly."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attribution_assets.engine.io.tensors import StoredTensors, write_safetensors


def _arrays():
    rng = np.random.default_rng(0)
    return {"m.0/R": rng.normal(size=(5, 5)), "m.0/eigvals": rng.normal(size=5),
            "v": np.arange(7, dtype=np.float32), "f": np.asfortranarray(rng.normal(size=(3, 4))),
            "empty": np.zeros((0, 3))}


def test_streamed_file_is_standard_safetensors(tmp_path):
    arrays, produced = _arrays(), []

    def produce(key):
        produced.append(key)
        return arrays[key]

    entries = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    write_safetensors(tmp_path / "t.safetensors", entries, produce, metadata={"format": "x"})
    assert produced == list(arrays)  # one at a time, in file order
    loaded = load_file(tmp_path / "t.safetensors")
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype
    with pytest.raises(ValueError, match="tensor 'v' has shape"):
        write_safetensors(tmp_path / "bad.safetensors", [("v", (8,), np.float32)], arrays.__getitem__)


def test_stored_tensors_read_per_key_and_survive_a_rewrite(tmp_path):
    arrays = _arrays()
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp_path / "s.safetensors")
    stored = StoredTensors(tmp_path / "s.safetensors", {"r": "m.0/R", "v": "v", "e": "empty"})
    assert sorted(stored) == ["e", "r", "v"] and stored.shape("r") == (5, 5)
    np.testing.assert_array_equal(stored["r"], arrays["m.0/R"])
    assert stored["v"].dtype == np.float32 and stored["e"].shape == (0, 3)
    first = stored["r"]
    first[0, 0] = 99.0  # a fresh array each time
    assert stored["r"][0, 0] == arrays["m.0/R"][0, 0]
    (tmp_path / "s.safetensors").unlink()  # replaced on disk (as an atomic rewrite does)
    save_file({"m.0/R": np.zeros((5, 5))}, tmp_path / "s.safetensors")
    np.testing.assert_array_equal(stored["r"], arrays["m.0/R"])
    with pytest.raises(KeyError):
        stored["nope"]


def test_stored_tensors_errors_name_the_file(tmp_path):
    save_file({"a": np.ones((4, 4))}, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"s.safetensors lacks tensors \['b'\]"):
        StoredTensors(tmp_path / "s.safetensors", {"b": "b"})
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="tensor 'a' is truncated"):
        StoredTensors(tmp_path / "s.safetensors")["a"]
    (tmp_path / "j.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        StoredTensors(tmp_path / "j.safetensors")
