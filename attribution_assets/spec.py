"""Pipelines as data: a pipeline = name + model + training corpus + query set + settings.

Specs are plain frozen dataclasses (no Dagster import), read from YAML by
:func:`load_pipeline_file`. The Dagster factory in ``defs/`` turns each spec into
assets under the key prefix ``[name]`` with a dynamic partition set of its own.

YAML location: ``$ATTRIBUTION_PIPELINES`` if set, else ``pipelines.yaml`` in the
working directory if it exists. Relative paths in a file are resolved against the
file's directory. See ``examples/pipelines.example.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PIPELINES_ENV = "ATTRIBUTION_PIPELINES"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class PipelineSpecError(ValueError):
    """A pipeline spec is malformed; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DataSpec:
    """Where documents (or queries) come from and how they become token sequences.

    ``path``: a local file (jsonl/json/csv/parquet/txt), a directory of such files, a
    ``Dataset.save_to_disk`` directory, or a Hugging Face hub dataset name.
    Exactly one content mode: ``text_column`` (loss on every token), ``prompt_column``
    + ``completion_column`` (loss on completion tokens only), or ``conversation_column``
    (list of ``{"role", "content"}`` rendered with the tokenizer's chat template, loss
    on assistant turns only). ``overflow``: ``truncate`` at ``max_length`` tokens or
    ``chunk`` into pieces of ``max_length`` tokens.
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

    @property
    def mode(self) -> str:
        if self.conversation_column:
            return "conversation"
        if self.prompt_column or self.completion_column:
            return "prompt_completion"
        return "text"


@dataclass(frozen=True)
class ModelSpec:
    """A Hugging Face causal LM: local directory or hub id (``None`` for the demo's trained model)."""

    name_or_path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    pad_token: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoSpec:
    """Size of the embedded synthetic demo (corpus generator and model training)."""

    people: int = 100
    seed: int = 0
    epochs: int | None = None
    layers: int | None = None
    hidden: int | None = None
    vocab_size: int | None = None

    def model_overrides(self) -> dict[str, int]:
        """Settings that replace ``DemoModelConfig`` defaults (``None`` keeps the default)."""
        names = ("epochs", "layers", "hidden", "vocab_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class GradientSpec:
    """Per-example gradient collection (see ``engine.collector``)."""

    projection_dim: int = 16
    projection_kind: str = "rademacher"
    seed: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("*lm_head*", "*embed_out*")
    include_bias: bool = False
    per_token: bool = False
    dtype: str = "float32"
    normalizer: str = "none"
    optimizer_state: str | None = None
    max_tokens_per_batch: int = 4096


@dataclass(frozen=True)
class ScoringSpec:
    """TrackStar-style scoring (see ``engine.preconditioners`` and ``engine.scoring``)."""

    metric: str = "cosine"
    aggregate: str = "individual"
    precondition: bool = True
    damping: float = 0.1
    mixing: str | float = "auto"
    mode: str = "stored"
    top_k: int = 100


@dataclass(frozen=True)
class IndexSpec:
    """FAISS index over the training gradients as scores see them (see ``engine.index``).

    ``factory``: a FAISS index factory string (``Flat``, ``IVF{n},Flat``, ``IVF{auto},Flat``,
    ``IVF{n},PQ{m}``, ``HNSW{M}``, ``...,SQfp16``); inner-product metric always.
    ``max_vectors_per_index`` splits the index into parts searched together.
    ``nprobe`` (IVF) / ``ef_search`` (HNSW): an integer, or ``auto`` to choose the smallest
    value whose recall@10 against exact search reaches ``target_recall`` on the pipeline's
    own queries, measured when the index is built.
    """

    enabled: bool = True
    factory: str = "Flat"
    train_sample: int = 65536
    nprobe: int | str = "auto"
    ef_search: int | str = "auto"
    target_recall: float = 0.95
    max_vectors_per_index: int | None = None
    use_gpu: str = "auto"
    self_recall_sample: int = 256

    def __post_init__(self):
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be `auto` (calibrated to target_recall when the index is "
                                 f"built) or an integer >= 1, got {value!r}")
        recall = self.target_recall
        if isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1:
            raise ValueError(f"target_recall must be a number in (0, 1], e.g. 0.95, got {recall!r}")


@dataclass(frozen=True)
class EvaluationSpec:
    """Quality evaluation (``engine.evaluation``, ``engine.lds``): LDS subsets for the demo.

    ``lds_top_k``: the LDS is reported for each of these score variants: 0 = every
    document's score enters the predicted effect; ``k`` = only each query's ``k`` highest
    (100 is what a score table keeps by default, 10 the recall@10 cut).
    """

    lds_subsets: int = 32
    lds_fraction: float = 0.5
    lds_seed: int = 0
    lds_top_k: tuple[int, ...] = (0, 100, 10)

    def __post_init__(self):
        if not self.lds_top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 0
                                     for k in self.lds_top_k):
            raise ValueError(f"lds_top_k must be a non-empty list of integers >= 0 (0 = every score), "
                             f"got {list(self.lds_top_k)}")


@dataclass(frozen=True)
class PipelineSpec:
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

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections, used as code/config versions."""
        payload = {s: _jsonable(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def demo_spec(people: int = 100, shard_size: int = 256, gradients: GradientSpec | None = None,
              scoring: ScoringSpec | None = None, evaluation: EvaluationSpec | None = None,
              **demo_kwargs: Any) -> PipelineSpec:
    """The embedded default pipeline: synthetic facts, a locally trained tokenizer and model.

    Every score is kept (``top_k=0``) so that evaluations can rank the whole corpus.
    """
    return PipelineSpec(
        name="demo",
        model=ModelSpec(),
        corpus=DataSpec(max_length=64),
        queries=DataSpec(prompt_column="prompt", completion_column="completion",
                         id_column="query_id", gold_column="gold_doc_ids", max_length=64),
        shard_size=shard_size,
        gradients=gradients or GradientSpec(projection_dim=32, normalizer="adafactor"),
        scoring=scoring or ScoringSpec(top_k=0),
        evaluation=evaluation or EvaluationSpec(),
        demo=DemoSpec(people=people, **demo_kwargs),
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


_SECTIONS = {
    "model": ModelSpec, "corpus": DataSpec, "queries": DataSpec,
    "gradients": GradientSpec, "scoring": ScoringSpec, "demo": DemoSpec, "index": IndexSpec,
    "evaluation": EvaluationSpec,
}
_CHOICES = {
    ("corpus", "format"): {"auto", "jsonl", "json", "csv", "parquet", "txt", "disk", "hub"},
    ("corpus", "overflow"): {"truncate", "chunk"},
    ("gradients", "projection_kind"): {"rademacher", "gaussian"},
    ("gradients", "normalizer"): {"none", "adam", "adafactor"},
    ("gradients", "dtype"): {"float32", "float16"},
    ("scoring", "metric"): {"cosine", "inner_product"},
    ("scoring", "aggregate"): {"individual", "nearest", "mean", "sum"},
    ("scoring", "mode"): {"stored", "streaming"},
    ("model", "dtype"): {"float32", "bfloat16", "float16"},
    ("index", "use_gpu"): {"auto", "true", "false"},
}
_PATH_KEYS = {("model", "name_or_path"), ("corpus", "path"), ("queries", "path"),
              ("gradients", "optimizer_state")}


def _build_section(where: str, section: str, raw: Any, base_dir: Path) -> Any:
    cls = _SECTIONS[section]
    if not isinstance(raw, dict):
        raise PipelineSpecError(f"{where}: `{section}` must be a mapping, got {type(raw).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PipelineSpecError(
            f"{where}: unknown key(s) {unknown} in `{section}`; valid keys: {sorted(names)}.")
    values = dict(raw)
    for key, value in values.items():
        kind = "corpus" if section == "queries" else section
        allowed = _CHOICES.get((kind, key))
        if allowed is not None and value not in allowed:
            raise PipelineSpecError(
                f"{where}: `{section}.{key}` is {value!r}; choose one of {sorted(allowed)}.")
        if (section, key) in _PATH_KEYS and isinstance(value, str):
            values[key] = _resolve_path(value, base_dir)
        if key in ("include", "exclude", "lds_top_k") and isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise PipelineSpecError(f"{where}: invalid `{section}`: {exc}") from None


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
    valid = {f.name for f in dataclasses.fields(PipelineSpec)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise PipelineSpecError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}.")
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
    for section in ("model", "corpus", "queries", "gradients", "scoring", "index", "evaluation"):
        if raw.get(section) is not None:
            kwargs[section] = _build_section(where, section, raw[section], base_dir)
    if not kwargs["model"].name_or_path:
        raise PipelineSpecError(f"{where}: `model.name_or_path` is required (a local directory or a hub id).")
    if not kwargs["corpus"].path:
        raise PipelineSpecError(f"{where}: `corpus.path` is required (a file, a directory or a hub dataset).")
    shard_size = raw.get("shard_size", 1000)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise PipelineSpecError(f"{where}: `shard_size` must be a positive integer, got {shard_size!r}.")
    kwargs["shard_size"] = shard_size
    if raw.get("schedule") is not None:
        kwargs["schedule"] = str(raw["schedule"])
    return PipelineSpec(**kwargs)


def load_pipeline_file(path: str | os.PathLike) -> list[PipelineSpec]:
    """Read a YAML file of the form ``pipelines: [ {name, model, corpus, ...}, ... ]``."""
    path = Path(path)
    if not path.is_file():
        raise PipelineSpecError(f"Pipeline file {path} does not exist; create it or unset ${PIPELINES_ENV}.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineSpecError(f"{path}: not valid YAML ({exc}). Fix the syntax at the position shown.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("pipelines"), list):
        raise PipelineSpecError(f"{path}: expected a top-level `pipelines:` list of pipeline mappings.")
    specs = [spec_from_dict(item, f"{path}: pipelines[{i}]", path.parent.resolve())
             for i, item in enumerate(raw["pipelines"])]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineSpecError(f"{path}: pipeline names must be unique; repeated: {duplicates}.")
    return specs


def configured_pipelines() -> list[PipelineSpec]:
    """The embedded demo plus the user's pipelines from ``$ATTRIBUTION_PIPELINES`` or ./pipelines.yaml."""
    specs = [demo_spec()]
    env = os.environ.get(PIPELINES_ENV)
    if env:
        specs += load_pipeline_file(env)
    elif Path("pipelines.yaml").is_file():
        specs += load_pipeline_file("pipelines.yaml")
    return specs
