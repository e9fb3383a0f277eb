"""A whole pipeline (:class:`PipelineSpec`), the embedded demo (:func:`demo_spec`), JSON round
trips and YAML loading.

YAML location: ``$ATTRIBUTION_PIPELINES`` if set, else ``pipelines.yaml`` in the
working directory if it exists. Relative paths in a file are resolved against the
file's directory. See ``examples/pipelines.example.yaml``.
"""

from __future__ import annotations

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
from attribution_assets.spec.checks import (
    PipelineSpecError,
    SpecValueError,
    _check_int,
    _check_str,
)
from attribution_assets.spec.curvature import CurvatureSpec
from attribution_assets.spec.data import DataSpec, ModelSpec
from attribution_assets.spec.demo import DemoSpec
from attribution_assets.spec.evaluation import EvaluationSpec
from attribution_assets.spec.gradients import GradientSpec
from attribution_assets.spec.scoring import IndexSpec, ScoringSpec
from attribution_assets.spec.training import FinetuneSpec, MagicSpec

PIPELINES_ENV = "ATTRIBUTION_PIPELINES"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


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
    curvature: CurvatureSpec = field(default_factory=CurvatureSpec)

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
            if self.curvature.label_samples != 1 and self.scoring.kfac_labels == "true":
                raise SpecValueError("curvature.label_samples", f"is {self.curvature.label_samples}, but "
                                                                "`scoring.kfac_labels: true` takes the documents' "
                                                                "own tokens, one label per position: set it to 1 "
                                                                "or use `kfac_labels: sampled`.")
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
                                             "engine.training.callback.AttributionCallback with your own Trainer).")
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

    @property
    def full_text_queries(self) -> bool:
        """Whether the query rows' loss covers the whole query text: queries without a
        prompt/completion or conversation split (TrackStar's auto mixing depends on it)."""
        return self.queries is not None and self.queries.mode == "text"

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
    "evaluation": EvaluationSpec, "magic": MagicSpec, "finetune": FinetuneSpec, "curvature": CurvatureSpec,
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
                    "finetune", "curvature"):
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
            model_config = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            model_config = {}
        problem = (max_length_problem(spec, position_limit(model_config))
                   or projection_problem(spec, largest_module_dimension(model_config)))
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


def largest_module_dimension(config: dict[str, Any]) -> int | None:
    """An upper bound on the output or input size of any hooked module of a model, from its
    config: the hidden size (times 3 for a fused query/key/value projection) or the MLP width,
    whichever is larger (``hidden_size``/``n_embd``/``d_model``, ``intermediate_size``/``n_inner``/
    ``ffn_dim``, 4 x hidden when the config names none). None when the config names no hidden size."""
    def first(*names: str) -> int | None:
        for name in names:
            value = config.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    if hidden is None:
        return None
    return max(3 * hidden, first("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim") or 4 * hidden)


def projection_problem(spec: PipelineSpec, largest: int | None) -> str | None:
    """A message when ``gradients.projection_dim`` exceeds every module's size: a ``p x p`` block
    of a module ``[O, I]`` has rank at most ``min(O, I)``, so a ``p`` beyond the largest module
    dimension only multiplies the row width (and memory, ``p^2`` per module, ``p^4`` for the
    autocorrelation) with no information gained."""
    p = spec.gradients.projection_dim
    if largest is None or p <= largest:
        return None
    return (f"`gradients.projection_dim` is {p}, larger than any module of the model (its largest dimension is "
            f"at most {largest}, from config.json): a {p} x {p} block per module would hold no more than the "
            f"module's own gradient in {p * p:,} values per row. Set it to at most {largest} (32-1024 is usual) "
            "or to 0 for full, unprojected gradients.")


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


def configured_pipelines(errors: list[str] | None = None,
                         path: str | os.PathLike | None = None) -> list[PipelineSpec]:
    """The embedded demo plus the user's pipelines from ``path``, else ``$ATTRIBUTION_PIPELINES``,
    else ./pipelines.yaml.

    With ``errors``, an invalid pipeline is skipped and its message appended there, so one bad
    entry never hides the others (or the demo).
    """
    specs = [demo_spec()]
    env = path or os.environ.get(PIPELINES_ENV)
    if env:
        specs += load_pipeline_file(env, errors)
    elif Path("pipelines.yaml").is_file():
        specs += load_pipeline_file("pipelines.yaml", errors)
    return specs
