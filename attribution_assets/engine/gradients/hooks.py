"""Which modules a collector hooks and how their calls are recorded: ``nn.Linear`` and
transformers' ``Conv1D`` chosen by ``fnmatch`` globs over module names (:func:`select_modules`;
on a PEFT model the default ``include`` means the active adapters' modules), and forward hooks that keep each call's ``(input, output)`` (:func:`hooked_modules`), shared by
the gradient collector (``collector``) and the K-FAC curvature passes
(``preconditioning.curvature``)."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from attribution_assets.engine.gradients.heads import Block

try:
    from transformers.pytorch_utils import Conv1D

    _HOOKABLE: tuple[type, ...] = (nn.Linear, Conv1D)
except ImportError:  # transformers is optional for plain nn.Linear models
    _HOOKABLE = (nn.Linear,)

DEFAULT_INCLUDE = ("*",)  # GradientSpec.include's default

@dataclass
class ModuleSpec:
    """One hooked module, its blocks (``heads.Block``; one unless split by head) and the
    column range ``[start, stop)`` they cover together in a gradient row."""

    name: str
    module: nn.Module
    out_features: int
    in_features: int
    transposed: bool  # Conv1D: weight is [I, O]
    has_bias: bool
    start: int = 0
    stop: int = 0
    blocks: list[Block] = field(default_factory=list)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"

    def layout(self) -> list[dict]:
        """One layout entry per block (see ``heads.Block.layout``)."""
        return [b.layout() for b in self.blocks]


def select_modules(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str], include_bias: bool = False
) -> list[ModuleSpec]:
    """Linear/Conv1D modules whose names match an ``include`` glob and no ``exclude`` glob. On a
    model with PEFT adapter layers, the default ``include`` (``["*"]``) selects the active
    adapters' own modules (:func:`adapter_modules`: LoRA's ``lora_A`` / ``lora_B``), not the
    frozen base layers they wrap; name base modules in ``include`` to hook them."""
    adapters = adapter_modules(model) if tuple(include) == DEFAULT_INCLUDE else None
    specs, available = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, _HOOKABLE):
            continue
        available.append(name)
        if adapters is not None:
            parts = name.split(".")
            if not any(".".join(parts[:i]) in adapters for i in range(1, len(parts) + 1)):
                continue
        elif not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if _quantized(mod):
            raise ValueError(
                f"module {name!r} has quantized weights ({type(mod).__name__}, "
                f"{type(mod.weight).__name__} {mod.weight.dtype}): their gradient is not defined. "
                "Take gradients of a PEFT adapter on top (`model.adapter` with `gradients.include: "
                "['*lora_A*', '*lora_B*']`) or of unquantized modules (add the module to "
                "`gradients.exclude`)")
        transposed = not isinstance(mod, nn.Linear)
        inp, out = mod.weight.shape if transposed else mod.weight.shape[::-1]
        specs.append(
            ModuleSpec(
                name,
                mod,
                out,
                inp,
                transposed,
                include_bias and getattr(mod, "bias", None) is not None,
            )
        )
    if not specs and adapters is not None:
        raise ValueError(
            f"the model's PEFT adapter has no nn.Linear/Conv1D module to hook (adapter layers "
            f"{sorted(adapters)[:4]}, exclude={list(exclude)}): set `gradients.include` to the "
            "modules whose gradients you want"
        )
    if not specs:
        raise ValueError(
            f"no nn.Linear/Conv1D module matches include={list(include)} exclude={list(exclude)}; "
            f"available modules include {available[:8]}"
            + (f" (and {len(available) - 8} more)" if len(available) > 8 else "")
        )
    return specs


def adapter_modules(model: nn.Module) -> set[str] | None:
    """Names of the active adapters' modules inside ``model``'s PEFT tuner layers (for LoRA
    ``<layer>.lora_A.<adapter>`` and ``<layer>.lora_B.<adapter>``), or None when ``model`` has no
    tuner layer (peft not imported means no PEFT model)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return None
    names, found = set(), False
    for name, mod in model.named_modules():
        if not isinstance(mod, tuners.BaseTunerLayer):
            continue
        found = True
        active = set(mod.active_adapters)
        for attr in mod.adapter_layer_names:
            layers = getattr(mod, attr, None)
            if isinstance(layers, nn.ModuleDict):
                names.update(f"{name}.{attr}.{key}" for key in layers if key in active)
    return names if found else None


def _quantized(module: nn.Module) -> bool:
    """bitsandbytes 4-/8-bit linears (subclasses of ``nn.Linear``) and integer-stored weights."""
    weight = getattr(module, "weight", None)
    return weight is not None and (not weight.dtype.is_floating_point \
        or type(weight).__name__ in ("Params4bit", "Int8Params") \
        or type(module).__module__.split(".")[0] == "bitsandbytes")


class HookRecords(dict):
    """``name -> [(input, output), ...]`` per call of each hooked module, plus ``leaves``: the
    inputs the hooks turned into leaves that require grad (inputs of hooked modules with no
    hooked module upstream). Every hooked output that reaches the loss lies on a path from a
    leaf to the loss, so a backward pass to the leaves runs every output's gradient hook."""

    def __init__(self, names: Sequence[str]):
        super().__init__({name: [] for name in names})
        self.leaves: list[torch.Tensor] = []
        self.prepare: Callable[[str, torch.Tensor], object] | None = None  # input -> what is kept



@contextmanager
def hooked_modules(model: nn.Module, specs: Sequence[ModuleSpec]) -> Iterator[HookRecords]:
    """Eval mode, frozen parameters, and hooks appending ``(input, output)`` to
    ``records[name]`` per call of each module in ``specs``; yields ``records``.

    Inputs are made to require grad, so every hooked output has a gradient even with frozen
    parameters; outputs retain their ``.grad`` (read by ``trace()``). Callers empty the
    lists between batches (:func:`clear_records`).
    """
    was_training = model.training
    flags = [(p, True) for p in model.parameters() if p.requires_grad]  # never touch frozen (e.g. 4-bit) ones
    records = HookRecords([s.name for s in specs])
    handles = []

    def pre_hook(module, args):
        x = args[0]
        if not x.requires_grad:  # lets gradients reach every hooked output
            leaf = x.detach().requires_grad_(True)
            records.leaves.append(leaf)
            return (leaf,) + tuple(args[1:])
        return None

    def make_hook(name):
        def hook(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                output.retain_grad()  # read by trace(); autograd.grad() ignores it
            x = args[0].detach()
            records[name].append((x if records.prepare is None else records.prepare(name, x), output))

        return hook

    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for s in specs:
            handles.append(s.module.register_forward_pre_hook(pre_hook))
            handles.append(s.module.register_forward_hook(make_hook(s.name)))
        yield records
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def clear_records(records: HookRecords) -> None:
    """Empty every module's call list and the leaves (the hooks keep appending to them)."""
    for calls in records.values():
        calls.clear()
    records.leaves.clear()
