"""Optimizer-aware gradient normalization (Adam and Adafactor second moments).

Layout: every module gradient is ``G [O, I]`` (see ``collector``); optimizer
moments stored in a parameter's own layout are transposed for transformers'
``Conv1D`` (weight ``[I, O]``) when bound to a module.

- Adam: ``G / sqrt(v + eps)`` elementwise, ``v = exp_avg_sq``, divided by
  ``1 - beta2**step`` when ``bias_correction=True`` (the default, i.e. the
  second moment Adam itself divides by). It does not factor, so the collector
  forms each example's full ``[O, I]`` gradient before projecting
  (cost ``T*O*I`` flops and ``O*I`` floats per example and module).
- Adafactor: ``v_hat = r c^T / mean(r)`` from row moments ``r [O]`` (mean of
  ``G**2`` over inputs) and column moments ``c [I]`` (mean over outputs), as in
  ``transformers.optimization.Adafactor`` (equivalently ``R C^T / sum(R)`` with
  row/column *sums*). ``G / sqrt(v_hat) = diag(sqrt(mean r) / sqrt(r)) G
  diag(1 / sqrt(c))``, applied to the hook tensors ``g`` and ``a`` so the
  projection stays cheap. Moments come from a real Adafactor state
  (``exp_avg_sq_row`` / ``exp_avg_sq_col``) or from an Adam ``exp_avg_sq``
  (row = mean over columns, col = mean over rows).
- Biases (1-D) are divided by ``sqrt(v_bias + eps)`` of their own unfactored
  ``exp_avg_sq`` under both normalizers.

Optimizer state sources (:func:`load_optimizer_state`): a live
``torch.optim.Optimizer`` (parameters mapped to names through
``model.named_parameters()``), a saved ``optimizer.pt`` / ``optimizer.bin``
(``torch.load(weights_only=True)``), a ``torch.distributed.checkpoint``
directory (``.metadata`` plus shards, e.g. an FSDP sharded optimizer state dict;
read into full tensors in this one process, see :func:`read_dcp`), or a
Hugging Face Trainer checkpoint directory containing one of them (``optimizer.pt``,
``optimizer.bin``: accelerate's FSDP full state dict, ``optimizer_0/``: its
sharded one). FSDP state dicts (full or sharded) name parameters by their
fully qualified names (wrapper segments such as ``_fsdp_wrapped_module`` are
dropped). A plain saved state dict names parameters only by index. Indices are resolved with
``param_groups[i]["param_names"]`` when present (torch >= 2.6 named
optimizers); otherwise they follow the order of ``model.parameters()`` that
have ``requires_grad``, except for a two-group state whose group sizes match the
Hugging Face Trainer's split (weight-decay parameters first, then the rest),
which is resolved in the Trainer's order.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class OptimizerState:
    """Per-parameter optimizer tensors and hyperparameters, keyed by parameter name."""

    states: dict[str, dict[str, torch.Tensor]]
    hyper: dict[str, dict] = field(default_factory=dict)


def _trainer_order(model: nn.Module, trainable: list[str]) -> tuple[list[str], list[int]]:
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    first = [n for n in trainable if n in decay]
    second = [n for n in trainable if n not in decay]
    return first + second, [len(first), len(second)]


def _check_shapes(name: str, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    shape = tuple(param.shape)
    expected = {"exp_avg_sq": shape, "exp_avg": shape}
    if len(shape) >= 2:
        expected["exp_avg_sq_row"] = shape[:-1]
        expected["exp_avg_sq_col"] = shape[:-2] + shape[-1:]
    for key, want in expected.items():
        if key in state and tuple(state[key].shape) != want:
            raise ValueError(
                f"optimizer state does not match the model: parameter {name!r} has shape "
                f"{list(shape)} but its {key} has shape {list(state[key].shape)} (expected {list(want)})"
            )


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _model_name(name: str, params: dict) -> str:
    """A state dict's fully qualified parameter name as ``model.named_parameters()`` spells it."""
    clean = ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
    for candidate in (clean, clean.removeprefix("module.")):
        if candidate in params:
            return candidate
    raise ValueError(f"optimizer state names parameter {name!r}, which the model does not have "
                     f"(model parameters include {list(params)[:4]})")


def _state_by_name(state_dict: dict, params: dict) -> OptimizerState:
    """An optimizer state dict keyed by parameter names (FSDP / DCP state dicts)."""
    states, hyper = {}, {}
    for g in state_dict["param_groups"]:
        h = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for n in g["params"]:
            hyper[_model_name(n, params)] = h
    for n, st in state_dict["state"].items():
        name = _model_name(n, params)
        tensors = {k: v for k, v in st.items() if torch.is_tensor(v)}
        _check_shapes(name, params[name], tensors)
        states[name] = tensors
    return OptimizerState(states, hyper)


