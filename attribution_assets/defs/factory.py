"""Turn a :class:`PipelineSpec` into Dagster definitions under the pipeline's key prefix."""

from __future__ import annotations

import warnings

import dagster as dg

from resources import ComputeResource, ModelResource, StorageResource

from ..spec import PipelineSpec
from .automation import new_data_sensor, rebuild_schedule
from .common import COMPUTE, STORAGE, model_resource_key
from .corpus import corpus_assets
from .evaluation import evaluation_assets
from .gradients import gradient_assets
from .index import index_assets
from .scores import score_assets


def model_resource(spec: PipelineSpec) -> ModelResource:
    m = spec.model
    return ModelResource(name_or_path=m.name_or_path or "", revision=m.revision, dtype=m.dtype,
                         trust_remote_code=m.trust_remote_code, pad_token=m.pad_token,
                         model_kwargs=dict(m.model_kwargs))


def pipeline_definitions(spec: PipelineSpec) -> dg.Definitions:
    """Assets, checks and the per-pipeline model resource of one pipeline."""
    assets = [*corpus_assets(spec), *gradient_assets(spec), *score_assets(spec), *index_assets(spec),
              *evaluation_assets(spec)]
    sensor, schedule = new_data_sensor(spec), rebuild_schedule(spec)
    return dg.Definitions(assets=assets, sensors=[sensor] if sensor else [],
                          schedules=[schedule] if schedule else [],
                          resources={model_resource_key(spec): model_resource(spec)})


def build_definitions(specs: list[PipelineSpec], storage: StorageResource | None = None,
                      compute: ComputeResource | None = None) -> dg.Definitions:
    """All pipelines plus the shared storage and compute resources."""
    shared = dg.Definitions(resources={STORAGE: storage or StorageResource(),
                                       COMPUTE: compute or ComputeResource()})
    with warnings.catch_warnings():  # `backfill_policy` on assets is marked beta in Dagster 1.13
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Definitions.merge(shared, *(pipeline_definitions(s) for s in specs))
