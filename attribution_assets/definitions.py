"""The Dagster code location: the embedded demo plus pipelines from YAML (see ``spec/pipeline.py``),
with the deployment profile that ``$ATTRIBUTION_RESOURCES`` names (``resources/*.yaml``).

Under ``$ATTRIBUTION_RECIPE`` (a recipe file that ``attribution materialize`` writes for the run
queue's code server) it serves exactly the pipelines and profile of the command that queued the
runs instead."""

import os
from pathlib import Path

from attribution_assets.defs.factory import build_definitions, definitions_from_recipe
from attribution_assets.defs.runs import RECIPE_ENV
from attribution_assets.spec import configured_pipelines

_errors: list[str] = []  # invalid pipelines are skipped and shown in the UI, never fatal
if os.environ.get(RECIPE_ENV):
    defs = definitions_from_recipe(Path(os.environ[RECIPE_ENV]).read_text())
else:
    defs = build_definitions(configured_pipelines(_errors), spec_errors=_errors)
