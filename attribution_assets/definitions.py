"""The Dagster code location: the embedded demo plus pipelines from YAML (see ``spec/pipeline.py``),
with the deployment profile that ``$ATTRIBUTION_RESOURCES`` names (``resources/*.yaml``)."""

from attribution_assets.defs.factory import build_definitions
from attribution_assets.spec import configured_pipelines

_errors: list[str] = []  # invalid pipelines are skipped and shown in the UI, never fatal
defs = build_definitions(configured_pipelines(_errors), spec_errors=_errors)
