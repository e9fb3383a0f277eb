"""What a pipeline's gradient settings will cost before any gradient is collected: the width of
a row, the bytes of the stored rows and of the autocorrelation, against the free disk and
memory (``attribution materialize`` / ``run`` check this before the shard stage).

Conventions: a row has one block per hooked module (or per head with ``split: head``), ``p x p``
values with ``projection_dim: p``, ``O x I`` with ``projection_dim: 0`` (plus the bias part
with ``include_bias``): the collector's own layout (``heads.Block.place``). Stored rows are
``rows x width x itemsize`` (``gradients.dtype``). TrackStar's autocorrelation holds one dense
float64 ``d_b x d_b`` matrix per block: in memory while a shard accumulates, on disk once per
shard (its sums), once merged and once as the preconditioner.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from attribution_assets.spec import PipelineSpec


@dataclass(frozen=True)
class SizeEstimate:
    """Bytes a pipeline's gradient settings need (``rows`` training rows of ``width`` columns)."""

    rows: int
    width: int
    blocks: list[int]  # width of each block (module or head)
    itemsize: int
    shards: int
    shard_rows: int  # rows of the largest shard (held in memory while it is collected)
    stored: bool  # training rows written to disk (``scoring.mode: stored``)
    autocorrelation: bool  # TrackStar's per-block autocorrelation

    @property
    def rows_bytes(self) -> int:
        return self.rows * self.width * self.itemsize if self.stored else 0

    @property
    def autocorrelation_bytes(self) -> int:
        """One dense float64 matrix per block (0 without TrackStar's preconditioner)."""
        return sum(b * b * 8 for b in self.blocks) if self.autocorrelation else 0

    @property
    def disk_bytes(self) -> int:
        """Stored rows, each shard's autocorrelation sums, the merged autocorrelation and the
        preconditioner."""
        return self.rows_bytes + (self.shards + 2) * self.autocorrelation_bytes

    @property
    def memory_bytes(self) -> int:
        """One shard's rows as float32 while it is collected, plus the autocorrelation sums."""
        return self.shard_rows * self.width * 4 + self.autocorrelation_bytes

    def describe(self) -> str:
        """``disk 1.2 GB (rows 400 x 6,144 x 4 B = 9.8 MB; autocorrelation 24 blocks, 0.3 GB x 6)``."""
        parts = [f"rows {self.rows:,} x {self.width:,} columns x {self.itemsize} B = {human(self.rows_bytes)}"
                 if self.stored else "rows streamed, not stored"]
        if self.autocorrelation:
            parts.append(f"autocorrelation {len(self.blocks)} float64 blocks up to {max(self.blocks):,}² = "
                         f"{human(self.autocorrelation_bytes)}, on disk {self.shards + 2} times")
        return (f"disk {human(self.disk_bytes)}, memory {human(self.memory_bytes)} "
                f"({'; '.join(parts)})")


def human(n: float) -> str:
    """Bytes as ``512 B``, ``3.4 MB``, ``1.46 TB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def block_widths(model, spec: PipelineSpec) -> list[int]:
    """The width of each block of a gradient row of ``model`` under ``spec.gradients`` (the
    collector's layout, without building a projection). ``model`` may live on the meta device."""
    from attribution_assets.engine.gradients.heads import module_blocks
    from attribution_assets.engine.gradients.hooks import select_modules

    g = spec.gradients
    specs = select_modules(model, g.include, g.exclude, g.include_bias)
    blocks = module_blocks(model, [(s.name, s.out_features, s.in_features, s.has_bias) for s in specs], g.split)
    widths = []
    for s in specs:
        for block in blocks[s.name]:
            widths.append(block.place(0, g.projection_dim))
    return widths


def meta_model(source: str, trust_remote_code: bool = False):
    """The architecture of the causal LM at ``source`` (its config only) on the meta device: no
    weights are read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def estimate(model, spec: PipelineSpec, rows: int, shard_rows: int, shards: int) -> SizeEstimate:
    """The :class:`SizeEstimate` of ``rows`` training rows (``shard_rows`` in the largest of
    ``shards`` shards) of ``model`` under ``spec``."""
    widths = block_widths(model, spec)
    return SizeEstimate(
        rows=rows, width=sum(widths), blocks=widths, itemsize=2 if spec.gradients.dtype == "float16" else 4, shards=shards, shard_rows=shard_rows,
        stored=spec.scoring.mode == "stored",
        autocorrelation=spec.scoring.preconditioner == "trackstar" and spec.scoring.precondition)


def free_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_disk_bytes(path: Path) -> int:
    """Free bytes of the filesystem that holds ``path`` (its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_problem(size: SizeEstimate, spec: PipelineSpec, storage_root: Path) -> str | None:
    """A message naming the setting when ``size`` exceeds the free disk under ``storage_root``
    or the available memory, else None."""
    setting = ("`gradients.projection_dim: "
               f"{spec.gradients.projection_dim}`" + (" (full gradients)" if not spec.gradients.projection_dim else "")
               + (f" with `gradients.per_token: {spec.gradients.per_token}`" if spec.gradients.token_rows else ""))
    disk, memory = free_disk_bytes(storage_root), free_memory_bytes()
    if size.disk_bytes > disk:
        return (f"{setting} needs {size.describe()}: more than the {human(disk)} free under {storage_root}. "
                "Lower `gradients.projection_dim` (or use `scoring.mode: streaming`), free disk space, or "
                "pass --no-size-check to run anyway.")
    if memory is not None and size.memory_bytes > memory:
        return (f"{setting} needs {size.describe()}: more than the {human(memory)} of memory available. "
                "Lower `gradients.projection_dim` or `shard_size`, or pass --no-size-check to run anyway.")
    return None