def state_from_state_dict(state_dict: dict, model: nn.Module) -> OptimizerState:
    """Resolve a ``torch.optim`` state dict's parameter indices (or, for FSDP state dicts,
    names) to model parameter names."""
    params = dict(model.named_parameters())
    if any(isinstance(k, str) and not k.isdigit() for k in state_dict["state"]):
        return _state_by_name(state_dict, params)
    groups = state_dict["param_groups"]
    flat = [i for g in groups for i in g["params"]]
    if all("param_names" in g for g in groups):
        order = [n for g in groups for n in g["param_names"]]
    else:
        trainable = [n for n, p in params.items() if p.requires_grad]
        order = trainable
        if len(groups) == 2:
            hf_order, sizes = _trainer_order(model, trainable)
            if [len(g["params"]) for g in groups] == sizes:
                order = hf_order
    if len(order) != len(flat):
        raise ValueError(
            f"optimizer state does not match the model: it holds {len(flat)} parameters, "
            f"the model has {len(order)} trainable parameters"
        )
    index_to_name = dict(zip(flat, order))
    states, hyper = {}, {}
    for g in groups:
        h = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for i in g["params"]:
            hyper[index_to_name[i]] = h
    for i, st in state_dict["state"].items():
        name = index_to_name.get(int(i))
        if name is None or name not in params:
            raise ValueError(f"optimizer state entry {i} maps to no model parameter ({name!r})")
        tensors = {k: v for k, v in st.items() if torch.is_tensor(v)}
        _check_shapes(name, params[name], tensors)
        states[name] = tensors
    return OptimizerState(states, hyper)


