"""Load Hugging Face causal LMs and tokenizers, resolve devices, fingerprint weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

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


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   pad_token: str | None = None):
    """``AutoTokenizer`` with a pad token (padding is always masked, so its id never changes gradients)."""
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"Could not load a tokenizer from {name_or_path!r}: {type(exc).__name__}: {exc}") from None
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


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, model_kwargs: dict[str, Any] | None = None,
               device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode; ``model_kwargs`` pass through."""
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype],
              **(model_kwargs or {})}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"Could not load a causal LM from {name_or_path!r}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex) over parameter names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
