"""Where the data and the model come from: :class:`DataSpec` (``corpus``, ``queries``) and
:class:`ModelSpec` (``model``)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from attribution_assets.spec.checks import (
    SpecValueError,
    _check_bool,
    _check_choice,
    _check_int,
    _check_str,
    _describe,
)

DATA_FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "txt", "disk", "hub")


@dataclass(frozen=True)
class DataSpec:
    """Where documents (or queries) come from and how they become token sequences.

    ``path``: a local file (jsonl/json/csv/parquet/txt), a directory of such files, a
    ``Dataset.save_to_disk`` directory, or a Hugging Face hub dataset name.
    Exactly one content mode: ``text_column`` (loss on every token), ``prompt_column``
    + ``completion_column`` (loss on completion tokens only), or ``conversation_column``
    (list of ``{"role", "content"}`` rendered with the tokenizer's chat template, loss
    on assistant turns only). ``overflow``: ``truncate`` at ``max_length`` tokens or
    ``chunk`` into pieces of ``max_length`` tokens. ``encoding``: of local text files (json,
    csv, txt). ``text_unit``: what one document of a ``.txt`` file is: ``paragraph``
    (blank-line separated, the default), ``line`` or ``file``.
    ``reward_column`` (+ ``group_column``) or ``advantage_column`` with ``advantage_weighting``
    ``grpo`` | ``dr_grpo``: each sequence's loss (and gradient row) is weighted by its
    group-normalized advantage, divided by its length for GRPO; ``nan_rewards``: ``skip``
    (drop and count) or ``error`` (see ``engine.io.advantages``). ``missing_text``: a row with no
    value in its text column(s) is refused, naming its file and line (``error``, the default),
    or left out and counted (``skip``; the CLI warns with examples).
    """

    path: str | None = None
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    text_column: str = "text"
    prompt_column: str | None = None
    completion_column: str | None = None
    conversation_column: str | None = None
    id_column: str | None = None
    gold_column: str | None = None
    max_length: int = 512
    overflow: str = "truncate"
    add_eos: bool | None = None
    encoding: str = "utf-8"
    text_unit: str = "paragraph"
    reward_column: str | None = None
    advantage_column: str | None = None
    group_column: str | None = None
    advantage_weighting: str = "none"
    nan_rewards: str = "skip"
    missing_text: str = "error"

    def __post_init__(self):
        _check_choice(self, "format", DATA_FORMATS)
        _check_choice(self, "text_unit", ("paragraph", "line", "file"))
        _check_str(self, "encoding", optional=False)
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise SpecValueError("encoding", f"{self.encoding!r} is not a known text encoding; use e.g. "
                                             "utf-8, latin-1 or cp1252.") from None
        _check_choice(self, "overflow", ("truncate", "chunk"))
        _check_choice(self, "missing_text", ("error", "skip"))
        _check_int(self, "max_length", 2, note=" (tokens per document, the longest sequence fed to the model)")
        _check_bool(self, "add_eos", optional=True)
        for key in ("path", "subset", "prompt_column", "completion_column", "conversation_column",
                    "id_column", "gold_column"):
            _check_str(self, key)
        for key in ("split", "text_column"):
            _check_str(self, key, optional=False)
        self._check_advantages()

    def _check_advantages(self) -> None:
        """GRPO / Dr. GRPO settings (``engine.io.advantages``)."""
        for key in ("reward_column", "advantage_column", "group_column"):
            _check_str(self, key)
        _check_choice(self, "advantage_weighting", ADVANTAGE_WEIGHTINGS)
        _check_choice(self, "nan_rewards", ("skip", "error"))
        if self.reward_column and self.advantage_column:
            raise SpecValueError("advantage_column", "and `reward_column` are both set; give rewards "
                                                     "(turned into group-normalized advantages) or "
                                                     "advantages, not both.")
        if self.group_column and not self.reward_column:
            raise SpecValueError("group_column", "normalizes rewards within groups: set `reward_column` "
                                                 "too (or drop `group_column`).")
        source = self.reward_column or self.advantage_column
        if self.advantage_weighting != "none" and not source:
            raise SpecValueError("advantage_weighting", f"is `{self.advantage_weighting}`, which weights "
                                                        "each sequence by its advantage: set "
                                                        "`reward_column` or `advantage_column`.")
        if source and self.advantage_weighting == "none":
            raise SpecValueError("advantage_weighting", "is `none` but rewards/advantages are given: "
                                                        "choose `grpo` (loss / length) or `dr_grpo`.")
        if source and self.overflow == "chunk":
            raise SpecValueError("overflow", "is `chunk`, which would split a rewarded sequence; use "
                                             "`truncate` with advantage weighting.")

    @property
    def mode(self) -> str:
        if self.conversation_column:
            return "conversation"
        if self.prompt_column or self.completion_column:
            return "prompt_completion"
        return "text"


ADVANTAGE_WEIGHTINGS = ("none", "grpo", "dr_grpo")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """A Hugging Face causal LM: local directory or hub id (``None`` for the demo's trained model).

    ``model_kwargs`` pass through to ``from_pretrained`` (e.g. ``attn_implementation``, or
    ``quantization_config`` for a bitsandbytes 4-/8-bit base). ``adapter``: a PEFT adapter
    directory (``save_pretrained`` of a ``PeftModel``) loaded on top of the base model; select
    its weights with ``gradients.include: ["*lora_A*", "*lora_B*"]``.
    """

    name_or_path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    pad_token: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None

    def __post_init__(self):
        _check_choice(self, "dtype", MODEL_DTYPES)
        _check_bool(self, "trust_remote_code")
        for key in ("name_or_path", "revision", "pad_token", "adapter"):
            _check_str(self, key)
        if not isinstance(self.model_kwargs, dict):
            raise SpecValueError("model_kwargs", f"must be a mapping, got {_describe(self.model_kwargs)}.")
