"""Turn :class:`PipelineSpec` objects and a deployment profile into Dagster definitions."""

from __future__ import annotations

import warnings

import dagster as dg

from attribution_assets.defs.automation import new_data_sensor, rebuild_schedule
from attribution_assets.defs.corpus import corpus_assets
from attribution_assets.defs.evaluation import evaluation_assets
from attribution_assets.defs.gradients import gradient_assets
from attribution_assets.defs.index import index_assets
from attribution_assets.defs.kfac import kfac_assets
from attribution_assets.defs.profiles import DeploymentProfile, load_profile
from attribution_assets.defs.scores import score_assets
from attribution_assets.spec import PipelineSpec


def pipeline_definitions(spec: PipelineSpec) -> dg.Definitions:
    """Assets, checks, sensor and schedule of one pipeline, under the key prefix ``[spec.name]``."""
    assets = [*corpus_assets(spec), *gradient_assets(spec), *kfac_assets(spec), *score_assets(spec), *index_assets(spec),
              *evaluation_assets(spec)]
    sensor, schedule = new_data_sensor(spec), rebuild_schedule(spec)
    return dg.Definitions(assets=assets, sensors=[sensor] if sensor else [],
                          schedules=[schedule] if schedule else [])


def build_definitions(specs: list[PipelineSpec], profile: DeploymentProfile | None = None) -> dg.Definitions:
    """All pipelines with the profile's ``storage`` and ``compute`` resources and executor
    (default: the profile ``$ATTRIBUTION_RESOURCES`` names, else ``local``)."""
    profile = profile or load_profile()
    shared = dg.Definitions(resources={"storage": profile.storage, "compute": profile.compute},
                            executor=profile.executor_definition())
    with warnings.catch_warnings():  # `backfill_policy` on assets is marked beta in Dagster 1.13
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Definitions.merge(shared, *(pipeline_definitions(s) for s in specs))
