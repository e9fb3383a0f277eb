"""FSDP2 models that no rank ever holds whole: built with their parameters on the meta device,
sharded with ``torch.distributed.fsdp.fully_shard`` (every transformer block, then the root),
allocated shard by shard (``to_empty``) and filled from the checkpoint's safetensors files, each
rank reading only the bytes of its own rows.

FSDP2 shards every parameter on dim 0 as ``torch.chunk`` does: rank ``r`` of ``W`` holds rows
``[r c, min((r + 1) c, n))`` with ``c = ceil(n / W)``; in a safetensors file (row-major) those
rows are one contiguous byte range, read with ``readinto`` (no memory map, so no page of another
rank's rows is ever resident). Buffers are built for real (rotary frequencies and other
non-persistent buffers are computed at construction) and kept through ``to_empty``; persistent
buffers that the checkpoint holds are read whole.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from attribution_assets.engine.io import models
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec

#: safetensors dtype codes -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost)
    and their buffers as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def return_freed_blocks(threshold: int = 1 << 20) -> None:
    """glibc serves allocations below its mmap threshold (raised at run time up to 32 MiB) from
    heaps that keep freed memory resident: a rank's gathered blocks, freed after each block's
    forward and backward, would stay in its RSS until it held the whole model. From here on,
    allocations of ``threshold`` bytes or more get mappings of their own, unmapped when freed
    (no-op without glibc)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def checkpoint_tensors(source: str, revision: str | None = None) -> dict[str, tuple[Path, dict, int]]:
    """Every tensor of a safetensors checkpoint (one file or an index's shards): name ->
    ``(file, header entry {dtype, shape, data_offsets}, byte offset of the file's data)``."""
    directory = Path(os.path.expanduser(source))
    if not directory.is_dir():  # a hub id: the cached snapshot (HF_HUB_OFFLINE keeps it offline)
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise models.ModelLoadError(
            f"FSDP loads each rank's rows from safetensors files, and {directory} has none (only pickled "
            "weights?); re-save the model with `save_pretrained(..., safe_serialization=True)`.")
    tensors = {}
    for path in files:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        tensors.update({name: (path, entry, 8 + size) for name, entry in header.items()})
    return tensors


def read_rows(path: Path, entry: dict, start: int, data_start: int, out: torch.Tensor) -> None:
    """Rows ``[start, start + len(out))`` (dim 0) of one checkpoint tensor into ``out``
    (converted to ``out``'s dtype); a 0-dim tensor is read whole."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape = entry["shape"]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
    buffer = bytearray(out.numel() * dtype.itemsize)
    with path.open("rb") as f:
        f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
        if f.readinto(buffer) != len(buffer):
            raise models.ModelLoadError(f"{path} ends inside a tensor: the checkpoint is truncated.")
    if buffer:
        out.copy_(torch.frombuffer(buffer, dtype=dtype).view(out.shape))


def shard_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: every transformer block (``model._no_split_modules``) and the root sharded over
    all ranks on ``device``'s type (parameters become ``DTensor`` shards, gathered one block at
    a time for its forward and backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer blocks (`_no_split_modules`); "
                         "FSDP needs them to shard the model block by block.")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def checkpoint_names(model: nn.Module, tensors: dict) -> dict[str, str]:
    """Model state-dict name -> checkpoint tensor name: Hugging Face's own renamings of the
    model's checkpoints (transformers 5's conversion mapping, e.g. GPT-NeoX's ``embed_out`` ->
    ``lm_head``) and its ``base_model_prefix`` added or stripped; refuses checkpoints whose
    tensors must be converted (fused or split) on load, which cannot be read row by row."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    wanted = model.state_dict(keep_vars=True)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint names are the model's, up to the prefix
        names = {}
        for key in tensors:
            for name in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
                if name in wanted:
                    names.setdefault(name, key)
        return names
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = {}
    for key in tensors:
        name, converted = rename_source_key(key, renamings, converters, prefix, wanted)
        if converted is not None:
            raise models.ModelLoadError(
                f"{type(model).__name__}'s checkpoint tensor {key!r} is converted on load ({converted}), which "
                "FSDP's row-wise loading cannot do; re-save the model with save_pretrained from "
                "transformers 5, or set fsdp: false.")
        names.setdefault(name, key)
    return names


def load_sharded(spec: PipelineSpec, paths: PipelinePaths, device: torch.device,
                 precision: str = "auto") -> nn.Module:
    """The pipeline's model, FSDP2-sharded over the process group, in eval mode: each rank
    allocates and reads only its own rows of every parameter (``precision``: ``auto`` keeps
    ``model.dtype``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return_freed_blocks()
    model_spec = spec.model
    if model_spec.adapter:
        raise ValueError("fsdp does not load PEFT adapters; merge the adapter into its base model "
                         "(`merge_and_unload()` then `save_pretrained`) and point `model.name_or_path` there.")
    kwargs = dict(model_spec.model_kwargs)
    if any(k in kwargs for k in ("quantization_config", "load_in_4bit", "load_in_8bit")):
        raise ValueError("fsdp shards float weights; a quantized model cannot be sharded: drop the quantization "
                         "settings or set fsdp: false.")
    source = models.model_source(spec, paths)
    dtype = models.DTYPES[model_spec.dtype if precision == "auto" else precision]
    attention = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    config = AutoConfig.from_pretrained(source, revision=model_spec.revision,
                                        trust_remote_code=model_spec.trust_remote_code, **kwargs)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_spec.trust_remote_code,
                                                 **attention)
    tensors = checkpoint_tensors(source, model_spec.revision)
    names = checkpoint_names(model, tensors)
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    aliases = {name: group for group in tied.values() for name in group}
    model = shard_blocks(model.eval(), device)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, b in model.named_buffers():
            key = names.get(name)
            if key is None:
                b.copy_(buffers[name])
            else:
                read_rows(tensors[key][0], tensors[key][1], 0, tensors[key][2], b)
        for name, param in model.named_parameters():
            key = next((names[n] for n in aliases.get(name, [name]) if n in names), None)
            if key is None:
                raise models.ModelLoadError(f"The checkpoint of {source} has no tensor for parameter {name!r} "
                                            "(nor under another name of a tied parameter).")
            path, entry, start = tensors[key]
            if list(entry["shape"]) != list(param.shape):
                raise models.ModelLoadError(f"{source}: {key} has shape {entry['shape']} in the checkpoint but "
                                            f"{list(param.shape)} in the model built from its config.")
            local = param.to_local() if hasattr(param, "to_local") else param
            first = rank * math.ceil(param.shape[0] / world) if param.dim() and local.shape != param.shape else 0
            read_rows(path, entry, first, start, local)
    return model
