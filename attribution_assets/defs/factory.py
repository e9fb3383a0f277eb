"""Turn :class:`PipelineSpec` objects and a deployment profile into Dagster definitions."""

from __future__ import annotations

import json
import warnings

import dagster as dg

from attribution_assets.defs.ask import ask_jobs
from attribution_assets.defs.automation import new_data_sensor, rebuild_schedule
from attribution_assets.defs.common import shards_partitions
from attribution_assets.defs.corpus import corpus_assets
from attribution_assets.defs.evaluation import evaluation_assets, train_time_evaluation_assets
from attribution_assets.defs.finetune import finetune_assets
from attribution_assets.defs.gradients import gradient_assets
from attribution_assets.defs.index import index_assets
from attribution_assets.defs.kfac import kfac_assets
from attribution_assets.defs.magic import magic_assets
from attribution_assets.defs.planning import on_demand_jobs, stage_jobs
from attribution_assets.defs.profiles import DeploymentProfile, load_profile, profile_from_json
from attribution_assets.defs.runs import RECIPE_KEY
from attribution_assets.defs.scores import score_assets
from attribution_assets.spec import PipelineSpec, spec_from_json, spec_to_json


def pipeline_definitions(spec: PipelineSpec, profile: DeploymentProfile) -> dg.Definitions:
    """Assets, checks, stage and on-demand jobs, sensor and schedule of one pipeline, under the key prefix
    ``[spec.name]``; assets that run the model carry the profile's precision in their version, and
    shard-partitioned assets the profile's backfill policy (``shards_per_run``)."""
    compute = profile.compute
    assets = [*corpus_assets(spec), *gradient_assets(spec, compute), *kfac_assets(spec, compute),
              *score_assets(spec, compute),
              *index_assets(spec), *evaluation_assets(spec, compute), *finetune_assets(spec, compute),
              *magic_assets(spec, compute), *train_time_evaluation_assets(spec)]
    shards = shards_partitions(spec)
    assets = [a.with_attributes(backfill_policy=profile.backfill_policy())  # shards per run: the profile's
              if isinstance(a, dg.AssetsDefinition) and a.partitions_def == shards else a for a in assets]
    present = {k for a in assets if isinstance(a, dg.AssetsDefinition) for k in a.keys}
    sensor, schedule = new_data_sensor(spec), rebuild_schedule(spec)
    retry_policy = profile.retry_policy()
    jobs = [*stage_jobs(spec, present, retry_policy), *on_demand_jobs(spec, present, retry_policy),
            *ask_jobs(spec, present)]
    return dg.Definitions(assets=assets, jobs=jobs, sensors=[sensor] if sensor else [],
                          schedules=[schedule] if schedule else [])


def invalid_pipeline_specs(errors: list[str]) -> list[dg.AssetSpec]:
    """One placeholder asset per pipeline that failed validation, in the group
    ``invalid_pipelines``, so the UI shows the error next to the valid pipelines."""
    return [dg.AssetSpec(dg.AssetKey(["invalid_pipelines", f"entry_{i}"]), group_name="invalid_pipelines",
                         description=f"Not loaded: {error}", metadata={"error": dg.MetadataValue.md(error)})
            for i, error in enumerate(errors)]


def build_definitions(specs: list[PipelineSpec], profile: DeploymentProfile | None = None,
                      spec_errors: list[str] | None = None) -> dg.Definitions:
    """All pipelines with the profile's ``storage`` and ``compute`` resources and executor
    (default: the profile ``$ATTRIBUTION_RESOURCES`` names, else ``local``); ``spec_errors``
    (pipelines that failed validation) appear as placeholder assets with the message."""
    profile = profile or load_profile()
    recipe = json.dumps({"specs": [spec_to_json(s) for s in specs], "profile": profile.to_json()})
    shared = dg.Definitions(assets=invalid_pipeline_specs(spec_errors or []),
                            resources={"storage": profile.storage, "compute": profile.compute},
                            executor=profile.executor_definition(), metadata={RECIPE_KEY: recipe})
    with warnings.catch_warnings():  # `backfill_policy` on assets is marked beta in Dagster 1.13
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Definitions.merge(shared, *(pipeline_definitions(s, profile) for s in specs))


def definitions_from_recipe(recipe: str) -> dg.Definitions:
    """The definitions ``recipe`` (:data:`runs.RECIPE_KEY`'s JSON) describes, in another process."""
    raw = json.loads(recipe)
    return build_definitions([spec_from_json(s) for s in raw["specs"]], profile_from_json(raw["profile"]))
