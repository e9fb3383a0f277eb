"""The Dagster resources: where large files live (storage) and how to compute (device, precision,
threads). Which values a deployment uses comes from its profile in ``resources/*.yaml``."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator, model_validator

from attribution_assets.defs.runs import process_tags
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.runtime import claim_slot, limit_threads
from attribution_assets.spec import PipelineSpec

STORAGE_ENV = "ATTRIBUTION_STORAGE"
AUTOCAST = ("off", "bfloat16", "float16")


class ComputeResource(dg.ConfigurableResource):
    """Where and how to compute: device ``auto|cpu|cuda[:N]``, precision, TF32, CPU threads.

    ``precision``: the dtype the model runs forward/backward in (``auto`` keeps the model
    resource's ``dtype``; ``float32``, ``bfloat16``, ``float16``). ``autocast``: ``off``,
    ``bfloat16`` or ``float16``: the gradient steps' forward pass runs under
    ``torch.autocast`` (mixed precision: weights stay as loaded, matmuls in that dtype).
    ``allow_tf32``: TF32 matmuls on CUDA (Ampere and newer). Gradient products and stores
    stay float32 unless the pipeline's ``gradients.dtype`` says float16; ``attribution
    diagnose --dtype`` reports the error of a reduced precision against float32.
    ``threads``: CPU threads of torch, FAISS and every BLAS pool (through ``threadpoolctl``)
    in each step that uses this resource, restored when the step ends. 0 (the default) means
    the cores this process may use: its CPU affinity capped by its cgroup CPU quota
    (``engine.runtime.available_cores``). When several steps share a machine (the
    multiprocess executor, a backfill, two deployments), set it to cores / concurrent steps.
    ``processes_per_shard``: ranks per node; with more than one rank in all, a training-gradient
    step launches torchrun ONCE through Dagster Pipes (``defs.torchrun_ranks``: gloo on CPU,
    NCCL on GPUs, one GPU per rank), a group that serves every shard of the step, each rank
    collecting a contiguous slice of each shard; ``threads`` is then per rank. ``fsdp``: the
    ranks shard the model's parameters with FSDP2 (models that do not fit one device; each rank
    still collects its own documents). Rendezvous: ``--standalone`` (one node) unless
    ``rdzv_endpoint`` (``host:port``) names a c10d rendezvous; ``nnodes`` > 1 needs it and a
    ``rdzv_id`` shared with the torchrun agents that the other nodes start (docs/scale-out.md).
    """

    device: str = "auto"
    precision: str = "auto"
    allow_tf32: bool = False
    autocast: str = "off"
    threads: int = Field(default=0, ge=0)
    processes_per_shard: int = Field(default=1, ge=1)
    fsdp: bool = False
    nnodes: int = Field(default=1, ge=1)
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    _restore: list = PrivateAttr(default_factory=list)
    _claimed: str | None = PrivateAttr(default=None)

    @field_validator("autocast", mode="before")
    @classmethod
    def _check_autocast(cls, value):
        if value is False:  # YAML 1.1 reads an unquoted `off` as false
            return "off"
        if value not in AUTOCAST:
            raise ValueError(f"autocast must be one of {list(AUTOCAST)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_ranks(self):
        if self.fsdp and self.ranks < 2:
            raise ValueError("fsdp shards the parameters over torchrun ranks: set processes_per_shard >= 2 "
                             "(or nnodes >= 2, or fsdp: false)")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"rdzv_endpoint must be `host:port` of the c10d rendezvous (e.g. node0:29400), "
                                 f"got {self.rdzv_endpoint!r}")
        if self.rdzv_id and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.rdzv_id):
            raise ValueError(f"rdzv_id may hold letters, digits, `-`, `_` and `.`, got {self.rdzv_id!r}")
        if self.nnodes > 1 and not (self.rdzv_endpoint and self.rdzv_id):
            raise ValueError(f"nnodes: {self.nnodes} needs `rdzv_endpoint` (host:port of a c10d rendezvous every "
                             "node reaches, e.g. node0:29400) and `rdzv_id` (the same on the torchrun agents the "
                             "other nodes start)")
        if self.rdzv_id and not self.rdzv_endpoint:
            raise ValueError("rdzv_id names a c10d rendezvous: set rdzv_endpoint too (or drop rdzv_id for a "
                             "standalone launch)")
        return self

    @property
    def ranks(self) -> int:
        """torchrun ranks in all: ``processes_per_shard`` on each of ``nnodes`` nodes."""
        return self.processes_per_shard * self.nnodes

    def torchrun_args(self, run_id: str) -> list[str]:
        """``torch.distributed.run``'s launch arguments: ``--standalone`` on one node, else a c10d
        rendezvous at ``rdzv_endpoint`` under ``rdzv_id`` (default ``run_id``, unique per run)."""
        rendezvous = ["--standalone"] if not self.rdzv_endpoint else [
            f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--rdzv-id={self.rdzv_id or run_id}"]
        return [*rendezvous, f"--nproc-per-node={self.processes_per_shard}", "--max-restarts=0"]

    def autocast_dtype(self):
        """The ``torch.autocast`` dtype of gradient steps (None: off)."""
        from attribution_assets.engine.io import models  # torch: loaded by the steps that compute

        return None if self.autocast == "off" else models.DTYPES[self.autocast]

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._restore[:] = [limit_threads(self.threads)]
        self._claim_device()

    def _claim_device(self) -> None:
        """With ``device`` ``auto`` or ``cuda`` and several GPUs visible, take the lowest GPU no
        other run of this machine holds (a lock file per GPU, :func:`engine.runtime.claim_slot`),
        so N concurrent runs on an N-GPU machine get one GPU each; under Ray, which gives a job
        one GPU through ``CUDA_VISIBLE_DEVICES``, only one is visible and nothing is claimed."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device not in ("auto", "cuda") or count < 2:
            return
        slot, release = claim_slot(Path(tempfile.gettempdir()) / "attribution-gpus", count)
        self._claimed = f"cuda:{slot}"
        self._restore.append(release)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for restore in self._restore:
            restore()
        self._restore.clear()
        self._claimed = None

    def cast(self, model):
        """Cast ``model`` to ``precision`` (no-op for ``auto`` and for quantized models, whose
        weights keep the dtypes they were loaded with)."""
        from attribution_assets.engine.io import models

        if self.precision == "auto" or models.is_quantized(model):
            return model
        if self.precision not in models.DTYPES:
            raise ValueError(f"Unknown precision {self.precision!r}; choose auto or one of {sorted(models.DTYPES)}.")
        return model.to(models.DTYPES[self.precision])

    def torch_device(self):
        import torch

        from attribution_assets.engine.io import models

        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        return models.resolve_device(self._claimed or self.device)

    def load_model(self, spec: PipelineSpec, paths: PipelinePaths, base: bool = False):
        """``(model, tokenizer)`` of the pipeline on this resource's device and precision
        (``base``: the model a ``finetune`` section starts from)."""
        from attribution_assets.engine.io import models

        model, tokenizer = models.load_pipeline_model(spec, paths, self.torch_device(), base=base)
        return self.cast(model), tokenizer


