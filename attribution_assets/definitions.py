"""The Dagster code location: the embedded demo plus pipelines from YAML (see ``spec.py``)."""

import warnings

import dagster as dg

from attribution_assets.defs.factory import build_definitions
from attribution_assets.spec import configured_pipelines

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # backfill_policy on assets
defs = build_definitions(configured_pipelines())