def load_optimizer_state(source, model: nn.Module) -> OptimizerState:
    """Load from a live optimizer, an ``optimizer.pt`` file or a checkpoint directory."""
    if isinstance(source, OptimizerState):
        return source
    if isinstance(source, torch.optim.Optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        states, hyper = {}, {}
        for g in source.param_groups:
            h = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            for p in g["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"optimizer holds a parameter of shape {list(p.shape)} that is not in the model"
                    )
                name = names[id(p)]
                hyper[name] = h
                tensors = {
                    k: v.detach() for k, v in source.state.get(p, {}).items() if torch.is_tensor(v)
                }
                _check_shapes(name, p, tensors)
                states[name] = tensors
        return OptimizerState(states, hyper)
    return state_from_state_dict(read_saved_optimizer(Path(source)), model)


OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
DCP_METADATA = ".metadata"


def read_saved_optimizer(path: Path) -> dict:
    """The optimizer state dict at ``path``: a file (``torch.load(weights_only=True)``), a
    ``torch.distributed.checkpoint`` directory, or a checkpoint directory holding
    ``optimizer.pt``, ``optimizer.bin`` or a DCP ``optimizer_0/`` (accelerate's FSDP names)."""
    if path.is_dir():
        dcp = next((d for d in (path, path / "optimizer_0") if (d / DCP_METADATA).is_file()), None)
        files = [path / n for n in OPTIMIZER_FILES if (path / n).is_file()]
        if files:
            path = files[0]
        elif dcp is not None:
            return read_dcp(dcp)
    if not path.is_file():
        raise FileNotFoundError(f"no optimizer state at {path}: point `gradients.optimizer_state` at the "
                                "optimizer's saved state_dict (an optimizer.pt / optimizer.bin, a "
                                "torch.distributed.checkpoint directory, or a Trainer checkpoint directory "
                                "holding one); or do without it: `gradients.normalizer: none` for gradients, "
                                "`evaluation.tail_patch_optimizer: sgd` for tail patch")
    return torch.load(path, map_location="cpu", weights_only=True)


_DCP_GLOBALS = {
    "builtins": {"set", "frozenset", "slice", "complex"},
    "collections": {"OrderedDict"},
    "torch": {"Size", "strided", "contiguous_format", "preserve_format", "channels_last"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: only its own metadata classes, ``torch.Size``,
    dtypes, layouts, paths and a few builtins are let through (no code from a data file)."""

    def find_class(self, module: str, name: str):
        if (module.startswith("torch.distributed.checkpoint.") or name in _DCP_GLOBALS.get(module, ())
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's {DCP_METADATA}")


def read_dcp(directory: Path) -> dict:
    """A ``torch.distributed.checkpoint`` directory read whole into this process (sharded
    tensors, e.g. FSDP's DTensors, come back as full tensors); a state dict saved under one
    key (accelerate saves ``{"optimizer": ...}``) is unwrapped."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(directory) / DCP_METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys(storage_reader=Reader(directory))
    while "state" not in state and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if "state" not in state or "param_groups" not in state:
        raise ValueError(f"{directory} is a torch.distributed.checkpoint without an optimizer state dict "
                         f"(`state` and `param_groups`; found keys {sorted(state)[:6]})")
    return state


class _Normalizer:
    kind = ""
    factored = False

    def __init__(
        self, state, model: nn.Module | None = None, eps: float = 1e-8, bias_correction: bool = True
    ):
        if not isinstance(state, OptimizerState):
            if model is None:
                raise ValueError("a model is needed to map optimizer state to parameter names")
            state = load_optimizer_state(state, model)
        self.state, self.eps, self.bias_correction = state, eps, bias_correction
        self._bias: dict[str, torch.Tensor] = {}

    def _moment(self, param_name: str, key: str, module: str) -> torch.Tensor:
        st = self.state.states.get(param_name)
        if st is None or key not in st:
            have = sorted(st) if st else "no state"
            raise ValueError(
                f"optimizer state has no {key!r} for parameter {param_name!r} "
                f"(module {module!r}; found: {have})"
            )
        return st[key].detach().to("cpu", torch.float32)

    def _adam_v(self, param_name: str, module: str) -> torch.Tensor:
        v = self._moment(param_name, "exp_avg_sq", module)
        if self.bias_correction and "betas" in self.state.hyper.get(param_name, {}):
            step = float(self.state.states[param_name].get("step", torch.tensor(0.0)))
            beta2 = float(self.state.hyper[param_name]["betas"][1])
            if step > 0:
                v = v / (1.0 - beta2**step)
        return v

    def bind(self, specs, device: torch.device | str = "cpu") -> None:
        """Validate and precompute scales for the collector's modules (see ``ModuleSpec``)."""
        self._bias = {}
        for s in specs:
            self._bind_weight(s, device)
            if s.has_bias:
                v = self._adam_v(s.bias_name, s.name)
                self._bias[s.name] = (v + self.eps).rsqrt().to(device)

    def scale_bias(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Normalize bias gradients ``[..., O]``."""
        return grad * self._bias[name]

    def settings(self) -> dict:
        """JSON-ready settings stored in ``info.json["normalizer"]`` (no arrays)."""
        return {"kind": self.kind, "eps": self.eps, "bias_correction": self.bias_correction}

    def _bind_weight(self, spec, device) -> None:
        raise NotImplementedError


class AdamNormalizer(_Normalizer):
    """Elementwise ``G / sqrt(v + eps)``; needs full per-example gradients before projection."""

    kind = "adam"
    factored = False

    def bind(self, specs, device="cpu") -> None:
        self._weight: dict[str, torch.Tensor] = {}
        super().bind(specs, device)

    def _bind_weight(self, spec, device) -> None:
        v = self._adam_v(spec.weight_name, spec.name)
        if spec.transposed:
            v = v.T
        self._weight[spec.name] = (v + self.eps).rsqrt().to(device)

    def scale_full(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Normalize full gradients ``[..., O, I]``."""
        return grad * self._weight[name]


class AdafactorNormalizer(_Normalizer):
    """Factored ``G / sqrt(r c^T / mean(r))`` applied to hook tensors (``eps`` added to r, c)."""

    kind = "adafactor"
    factored = True

    def __init__(self, state, model=None, eps: float = 1e-30, bias_correction: bool = True):
        super().__init__(state, model, eps, bias_correction)

    def bind(self, specs, device="cpu") -> None:
        self._rows: dict[str, torch.Tensor] = {}
        self._cols: dict[str, torch.Tensor] = {}
        super().bind(specs, device)

    def _bind_weight(self, spec, device) -> None:
        st = self.state.states.get(spec.weight_name, {})
        if "exp_avg_sq_row" in st and "exp_avg_sq_col" in st:
            row = self._moment(spec.weight_name, "exp_avg_sq_row", spec.name)
            col = self._moment(spec.weight_name, "exp_avg_sq_col", spec.name)
            if spec.transposed:
                row, col = col, row
        else:
            v = self._adam_v(spec.weight_name, spec.name)
            if spec.transposed:
                v = v.T
            row, col = v.mean(dim=1), v.mean(dim=0)
        row, col = row + self.eps, col + self.eps
        self._rows[spec.name] = (row.mean().sqrt() * row.rsqrt()).to(device)
        self._cols[spec.name] = col.rsqrt().to(device)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row [O], col [I])``: normalized ``G = diag(row) G diag(col)``; the collector
        applies them to ``g`` and ``a`` (folded into ``L`` and ``R`` when projecting)."""
        return self._rows[name], self._cols[name]


def make_normalizer(kind: str | None, source, model: nn.Module, **kwargs) -> _Normalizer | None:
    """``"adam"`` / ``"adafactor"`` normalizer from any optimizer-state source; ``None`` -> ``None``."""
    if kind is None or kind == "none":
        return None
    classes = {"adam": AdamNormalizer, "adafactor": AdafactorNormalizer}
    if kind not in classes:
        raise ValueError(f"normalizer kind must be one of {sorted(classes)} or None, got {kind!r}")
    return classes[kind](load_optimizer_state(source, model), **kwargs)
