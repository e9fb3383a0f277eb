"""Sizes before work (engine/sizes.py): the row width of the collector's own layout, computed on
the meta device, and a refusal that names the setting when the disk or memory is too small."""

import dataclasses

import pytest
from transformers import AutoModelForCausalLM

from attribution_assets.engine import sizes
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.spec import GradientSpec
from tests.helpers import tiny_demo_spec


@pytest.mark.parametrize("gradients", [GradientSpec(projection_dim=4), GradientSpec(projection_dim=0),
                                       GradientSpec(projection_dim=3, split="head", include_bias=True)])
def test_the_estimated_width_is_the_collectors(tiny_model_dir, gradients):
    spec = dataclasses.replace(tiny_demo_spec(), gradients=gradients)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    collector = GradientCollector(model, gradients)
    widths = sizes.block_widths(sizes.meta_model(str(tiny_model_dir)), spec)
    assert widths == [entry["stop"] - entry["start"] for entry in collector.module_layout]
    size = sizes.estimate(sizes.meta_model(str(tiny_model_dir)), spec, rows=400, shard_rows=100, shards=4)
    assert size.width == collector.dims and size.rows_bytes == 400 * collector.dims * 4
    assert size.autocorrelation_bytes == sum(w * w * 8 for w in widths)
    assert size.disk_bytes == size.rows_bytes + 6 * size.autocorrelation_bytes
    assert size.memory_bytes == 100 * collector.dims * 4 + size.autocorrelation_bytes


def test_full_gradients_beyond_the_free_disk_are_refused_by_name(tiny_model_dir, tmp_path, monkeypatch):
    spec = dataclasses.replace(tiny_demo_spec(), gradients=GradientSpec(projection_dim=0))
    size = sizes.estimate(sizes.meta_model(str(tiny_model_dir)), spec, rows=20, shard_rows=20, shards=1)
    assert sizes.size_problem(size, spec, tmp_path) is None  # a few hundred MB fit this machine
    monkeypatch.setattr(sizes, "free_disk_bytes", lambda path: size.disk_bytes - 1)
    problem = sizes.size_problem(size, spec, tmp_path)
    assert problem.startswith("`gradients.projection_dim: 0` (full gradients) needs disk ")
    assert f"rows 20 x {size.width:,} columns x 4 B" in problem and "--no-size-check" in problem
    assert f"more than the {sizes.human(size.disk_bytes - 1)} free under {tmp_path}" in problem
    monkeypatch.setattr(sizes, "free_disk_bytes", lambda path: 10**15)
    monkeypatch.setattr(sizes, "free_memory_bytes", lambda: size.memory_bytes - 1)
    assert "of memory available" in sizes.size_problem(size, spec, tmp_path)