def default_storage_root() -> str:
    return os.environ.get(STORAGE_ENV) or str(Path.cwd() / ".storage")


class StorageResource(dg.ConfigurableResource):
    """Root directory for every large artifact: ``<root>/<pipeline>/<asset>/<partition>/``.

    Defaults to ``$ATTRIBUTION_STORAGE``, else ``./.storage``.
    """

    root: str = Field(default_factory=default_storage_root)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Tag the run with the host and pid that execute it (a queued run has a process of its
        own), so that a run whose process died is released (``runner.release_dead_runs``)."""
        run, instance = context.run, context.instance
        if run is not None and instance is not None and run.run_id != "EPHEMERAL":
            tags = process_tags(run.run_id)
            if any(run.tags.get(k) != v for k, v in tags.items()):
                instance.add_run_tags(run.run_id, tags)

    def paths(self, spec: PipelineSpec | str) -> PipelinePaths:
        """The on-disk layout of one pipeline (``engine.io.paths``)."""
        return PipelinePaths.under(self.root, spec if isinstance(spec, str) else spec.name)

    def ensure_writable(self, min_free_bytes: int = 64 << 20) -> Path:
        """Fail before any work if the root cannot be written or the disk is (nearly) full."""
        root = Path(self.root).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"Storage root {root} is not writable ({exc.strerror}). Set ${STORAGE_ENV} or the "
                "storage resource's `root` to a writable directory.") from None
        free = shutil.disk_usage(root).free
        if free < min_free_bytes:
            raise OSError(f"Storage root {root} has only {free >> 20} MiB free (need at least "
                          f"{min_free_bytes >> 20} MiB). Free space or point ${STORAGE_ENV} elsewhere.")
        return root
