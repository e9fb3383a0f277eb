"""Pipelines as data: a pipeline = name + model + training corpus + query set + settings.

Specs are plain frozen dataclasses (no Dagster import), read from YAML by
:func:`load_pipeline_file`. The Dagster factory in ``defs/`` turns each spec into
assets under the key prefix ``[name]`` with a dynamic partition set of its own.

YAML location: ``$ATTRIBUTION_PIPELINES`` if set, else ``pipelines.yaml`` in the
working directory if it exists. Relative paths in a file are resolved against the
file's directory. See ``examples/pipelines.example.yaml``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attribution_assets.engine.io.digests import json_digest

PIPELINES_ENV = "ATTRIBUTION_PIPELINES"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class PipelineSpecError(ValueError):
    """A pipeline spec is malformed; the message names the file, the key and the fix."""


class SpecValueError(ValueError):
    """One setting has a bad value; ``key`` is its name within its section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"`{key}` {message}")
        self.key, self.message = key, message


def _describe(value: Any) -> str:
    kind = "a quoted string" if isinstance(value, str) else type(value).__name__
    return f"{value!r} ({kind})"


def _check_int(obj: Any, key: str, low: int | None = None, high: int | None = None,
               optional: bool = False, note: str = "") -> None:
    value = getattr(obj, key)
    if value is None and optional:
        return
    bounds = (f" >= {low}" if low is not None else "") + (f" and <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
            or (high is not None and value > high):
        unquote = "; write the number without quotes" if isinstance(value, str) else ""
        raise SpecValueError(key, f"must be an integer{bounds}{note}, got {_describe(value)}{unquote}.")


def _check_float(obj: Any, key: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, note: str = "") -> float:
    value = getattr(obj, key)
    too_low = low is not None and (value <= low if low_open else value < low) \
        if isinstance(value, int | float) and not isinstance(value, bool) else False
    if isinstance(value, bool) or not isinstance(value, int | float) or too_low \
            or (high is not None and value > high) or value != value:
        bounds = " in " + ("(" if low_open else "[") + f"{low}, {high if high is not None else 'inf'}" \
            + ("]" if high is not None else ")") if low is not None else ""
        raise SpecValueError(key, f"must be a number{bounds}{note}, got {_describe(value)}.")
    return float(value)


def _check_choice(obj: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if not isinstance(value, str) or value not in choices:
        hint = " (YAML reads unquoted on/off/yes/no as booleans: quote the word)" \
            if isinstance(value, bool) else ""
        raise SpecValueError(key, f"is {_describe(value)}; choose one of {list(choices)}{hint}.")


def _check_bool(obj: Any, key: str, optional: bool = False) -> None:
    value = getattr(obj, key)
    if not (isinstance(value, bool) or (optional and value is None)):
        raise SpecValueError(key, f"must be true or false, got {_describe(value)}.")


def _check_str(obj: Any, key: str, optional: bool = True) -> None:
    value = getattr(obj, key)
    if not (isinstance(value, str) and value) and not (optional and value is None):
        raise SpecValueError(key, f"must be a non-empty string{' or null' if optional else ''}, "
                                  f"got {_describe(value)}.")


def _check_strings(obj: Any, key: str, allow_empty: bool = False) -> None:
    value = getattr(obj, key)
    if isinstance(value, list):
        object.__setattr__(obj, key, tuple(value))
        value = tuple(value)
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value) \
            or (not value and not allow_empty):
        raise SpecValueError(key, f"must be a {'' if allow_empty else 'non-empty '}list of strings, "
                                  f"got {_describe(value)}.")


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
    (drop and count) or ``error`` (see ``engine.io.advantages``).
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


DEMO_RELATIONS = ("birthplace", "employer", "university", "birth_year")
DEMO_OTHER_RELATIONS = ("instrument", "sport", "pet", "dish")  # a second vocabulary of relations


@dataclass(frozen=True)
class DemoSpec:
    """The embedded synthetic demo: its corpus generator and its GPT-NeoX (``engine.demo``).

    Corpus: ``people`` fictional people with one fact per relation, each stated in
    ``train_templates_per_relation`` phrasings; queries use ``query_templates_per_relation``
    held-out phrasings; ``distractors`` entity sentences per answer value and
    ``hard_distractors`` same-person/same-answer sentences per fact; for ``alias_fraction`` of
    the people one fact is stated only through an alias that ``alias_introductions`` documents
    tie to the name; ``template_variant`` 1 takes the phrasings from the other end of the
    template lists (a corpus to test settings on that they were not tuned on). ``relations``:
    any of ``DEMO_RELATIONS`` (the default) and ``DEMO_OTHER_RELATIONS`` (other relations, answers
    and phrasings). ``names``: 0 the demo's name pools, 1 a second, disjoint pair. Model: architecture,
    AdamW settings and epochs; ``seed`` seeds both the corpus and the model's init/data order.
    ``record_epochs``: during the last this many epochs the model's own training records
    train-time gradient rows (``engine.training.callback.TrainTimeRecorder`` with the
    pipeline's ``gradients`` settings, normalized by the live AdamW state; one shard per epoch,
    in the model's directory), which ``scoring.train_rows: train_time`` scores with and the
    ``train_time_fact_tracing`` asset evaluates; 0 = off. The trained model is the same either way.
    """

    people: int = 100
    seed: int = 0
    relations: tuple[str, ...] = DEMO_RELATIONS
    train_templates_per_relation: int = 12
    query_templates_per_relation: int = 2
    distractors: int = 1
    hard_distractors: int = 1
    alias_fraction: float = 0.25
    alias_introductions: int = 2
    template_variant: int = 0
    names: int = 0
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    max_position_embeddings: int = 64
    vocab_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    batch_size: int = 32
    epochs: int = 12
    log_every: int = 100
    record_epochs: int = 0

    def __post_init__(self):
        _check_strings(self, "relations")
        unknown = sorted(set(self.relations) - set(DEMO_RELATIONS + DEMO_OTHER_RELATIONS))
        if unknown:
            raise SpecValueError("relations", f"has unknown relations {unknown}; choose from "
                                              f"{list(DEMO_RELATIONS + DEMO_OTHER_RELATIONS)}.")
        if len(set(self.relations)) != len(self.relations):
            raise SpecValueError("relations", f"lists a relation twice: {list(self.relations)}.")
        for key in ("people", "layers", "hidden", "heads", "intermediate", "max_position_embeddings",
                    "batch_size", "epochs", "log_every", "train_templates_per_relation",
                    "query_templates_per_relation"):
            _check_int(self, key, 1)
        for key in ("seed", "warmup_steps", "distractors", "hard_distractors", "alias_introductions"):
            _check_int(self, key, 0)
        _check_float(self, "alias_fraction", 0.0, 1.0)
        _check_int(self, "template_variant", 0, 1)
        _check_int(self, "names", 0, 1, note=" (0 = the demo's name pools, 1 = the second pools)")
        _check_int(self, "vocab_size", 260, note=" (the byte alphabet plus special tokens)")
        _check_float(self, "lr", 0.0, low_open=True)
        _check_float(self, "weight_decay", 0.0)
        if self.hidden % self.heads:
            raise SpecValueError("heads", f"must divide hidden ({self.hidden}), got {self.heads}.")
        _check_int(self, "record_epochs", 0, note=" (0 = no train-time rows)")
        if self.record_epochs > self.epochs:
            raise SpecValueError("record_epochs", f"is {self.record_epochs}, more than the {self.epochs} "
                                                  "training epochs: set it to at most `epochs` (0 = off).")


GRADIENT_NORMALIZERS = ("none", "adam", "adafactor")
GRADIENT_SPLITS = ("module", "head")
SCORE_BREAKDOWNS = ("none", "module", "head")
PER_TOKEN_MODES = ("none", "positional", "loss")


@dataclass(frozen=True)
class GradientSpec:
    """Per-example gradient collection (``engine.gradients``): the settings that make the rows.

    ``projection_dim``: per module, a ``p x p`` projected gradient (0 = the full ``O x I``
    gradient); ``include`` / ``exclude``: fnmatch globs over module names; ``normalizer``:
    ``adam`` / ``adafactor`` divide by the optimizer's second moments from
    ``optimizer_state`` (an ``optimizer.pt`` or a Trainer checkpoint directory);
    ``per_token``: ``none`` (one row per document), ``positional`` (row t = token t's share
    ``L g_t a_tᵀ Rᵀ`` of the document gradient, one backward pass) or ``loss`` (row t = the
    gradient of token t's loss alone, one backward pass per target position); YAML ``true``
    means ``loss`` and ``false`` means ``none``. Either way a document's rows sum to its
    document row. ``dtype``: of the stored rows; ``max_tokens_per_batch``: the batch budget
    (speed and memory only, never the rows); ``split``: ``module`` (one block per module) or
    ``head`` (attention projections split into one block per head: q/k/v by output rows, the
    output projection by input columns; see ``engine.gradients.heads``), each block ``p x p``
    when projected.
    """

    projection_dim: int = 32
    projection_kind: str = "rademacher"
    seed: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("*lm_head*", "*embed_out*")
    include_bias: bool = False
    per_token: str = "none"
    dtype: str = "float32"
    normalizer: str = "none"
    optimizer_state: str | None = None
    max_tokens_per_batch: int = 4096
    split: str = "module"

    def __post_init__(self):
        _check_int(self, "projection_dim", 0, note=" (0 = no projection)")
        _check_choice(self, "projection_kind", ("rademacher", "gaussian"))
        _check_int(self, "seed", 0)
        _check_strings(self, "include")
        _check_strings(self, "exclude", allow_empty=True)
        _check_bool(self, "include_bias")
        if self.per_token is True or self.per_token is False:  # YAML booleans (the old setting)
            object.__setattr__(self, "per_token", "loss" if self.per_token else "none")
        _check_choice(self, "per_token", PER_TOKEN_MODES)
        _check_choice(self, "dtype", ("float32", "float16"))
        _check_choice(self, "normalizer", GRADIENT_NORMALIZERS)
        _check_str(self, "optimizer_state")
        _check_int(self, "max_tokens_per_batch", 1)
        _check_choice(self, "split", GRADIENT_SPLITS)

    @property
    def token_rows(self) -> bool:
        """Whether rows are per token (``per_token`` is ``positional`` or ``loss``)."""
        return self.per_token != "none"


PRECONDITIONERS = ("trackstar", "ekfac", "kfac", "none")
KRONECKER_PRECONDITIONERS = ("ekfac", "kfac")


@dataclass(frozen=True)
class ScoringSpec:
    """How queries score training documents (``engine.preconditioning``, ``engine.scoring``).

    ``metric``: ``cosine`` (TrackStar) or ``inner_product``; ``aggregate``: score each query
    (``individual``) or a query set as one (``nearest``, ``mean``, ``sum``);
    ``preconditioner``: ``trackstar`` (the autocorrelation of the projected gradients, mixing
    ``lam R_query + (1 - lam) R_train`` with ``mixing`` ``auto`` | a number in [0, 1] |
    ``off``), ``ekfac`` / ``kfac`` (the Kronecker-factored Gauss-Newton of
    ``preconditioning.kfac``, applied to the query side only; labels
    ``kfac_labels``: ``sampled`` from the model, seeded by ``kfac_seed``, or the data's
    ``true`` labels; ``kfac_space``: ``projected``, the curvature of the projected rows, or
    ``full``, each full query gradient preconditioned, then projected) or ``none``;
    ``damping`` times each module's mean eigenvalue is added
    before inverting. ``precondition: false`` is the older spelling of ``preconditioner:
    none``. ``mode``: ``stored`` training gradients or ``streaming`` (recomputed, never
    stored); ``top_k``: scores kept per query and shard (0 = all); ``breakdown``: also write
    each block's contribution to those scores, per ``module`` or per ``head`` (needs
    ``gradients.split: head``), summing to the score.
    ``train_rows``: ``post_hoc`` (training gradients of the final model) or ``train_time``
    (each document's rows recorded by the ``finetune`` asset, summed over the steps that saw it).
    """

    metric: str = "cosine"
    aggregate: str = "individual"
    precondition: bool = True
    preconditioner: str = "trackstar"
    damping: float = 0.1
    mixing: str | float = "auto"
    kfac_labels: str = "sampled"
    kfac_seed: int = 0
    kfac_space: str = "projected"
    mode: str = "stored"
    top_k: int = 100
    breakdown: str = "none"
    train_rows: str = "post_hoc"

    def __post_init__(self):
        _check_choice(self, "train_rows", ("post_hoc", "train_time"))
        _check_choice(self, "metric", ("cosine", "inner_product"))
        _check_choice(self, "aggregate", ("individual", "nearest", "mean", "sum"))
        _check_bool(self, "precondition")
        _check_choice(self, "preconditioner", PRECONDITIONERS)
        if not self.precondition:
            if self.preconditioner in KRONECKER_PRECONDITIONERS:
                raise SpecValueError("precondition", f"is false but `preconditioner` is "
                                                     f"{self.preconditioner!r}; drop `precondition` "
                                                     "(the older spelling) and set `preconditioner`.")
            object.__setattr__(self, "preconditioner", "none")
        object.__setattr__(self, "precondition", self.preconditioner != "none")
        _check_float(self, "damping", 0.0, note=" (relative to each module's mean eigenvalue)")
        if self.mixing is False:  # YAML 1.1 reads an unquoted `off` as false
            object.__setattr__(self, "mixing", "off")
        if not (self.mixing in ("auto", "off") or (isinstance(self.mixing, int | float)
                                                   and not isinstance(self.mixing, bool)
                                                   and 0 <= self.mixing <= 1)):
            raise SpecValueError("mixing", f"must be `auto`, `off` or a number in [0, 1] (the weight "
                                           f"of the query autocorrelation), got {_describe(self.mixing)}.")
        _check_choice(self, "kfac_labels", ("sampled", "true"))
        _check_int(self, "kfac_seed", 0)
        _check_choice(self, "kfac_space", ("projected", "full"))
        _check_choice(self, "mode", ("stored", "streaming"))
        _check_int(self, "top_k", 0, note=" (0 keeps every score)")
        _check_choice(self, "breakdown", SCORE_BREAKDOWNS)

    @property
    def kronecker(self) -> bool:
        """Whether the preconditioner is EK-FAC or K-FAC (query side, before projection)."""
        return self.preconditioner in KRONECKER_PRECONDITIONERS


@dataclass(frozen=True)
class IndexSpec:
    """FAISS index over the training gradients as scores see them (``engine.search``).

    ``factory``: a FAISS index factory string (``Flat``, ``IVF{n},Flat``, ``IVF{auto},Flat``,
    ``IVF{n},PQ{m}``, ``HNSW{M}``, ``...,SQfp16``); inner-product metric always.
    ``train_sample``: rows that train an index that needs training.
    ``max_vectors_per_index`` splits the index into parts searched together.
    ``nprobe`` (IVF) / ``ef_search`` (HNSW): an integer, or ``auto`` to choose the smallest
    value whose recall@10 against exact search reaches ``target_recall`` on the pipeline's
    own queries, measured when the index is built. ``use_gpu``: ``auto`` (when FAISS sees
    a GPU), true or false.
    """

    enabled: bool = True
    factory: str = "Flat"
    train_sample: int = 65536
    nprobe: int | str = "auto"
    ef_search: int | str = "auto"
    target_recall: float = 0.95
    max_vectors_per_index: int | None = None
    use_gpu: bool | str = "auto"
    self_recall_sample: int = 256

    def __post_init__(self):
        _check_bool(self, "enabled")
        _check_str(self, "factory", optional=False)
        _check_int(self, "train_sample", 1)
        for key in ("nprobe", "ef_search"):
            if getattr(self, key) != "auto":
                _check_int(self, key, 1, note=", or `auto` (calibrated to target_recall when the "
                                              "index is built)")
        _check_float(self, "target_recall", 0.0, 1.0, low_open=True, note=", e.g. 0.95")
        _check_int(self, "max_vectors_per_index", 1, optional=True)
        if self.use_gpu in ("true", "false"):
            object.__setattr__(self, "use_gpu", self.use_gpu == "true")
        if self.use_gpu not in ("auto", True, False) or self.use_gpu in (0, 1) and \
                not isinstance(self.use_gpu, bool):
            raise SpecValueError("use_gpu", f"must be `auto`, true or false, got {_describe(self.use_gpu)}.")
        _check_int(self, "self_recall_sample", 1)


TAIL_PATCH_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class EvaluationSpec:
    """Quality evaluation (``engine.evaluation``): LDS subsets for the demo.

    ``lds_top_k``: the LDS is reported for each of these score variants: 0 = every
    document's score enters the predicted effect; ``k`` = only each query's ``k`` highest
    (100 is what a score table keeps by default, 10 the recall@10 cut).

    Tail patch (``engine.evaluation.tail_patch``): per query, one training step from the
    final model on a method's ``tail_patch_k`` best documents (0 = no tail patch) with
    learning rate ``tail_patch_lr`` and ``tail_patch_optimizer`` ``sgd`` (fresh state: plain
    gradient step) or ``adam`` (the stored optimizer's second moments, no momentum); the
    mean increase of the answer's log-probability over ``tail_patch_queries`` queries (a
    seeded sample; 0 = every query).
    """

    lds_subsets: int = 32
    lds_fraction: float = 0.5
    lds_seed: int = 0
    lds_top_k: tuple[int, ...] = (0, 100, 10)
    tail_patch_k: int = 10
    tail_patch_lr: float = 0.1
    tail_patch_optimizer: str = "sgd"
    tail_patch_queries: int = 100

    def __post_init__(self):
        _check_int(self, "lds_subsets", 1)
        _check_float(self, "lds_fraction", 0.0, 1.0, low_open=True)
        _check_int(self, "lds_seed", 0)
        _check_int(self, "tail_patch_k", 0)
        _check_float(self, "tail_patch_lr", 0.0, low_open=True)
        _check_choice(self, "tail_patch_optimizer", TAIL_PATCH_OPTIMIZERS)
        _check_int(self, "tail_patch_queries", 0)
        if isinstance(self.lds_top_k, list):
            object.__setattr__(self, "lds_top_k", tuple(self.lds_top_k))
        if not isinstance(self.lds_top_k, tuple) or not self.lds_top_k or any(
                isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.lds_top_k):
            raise SpecValueError("lds_top_k", f"must be a non-empty list of integers >= 0 (0 = every "
                                              f"score), got {_describe(self.lds_top_k)}.")


MAGIC_OPTIMIZERS = ("adamw", "sgd")
MAGIC_SCHEDULES = ("cosine", "linear", "constant")
MAGIC_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class MagicSpec:
    """MAGIC: exact metagradients of query losses through a deterministic training run
    (``engine.magic``); opt-in, since it retrains the model.

    The run: the demo model from its seeded init (other pipelines: from the pipeline model's
    weights) on the pipeline's tokenized documents, no dropout, one seeded shuffle per epoch,
    ``optimizer`` ``adamw`` (``beta1``, ``beta2``, ``eps``, decoupled ``weight_decay``) or
    ``sgd`` (``momentum``, L2 ``weight_decay``), learning rate ``lr`` with ``warmup_steps``
    linear warmup then ``schedule`` decay (``cosine`` or ``linear`` to 0, or ``constant``).
    ``lr``, ``weight_decay``, ``warmup_steps``, ``batch_size``, ``epochs`` and ``seed`` left
    null take the demo's values (:meth:`resolved`). A checkpoint every ``checkpoint_every``
    steps bounds the reverse pass's memory to one segment; ``query_batch_size`` queries per
    ``magic_scores`` partition; ``dtype`` of the run (float64 for exactness tests).
    """

    enabled: bool = False
    optimizer: str = "adamw"
    schedule: str = "cosine"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    seed: int | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    checkpoint_every: int = 50
    query_batch_size: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        _check_bool(self, "enabled")
        _check_choice(self, "optimizer", MAGIC_OPTIMIZERS)
        _check_choice(self, "schedule", MAGIC_SCHEDULES)
        _check_choice(self, "dtype", MAGIC_DTYPES)
        if self.lr is not None:
            _check_float(self, "lr", 0.0, low_open=True)
        if self.weight_decay is not None:
            _check_float(self, "weight_decay", 0.0)
        for key in ("batch_size", "epochs"):
            _check_int(self, key, 1, optional=True)
        for key in ("warmup_steps", "seed"):
            _check_int(self, key, 0, optional=True)
        _check_float(self, "momentum", 0.0, 1.0, note=" (0 = plain SGD)")
        for key in ("beta1", "beta2"):
            _check_float(self, key, 0.0, 1.0)
            if getattr(self, key) >= 1:
                raise SpecValueError(key, f"must be below 1, got {getattr(self, key)!r}.")
        _check_float(self, "eps", 0.0, low_open=True)
        _check_int(self, "checkpoint_every", 1, note=" (steps per replay segment)")
        _check_int(self, "query_batch_size", 1, note=" (queries per magic_scores partition)")

    def resolved(self, demo: DemoSpec | None) -> MagicSpec:
        """This spec with every null training setting taken from ``demo`` (or ``DemoSpec()``)."""
        demo = demo or DemoSpec()
        return dataclasses.replace(self, **{k: getattr(demo, k) for k in MAGIC_FROM_DEMO
                                            if getattr(self, k) is None})


MAGIC_FROM_DEMO = ("lr", "weight_decay", "warmup_steps", "batch_size", "epochs", "seed")


FINETUNE_OPTIMIZERS = ("adamw", "adafactor")


@dataclass(frozen=True)
class FinetuneSpec:
    """Opt-in fine-tuning (``engine.training.finetune``): a ``transformers.Trainer`` trains the
    pipeline's model on its tokenized corpus with ``AttributionCallback`` recording train-time
    gradient rows (the ``gradients`` settings, normalized by the live optimizer's state), one
    shard per ``steps_per_shard`` optimizer steps. Later assets use the fine-tuned model.
    ``optimizer``: ``adamw`` (``torch.optim.AdamW``) or ``adafactor`` (transformers'; no relative
    step); ``epochs``, ``batch_size`` (sequences per micro-batch), ``gradient_accumulation_steps``,
    ``learning_rate`` (constant after ``warmup_steps`` linear warm-up), ``weight_decay``, ``seed``.
    """

    epochs: int = 1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    steps_per_shard: int = 100

    def __post_init__(self):
        for key in ("epochs", "batch_size", "gradient_accumulation_steps", "steps_per_shard"):
            _check_int(self, key, 1)
        for key in ("warmup_steps", "seed"):
            _check_int(self, key, 0)
        _check_float(self, "learning_rate", 0.0, low_open=True)
        _check_float(self, "weight_decay", 0.0)
        _check_choice(self, "optimizer", FINETUNE_OPTIMIZERS)


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline: a model, a training corpus, a query set and the method's settings.

    Each section is the one config object of its concern; the engine takes these objects.
    """

    name: str
    model: ModelSpec
    corpus: DataSpec
    queries: DataSpec | None = None
    shard_size: int = 1000
    gradients: GradientSpec = field(default_factory=GradientSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    index: IndexSpec = field(default_factory=IndexSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    demo: DemoSpec | None = None
    schedule: str | None = None
    magic: MagicSpec = field(default_factory=MagicSpec)
    finetune: FinetuneSpec | None = None

    def __post_init__(self):
        _check_int(self, "shard_size", 1, note=" (documents per shard partition)")
        _check_str(self, "schedule")
        self._check_finetune()
        if self.scoring.breakdown == "head" and self.gradients.split != "head":
            raise SpecValueError("scoring.breakdown", "is `head`, which needs per-head gradient blocks: "
                                                      "set `gradients.split: head` (or use `breakdown: "
                                                      "module`).")
        if self.magic.enabled and self.queries is None:
            raise SpecValueError("magic.enabled", "needs a `queries` section: MAGIC scores the "
                                                  "training documents against each query.")
        if self.scoring.kronecker:
            kind = self.scoring.preconditioner
            if self.gradients.normalizer != "none":
                raise SpecValueError("gradients.normalizer", f"must be `none` with `scoring.preconditioner: "
                                                             f"{kind}` (its curvature takes the place of the "
                                                             "optimizer normalization), got "
                                                             f"{self.gradients.normalizer!r}; set it to none "
                                                             "or use `preconditioner: trackstar`.")
            if self.gradients.include_bias:
                raise SpecValueError("gradients.include_bias", f"must be false with `scoring.preconditioner: "
                                                               f"{kind}` (it preconditions weight gradients "
                                                               "only).")
            if (self.gradients.split == "head" and self.scoring.kfac_space == "projected"
                    and self.gradients.projection_dim):
                raise SpecValueError("gradients.split", f"is `head`, but `scoring.preconditioner: {kind}` "
                                                        "with `kfac_space: projected` has one curvature "
                                                        "per whole module: set `scoring.kfac_space: full` "
                                                        "(full gradients preconditioned, then split and "
                                                        "projected) or `gradients.split: module`.")

    def _check_finetune(self) -> None:
        """A ``finetune`` section and ``scoring.train_rows`` fit the other sections."""
        if self.scoring.train_rows == "train_time" and not self.records_train_time:
            raise SpecValueError("scoring.train_rows", "is `train_time`, which reads the gradients the "
                                                       "`finetune` asset records: add a `finetune` section "
                                                       "(the demo: set `demo.record_epochs` >= 1), or use "
                                                       "`post_hoc`.")
        if self.finetune is None:
            self._check_train_time_rows()
            return
        if self.gradients.token_rows:
            raise SpecValueError("gradients.per_token", "must be `none` with `finetune`: train-time rows "
                                                        "are per document.")
        if self.model.adapter or self.model.model_kwargs.get("quantization_config") is not None:
            raise SpecValueError("finetune", "trains the whole model; adapters and quantized bases are "
                                             "not fine-tuned by the pipeline yet (use "
                                             "engine.training.AttributionCallback with your own Trainer).")
        if self.gradients.normalizer == "adam" and self.finetune.optimizer == "adafactor":
            raise SpecValueError("gradients.normalizer", "is `adam`, which needs Adam's `exp_avg_sq`, but "
                                                         "`finetune.optimizer` is `adafactor`: use the "
                                                         "`adafactor` normalizer or the `adamw` optimizer.")
        self._check_train_time_rows()

    def _check_train_time_rows(self) -> None:
        if self.scoring.train_rows == "train_time" and self.scoring.mode != "stored":
            raise SpecValueError("scoring.mode", "must be `stored` with `train_rows: train_time` (the rows "
                                                 "were recorded during training and cannot be recomputed).")
        if self.scoring.train_rows == "train_time" and self.gradients.token_rows:
            raise SpecValueError("gradients.per_token", "must be `none` with `train_rows: train_time`: "
                                                        "train-time rows are per document.")

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

    @property
    def records_train_time(self) -> bool:
        """Whether a training run of this pipeline records train-time rows: a ``finetune``
        section, or the demo with ``demo.record_epochs`` >= 1."""
        return self.finetune is not None or (self.demo is not None and self.demo.record_epochs > 0)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections, used as code/config versions."""
        return json_digest({s: _jsonable(getattr(self, s)) for s in sections}, length=12)


def demo_spec(people: int = 100, shard_size: int = 256, gradients: GradientSpec | None = None,
              scoring: ScoringSpec | None = None, evaluation: EvaluationSpec | None = None,
              magic: MagicSpec | None = None, **demo_kwargs: Any) -> PipelineSpec:
    """The embedded default pipeline: synthetic facts, a locally trained tokenizer and model.

    Every score is kept (``top_k=0``) so that evaluations can rank the whole corpus, with each
    module's contribution (``breakdown: module``) for the report's layer view.
    ``demo_kwargs`` set :class:`DemoSpec` fields; ``record_epochs`` defaults to 1 (the last
    epoch records train-time rows, so ``attribution demo`` reports fact tracing from them too).
    """
    return PipelineSpec(
        name="demo",
        model=ModelSpec(),
        corpus=DataSpec(max_length=64),
        queries=DataSpec(prompt_column="prompt", completion_column="completion",
                         id_column="query_id", gold_column="gold_doc_ids", max_length=64),
        shard_size=shard_size,
        gradients=gradients or GradientSpec(projection_dim=32, normalizer="adafactor"),
        scoring=scoring or ScoringSpec(top_k=0, breakdown="module"),
        evaluation=evaluation or EvaluationSpec(),
        demo=DemoSpec(people=people, **{"record_epochs": 1, **demo_kwargs}),
        magic=magic or MagicSpec(),
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def spec_to_json(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as plain JSON values (``spec_from_json`` rebuilds an equal spec), e.g. to
    rebuild a pipeline's definitions in another process."""
    return _jsonable(spec)


def spec_from_json(raw: dict[str, Any]) -> PipelineSpec:
    """The :class:`PipelineSpec` that :func:`spec_to_json` wrote (validated again)."""
    sections = {**_SECTIONS, "demo": DemoSpec}

    def build(cls, values):
        types = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) and isinstance(types.get(k), tuple) else v
                      for k, v in values.items()})

    return PipelineSpec(**{k: build(sections[k], v) if k in sections and v is not None else v
                           for k, v in raw.items()})


