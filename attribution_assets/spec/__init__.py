"""Pipelines as data: a pipeline = name + model + training corpus + query set + settings.

Specs are plain frozen dataclasses (no Dagster import), read from YAML by
:func:`load_pipeline_file`. The Dagster factory in ``defs/`` turns each spec into
assets under the key prefix ``[name]`` with a dynamic partition set of its own.

Modules, one per concern (imports go ``checks`` <- sections <- ``pipeline``):

- ``checks``: :class:`PipelineSpecError`, :class:`SpecValueError`, the ``_check_*`` validators
- ``data``: :class:`DataSpec` (``corpus``, ``queries``), :class:`ModelSpec` (``model``)
- ``demo``: :class:`DemoSpec` (``demo``)
- ``gradients``: :class:`GradientSpec` (``gradients``)
- ``scoring``: :class:`ScoringSpec` (``scoring``), :class:`IndexSpec` (``index``)
- ``curvature``: :class:`CurvatureSpec` (``curvature``: the EK-FAC / K-FAC label draws)
- ``evaluation``: :class:`EvaluationSpec` (``evaluation``)
- ``training``: :class:`MagicSpec` (``magic``), :class:`FinetuneSpec` (``finetune``)
- ``pipeline``: :class:`PipelineSpec`, :func:`demo_spec`, JSON round trips, YAML loading
"""

from attribution_assets.spec.checks import PipelineSpecError, SpecValueError
from attribution_assets.spec.curvature import CurvatureSpec
from attribution_assets.spec.data import (
    ADVANTAGE_WEIGHTINGS,
    DATA_FORMATS,
    MODEL_DTYPES,
    DataSpec,
    ModelSpec,
)
from attribution_assets.spec.demo import DEMO_OTHER_RELATIONS, DEMO_RELATIONS, DemoSpec
from attribution_assets.spec.evaluation import (
    LDS_SEED_B_VARIES,
    TAIL_PATCH_OPTIMIZERS,
    EvaluationSpec,
)
from attribution_assets.spec.gradients import (
    GRADIENT_NORMALIZERS,
    GRADIENT_SPLITS,
    PER_TOKEN_MODES,
    GradientSpec,
)
from attribution_assets.spec.pipeline import (
    NAME_RE,
    PIPELINES_ENV,
    PipelineSpec,
    configured_pipelines,
    demo_spec,
    largest_module_dimension,
    load_pipeline_file,
    max_length_problem,
    position_limit,
    projection_problem,
    spec_from_dict,
    spec_from_json,
    spec_to_json,
    unknown_keys_message,
)
from attribution_assets.spec.scoring import (
    KRONECKER_PRECONDITIONERS,
    PRECONDITIONERS,
    SCORE_BREAKDOWNS,
    IndexSpec,
    ScoringSpec,
)
from attribution_assets.spec.training import (
    FINETUNE_OPTIMIZERS,
    MAGIC_DTYPES,
    MAGIC_FROM_DEMO,
    MAGIC_OPTIMIZERS,
    MAGIC_SCHEDULES,
    FinetuneSpec,
    MagicSpec,
)

__all__ = [
    "ADVANTAGE_WEIGHTINGS",
    "DATA_FORMATS",
    "DEMO_OTHER_RELATIONS",
    "DEMO_RELATIONS",
    "FINETUNE_OPTIMIZERS",
    "GRADIENT_NORMALIZERS",
    "GRADIENT_SPLITS",
    "KRONECKER_PRECONDITIONERS",
    "LDS_SEED_B_VARIES",
    "MAGIC_DTYPES",
    "MAGIC_FROM_DEMO",
    "MAGIC_OPTIMIZERS",
    "MAGIC_SCHEDULES",
    "MODEL_DTYPES",
    "NAME_RE",
    "PER_TOKEN_MODES",
    "PIPELINES_ENV",
    "PRECONDITIONERS",
    "SCORE_BREAKDOWNS",
    "TAIL_PATCH_OPTIMIZERS",
    "CurvatureSpec",
    "DataSpec",
    "DemoSpec",
    "EvaluationSpec",
    "FinetuneSpec",
    "GradientSpec",
    "IndexSpec",
    "MagicSpec",
    "ModelSpec",
    "PipelineSpec",
    "PipelineSpecError",
    "ScoringSpec",
    "SpecValueError",
    "configured_pipelines",
    "demo_spec",
    "largest_module_dimension",
    "load_pipeline_file",
    "max_length_problem",
    "position_limit",
    "projection_problem",
    "spec_from_dict",
    "spec_from_json",
    "spec_to_json",
    "unknown_keys_message",
]
