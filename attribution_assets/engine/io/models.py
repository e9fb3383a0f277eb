"""Load Hugging Face causal LMs and tokenizers (from a ``ModelSpec``) and resolve devices."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import ModelSpec, PipelineSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the fix."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"Device {device!r} requested but CUDA is not available; use device 'cpu' or 'auto'.")
    return torch.device(device)


def _check_source(name_or_path: str) -> None:
    local = name_or_path.startswith(("/", "./", "../", "~")) or os.path.isabs(name_or_path)
    if local and not Path(os.path.expanduser(name_or_path)).exists():
        raise ModelLoadError(
            f"Model path {name_or_path} does not exist. Point `model.name_or_path` at a directory "
            "saved with `save_pretrained` (config.json + weights) or at a hub id such as 'EleutherAI/pythia-70m'.")


def model_source(spec: PipelineSpec, paths: PipelinePaths, base: bool = False) -> str:
    """Where a pipeline's model loads from: its ``model.name_or_path``, or the demo's trained model;
    with a ``finetune`` section the fine-tuned model, unless ``base`` (what fine-tuning starts from)."""
    if spec.finetune is not None and not base:
        return str(paths.finetuned_model)
    return str(paths.model) if spec.is_demo else str(spec.model.name_or_path)


def load_tokenizer(model: ModelSpec, source: str | None = None):
    """``AutoTokenizer`` of ``source`` (default ``model.name_or_path``) with a pad token
    (padding is always masked, so its id never changes gradients)."""
    from transformers import AutoTokenizer

    name_or_path = source or model.name_or_path
    _check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"Could not load a tokenizer from {name_or_path!r}: {type(exc).__name__}: {exc}") from None
    pad_token = model.pad_token
    if pad_token == "eos":
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"Tokenizer {name_or_path!r} has no EOS token to reuse as padding; "
                                 "set `model.pad_token` to a token string instead.")
        tokenizer.pad_token = tokenizer.eos_token
    elif pad_token:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(
            f"Tokenizer {name_or_path!r} has no pad token. Set `model.pad_token: eos` in the pipeline "
            "(reuses EOS for padding; padded positions are masked and never change a gradient) "
            "or give a token string.")
    return tokenizer


def load_model(model: ModelSpec, device: str | torch.device = "cpu", source: str | None = None,
               dtype: str | None = None):
    """``AutoModelForCausalLM.from_pretrained(source or model.name_or_path)`` in eval mode on
    ``device``; ``model.model_kwargs`` pass through; ``dtype`` overrides ``model.dtype``."""
    from transformers import AutoModelForCausalLM

    name_or_path = source or model.name_or_path
    _check_source(name_or_path)
    dtype = dtype or model.dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code,
              "dtype": DTYPES[dtype], **model.model_kwargs}
    if isinstance(kwargs.get("quantization_config"), dict):  # from YAML: bitsandbytes unless named
        from transformers.quantizers.auto import AutoQuantizationConfig

        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(
            {"quant_method": "bitsandbytes", **kwargs["quantization_config"]})
    quantized = kwargs.get("quantization_config") is not None or kwargs.get("load_in_4bit") \
        or kwargs.get("load_in_8bit")
    if quantized:  # placed by from_pretrained: quantized weights must never be moved with .to()
        kwargs.setdefault("device_map", {"": str(torch.device(device))})
    try:
        loaded = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        hint = (" (bitsandbytes quantization needs `pip install bitsandbytes` and, for most of its "
                "kernels, a CUDA device; use an unquantized model on this machine)") if quantized else ""
        raise ModelLoadError(f"Could not load a causal LM from {name_or_path!r}: {type(exc).__name__}: "
                             f"{exc}{hint}") from None
    if not is_quantized(loaded):
        loaded = loaded.to(device)
    if model.adapter:
        loaded = _with_adapter(loaded, model.adapter)
    return loaded.eval()


def is_quantized(model) -> bool:
    """Whether ``model`` holds quantized (bitsandbytes, GPTQ, ...) weights placed at load time."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
                or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _with_adapter(base, adapter: str):
    """``base`` with the PEFT adapter at ``adapter`` (its weights on the base model's device)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError(f"`model.adapter` names a PEFT adapter ({adapter}) but peft is not installed: "
                             "pip install 'attribution-assets[training]' (or pip install peft).") from None
    _check_source(adapter)
    if not (Path(os.path.expanduser(adapter)) / "adapter_config.json").is_file():
        raise ModelLoadError(f"Adapter directory {adapter} has no adapter_config.json; point "
                             "`model.adapter` at a directory written by PeftModel.save_pretrained.")
    try:
        return PeftModel.from_pretrained(base, adapter)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"Could not load the PEFT adapter {adapter!r} onto the base model: "
                             f"{type(exc).__name__}: {exc}") from None


def load_pipeline_model(spec: PipelineSpec, paths: PipelinePaths, device: str | torch.device = "cpu",
                        dtype: str | None = None, base: bool = False):
    """``(model, tokenizer)`` of a pipeline: the one way every caller loads a pipeline's model
    (``base``: the model fine-tuning starts from, see :func:`model_source`)."""
    source = model_source(spec, paths, base)
    return load_model(spec.model, device, source, dtype), load_tokenizer(spec.model, source)
