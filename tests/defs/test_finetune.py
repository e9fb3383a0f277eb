"""The opt-in `finetune` asset end to end: fine-tuned model, train-time shards, scores from them."""

import dataclasses

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.training.stored_rows import training_tags
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


def test_grpo_pipeline_weights_post_hoc_rows(one_thread, tmp_path, tiny_model_dir):
    """Rewards in the corpus -> advantages in documents and tokens -> weighted stored rows."""
    import json

    import yaml

    from attribution_assets.engine.gradients.collector import GradientCollector
    from attribution_assets.engine.io import data
    from attribution_assets.engine.io.models import load_model
    from attribution_assets.spec import load_pipeline_file
    from tests.helpers import SENTENCES

    rewards = [1.0, 0.0, float("nan"), 2.0, 0.5, 1.5]
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"text": s, "reward": r, "group": i % 2}) + "\n" for i, (s, r) in enumerate(zip(SENTENCES, rewards))))
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "Mara Quill was born in Lisbon."}))
    body = {"pipelines": [{"name": "rl", "model": {"name_or_path": str(tiny_model_dir)},
                           "corpus": {"path": "train.jsonl", "max_length": 64, "reward_column": "reward",
                                      "group_column": "group", "advantage_weighting": "grpo"},
                           "queries": {"path": "q.jsonl", "max_length": 64}, "shard_size": 10,
                           "gradients": {"projection_dim": 4}, "scoring": {"top_k": 0}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(body))
    (spec,) = load_pipeline_file(tmp_path / "p.yaml")
    root = tmp_path / "storage"
    defs = definitions_for([spec], root)
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="WARNING")
    event = instance.get_latest_materialization_event(dg.AssetKey(["rl", "corpus"]))
    assert event.asset_materialization.metadata["skipped_nan_rewards"].value == 1
    paths = PipelinePaths.under(root, "rl")
    (shard,) = paths.gradient_shards()
    docs = data.read_tokenized(paths.tokens(shard))
    store = GradientStore(paths.train_gradients(shard))
    assert len(docs) == 5 and store.info["advantage_weighting"] == "grpo"
    by_text = {s: (r, i % 2) for i, (s, r) in enumerate(zip(SENTENCES, rewards))}
    model = load_model(spec.model)
    plain, _ = GradientCollector(model, spec.gradients).collect([(d.input_ids, d.loss_mask) for d in docs])
    for k, d in enumerate(docs):
        reward, group = by_text[d.text]
        mates = [r for r, g in by_text.values() if g == group and r == r]
        mean, std = np.mean(mates), np.std(mates, ddof=1)
        weight = (reward - mean) / (std + 1e-4) / d.targets
        np.testing.assert_allclose(store.array[k], plain[k] * weight, rtol=1e-5, atol=1e-6)