_SECTIONS = {
    "model": ModelSpec, "corpus": DataSpec, "queries": DataSpec,
    "gradients": GradientSpec, "scoring": ScoringSpec, "index": IndexSpec,
    "evaluation": EvaluationSpec, "magic": MagicSpec, "finetune": FinetuneSpec,
}
_PATH_KEYS = {("model", "name_or_path"), ("corpus", "path"), ("queries", "path"),
              ("gradients", "optimizer_state"), ("model", "adapter")}


def unknown_keys_message(unknown: list[str], valid: set[str], where: str) -> str:
    """``unknown key `x` in where: did you mean `y`?`` for each unknown key, then the valid keys."""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(valid), n=1)
        parts.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    return f"unknown key(s) {', '.join(parts)} in {where}; valid keys: {', '.join(sorted(valid))}."


def _build_section(where: str, section: str, raw: Any, base_dir: Path) -> Any:
    cls = _SECTIONS[section]
    if not isinstance(raw, dict):
        raise PipelineSpecError(f"{where}: `{section}` must be a mapping, got {type(raw).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise PipelineSpecError(f"{where}: " + unknown_keys_message(unknown, names, f"`{section}`"))
    values = dict(raw)
    for key, value in values.items():
        if (section, key) in _PATH_KEYS and isinstance(value, str):
            values[key] = _resolve_path(value, base_dir)
    try:
        return cls(**values)
    except SpecValueError as exc:
        raise PipelineSpecError(f"{where}: `{section}.{exc.key}` {exc.message}") from None


def _resolve_path(value: str, base_dir: Path) -> str:
    """Make relative local paths absolute against the YAML file; leave hub ids alone."""
    if value.startswith(("./", "../", "~")):
        return str((base_dir / os.path.expanduser(value)).resolve())
    candidate = base_dir / value
    return str(candidate.resolve()) if candidate.exists() else value


def spec_from_dict(raw: Any, where: str, base_dir: Path) -> PipelineSpec:
    """Validate one pipeline mapping (as found in YAML) and build its spec."""
    if not isinstance(raw, dict):
        raise PipelineSpecError(f"{where}: each pipeline must be a mapping with `name`, `model`, `corpus`.")
    valid = {f.name for f in dataclasses.fields(PipelineSpec)} - {"demo"}
    unknown = sorted(set(raw) - valid, key=str)
    if unknown:
        raise PipelineSpecError(f"{where}: " + unknown_keys_message(unknown, valid, "the pipeline"))
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PipelineSpecError(
            f"{where}: `name` must be letters, digits and underscores, starting with a letter "
            f"(it becomes a Dagster asset key prefix); got {name!r}.")
    if name == "demo":
        raise PipelineSpecError(f"{where}: the name `demo` is reserved for the embedded default pipeline.")
    where = f"{where} (pipeline {name!r})"
    for required in ("model", "corpus"):
        if required not in raw:
            raise PipelineSpecError(f"{where}: missing `{required}` section.")
    kwargs: dict[str, Any] = {"name": name}
    for section in ("model", "corpus", "queries", "gradients", "scoring", "index", "evaluation", "magic",
                    "finetune"):
        if raw.get(section) is not None:
            kwargs[section] = _build_section(where, section, raw[section], base_dir)
    if not kwargs["model"].name_or_path:
        raise PipelineSpecError(f"{where}: `model.name_or_path` is required (a local directory or a hub id).")
    if not kwargs["corpus"].path:
        raise PipelineSpecError(f"{where}: `corpus.path` is required (a file, a directory or a hub dataset).")
    for key in ("shard_size", "schedule"):
        if key in raw:
            kwargs[key] = raw[key]
    try:
        spec = PipelineSpec(**kwargs)
    except SpecValueError as exc:
        raise PipelineSpecError(f"{where}: `{exc.key}` {exc.message}") from None
    config = Path(spec.model.name_or_path) / "config.json"
    if config.is_file():
        try:
            limit = position_limit(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError):
            limit = None
        problem = max_length_problem(spec, limit)
        if problem:
            raise PipelineSpecError(f"{where}: {problem}")
    return spec


def position_limit(config: dict[str, Any]) -> int | None:
    """The longest sequence a model's config allows (``max_position_embeddings`` or its aliases)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_length_problem(spec: PipelineSpec, limit: int | None) -> str | None:
    """A message when ``corpus.max_length`` or ``queries.max_length`` exceeds the model's positions."""
    if limit is None:
        return None
    for section in ("corpus", "queries"):
        data = getattr(spec, section)
        if data is not None and data.max_length > limit:
            return (f"`{section}.max_length` is {data.max_length}, beyond the model's {limit} positions; "
                    f"set it to at most {limit} (longer documents are truncated or, with `overflow: chunk`, "
                    "split).")
    return None


def load_pipeline_file(path: str | os.PathLike, errors: list[str] | None = None) -> list[PipelineSpec]:
    """Read a YAML file of the form ``pipelines: [ {name, model, corpus, ...}, ... ]``.

    Without ``errors`` any invalid pipeline raises :class:`PipelineSpecError`; with a list, each
    invalid pipeline's message is appended to it and the valid pipelines are returned.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise PipelineSpecError(f"Pipeline file {path} does not exist; create it or unset ${PIPELINES_ENV}.")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise PipelineSpecError(f"{path}: not valid YAML ({exc}). Fix the syntax at the position shown.") \
                from None
        if not isinstance(raw, dict) or not isinstance(raw.get("pipelines"), list):
            raise PipelineSpecError(f"{path}: expected a top-level `pipelines:` list of pipeline mappings.")
    except PipelineSpecError as exc:
        if errors is None:
            raise
        errors.append(str(exc))
        return []
    specs = []
    for i, item in enumerate(raw["pipelines"]):
        try:
            specs.append(spec_from_dict(item, f"{path}: pipelines[{i}]", path.parent.resolve()))
        except PipelineSpecError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        message = f"{path}: pipeline names must be unique; repeated: {duplicates}."
        if errors is None:
            raise PipelineSpecError(message)
        errors.append(message + " Every pipeline of a repeated name was skipped.")
        specs = [s for s in specs if s.name not in duplicates]
    return specs


def configured_pipelines(errors: list[str] | None = None) -> list[PipelineSpec]:
    """The embedded demo plus the user's pipelines from ``$ATTRIBUTION_PIPELINES`` or ./pipelines.yaml.

    With ``errors``, an invalid pipeline is skipped and its message appended there, so one bad
    entry never hides the others (or the demo).
    """
    specs = [demo_spec()]
    env = os.environ.get(PIPELINES_ENV)
    if env:
        specs += load_pipeline_file(env, errors)
    elif Path("pipelines.yaml").is_file():
        specs += load_pipeline_file("pipelines.yaml", errors)
    return specs
