"""The ``preconditioner`` asset mixes full-text queries as Bergson does (``mixing_components: auto``
is k = 1000 for them, the paper's share of the dims for prompt/completion queries): its saved
lambda equals the engine's, computed here from the stored autocorrelations, and differs from the
other query form's rule on the same rows."""

import dataclasses
import json

import dagster as dg

from attribution_assets.defs.planning import STAGES
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import (
    load_autocorrelation,
    row_autocorrelation,
)
from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    trackstar_preconditioner,
)
from tests.helpers import SENTENCES, definitions_for, user_pipeline_spec


def test_full_text_queries_get_bergsons_mixing_components(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:8]))
    spec = dataclasses.replace(spec, queries=dataclasses.replace(spec.queries, prompt_column=None,
                                                                 completion_column=None))
    assert spec.full_text_queries
    defs = definitions_for([spec], tmp_path)
    stages = [s for s in STAGES if s.name in ("prepare", "shards", "fan_in")]
    materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), stages=stages, log=lambda _: None,
                         log_level="WARNING")
    paths = PipelinePaths.under(tmp_path, spec.name)
    queries = GradientStore(paths.query_gradients)
    train = load_autocorrelation(paths.autocorrelation)
    query = row_autocorrelation(queries.document_rows(), queries.info["modules"])
    full_text, completion = (trackstar_preconditioner(train, query, spec.scoring, full_text=f).lam
                             for f in (True, False))
    assert Preconditioner.load(paths.preconditioner).lam == full_text != completion
