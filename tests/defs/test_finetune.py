"""The opt-in `finetune` asset end to end: fine-tuned model, train-time shards, scores from them."""

import dataclasses

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.training.callback import training_tags
from attribution_assets.spec import FinetuneSpec, GradientSpec, ScoringSpec, SpecValueError
from tests.helpers import definitions_for, user_pipeline_spec


def test_finetune_then_score_from_train_time_rows(one_thread, tmp_path, tiny_model_dir):
    base = user_pipeline_spec(tmp_path, tiny_model_dir, name="ft")
    spec = dataclasses.replace(
        base, finetune=FinetuneSpec(epochs=2, batch_size=2, steps_per_shard=2, learning_rate=1e-3),
        gradients=GradientSpec(projection_dim=4, normalizer="adafactor"),
        scoring=ScoringSpec(top_k=0, train_rows="train_time"))
    root = tmp_path / "storage"
    materialize_pipeline(definitions_for([spec], root), spec, dg.DagsterInstance.ephemeral(),
                         log=lambda _: None, log_level="WARNING")
    paths = PipelinePaths.under(root, spec.name)
    assert (paths.finetuned_model / "config.json").is_file() and paths.finetuned_optimizer.is_file()
    shards = paths.train_time_shards()
    assert shards == ["steps_000001-000002", "steps_000003-000004", "steps_000005-000006"]
    stores = [GradientStore(paths.train_time_gradients(s)) for s in shards]
    assert sorted(s for st in stores for s in training_tags(st)[0]) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    total: dict[str, np.ndarray] = {}
    for st in stores:
        for doc, row in zip(st.doc_ids, np.asarray(st.array)):
            total[doc] = total.get(doc, 0) + row.astype(np.float64)
    docs = 0
    for shard in paths.gradient_shards():
        store = GradientStore(paths.train_gradients(shard))
        for doc, row in zip(store.doc_ids, np.asarray(store.array)):
            np.testing.assert_allclose(row, total[doc], rtol=1e-5, atol=1e-7)
            docs += 1
    assert docs == len(total) == 6  # every document was seen twice (two epochs)
    query = GradientStore(paths.query_gradients)
    assert query.info["model_fingerprint"] == store.info["model_fingerprint"]
    assert any(paths.scores(s).is_file() for s in paths.gradient_shards())


def test_train_time_rows_need_a_finetune_section(tiny_model_dir, tmp_path):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    with pytest.raises(SpecValueError, match="finetune"):
        dataclasses.replace(spec, scoring=ScoringSpec(train_rows="train_time"))
    with pytest.raises(SpecValueError, match="adafactor"):
        dataclasses.replace(spec, finetune=FinetuneSpec(optimizer="adafactor"),
                            gradients=GradientSpec(normalizer="adam"))
