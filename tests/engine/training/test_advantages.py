"""GRPO / Dr. GRPO advantages and weights against hand computations, post hoc and in training."""

import math

import numpy as np
import pytest

from attribution_assets.engine.gradients.collect import collect
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.io import advantages
from attribution_assets.engine.io.data import (
    DataError,
    TokenizedDoc,
    build_documents,
    drop_nan_advantages,
)
from attribution_assets.engine.training.trainer import AdvantageTrainer
from attribution_assets.spec import DataSpec, GradientSpec, SpecValueError
from tests.engine.training.test_callback import assert_close, stored_rows, train

REWARDS = [1.0, 0.0, 0.5, 2.0]
GROUPS = ["a", "a", "b", "b"]
TEXTS = ["Mara Quill was born in Lisbon.", "Orbitex.",
         "Tomas Reyes works for Orbitex, which builds small satellites.", "Lisbon is a port."]


def hand_weights(weighting, targets):
    """GRPO: A = (r - mean) / (std_ddof1 + 1e-4), w = A / n; Dr. GRPO: A = r - mean, w = A."""
    out = []
    for i, r in enumerate(REWARDS):
        group = [REWARDS[j] for j in range(4) if GROUPS[j] == GROUPS[i]]
        mean = sum(group) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 1)
        out.append((r - mean) / (std + 1e-4) / targets[i] if weighting == "grpo" else r - mean)
    return np.array(out)


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(i) for i in ids}) == 4  # four different lengths
    return ids


@pytest.mark.parametrize("weighting", ["grpo", "dr_grpo"])
def test_weights_match_a_hand_computation(tokenized, weighting):
    targets = [len(i) - 1 for i in tokenized]
    adv = advantages.group_advantages(REWARDS, GROUPS, weighting)
    got = advantages.sequence_weights(adv, targets, weighting)
    np.testing.assert_allclose(got, hand_weights(weighting, targets), rtol=1e-12)


@pytest.mark.parametrize("weighting", ["grpo", "dr_grpo"])
def test_post_hoc_rows_are_weighted_document_rows(one_thread, tiny_model_dir, tokenized, weighting):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    records = [{"text": t, "reward": r, "group": g} for t, r, g in zip(TEXTS, REWARDS, GROUPS)]
    spec = DataSpec(reward_column="reward", group_column="group", advantage_weighting=weighting)
    docs = build_documents(records, spec)
    tok = [TokenizedDoc(d["doc_id"], i, [0] + [1] * (len(i) - 1), d["text"], advantage=d["advantage"])
           for d, i in zip(docs, tokenized)]
    gradients = GradientSpec(projection_dim=4)
    rows, info, _ = collect(GradientCollector(model, gradients), tok, weighting)
    plain, _ = GradientCollector(model, gradients).collect([(d.input_ids, d.loss_mask) for d in tok])
    weights = hand_weights(weighting, [len(i) - 1 for i in tokenized])
    assert_close(rows, plain * weights[:, None].astype(np.float32))
    assert info["advantage_weighting"] == weighting
    np.testing.assert_allclose(info["sequence_weights"], weights, rtol=1e-12)


@pytest.mark.parametrize("weighting", ["grpo", "dr_grpo"])
def test_callback_rows_under_an_advantage_weighted_loss(one_thread, tiny_model_dir, tokenized, tmp_path,
                                                         weighting):
    targets = [len(i) - 1 for i in tokenized]
    weights = hand_weights(weighting, targets)
    docs = [{"input_ids": i, "loss_mask": [0] + [1] * (len(i) - 1), "doc_index": k,
             "loss_weight": float(weights[k])} for k, i in enumerate(tokenized)]
    gradients = GradientSpec(projection_dim=4)
    model, callback, snaps = train(tiny_model_dir, docs, tmp_path, gradients, doc_weights=weights,
                                   trainer_cls=AdvantageTrainer)
    ids, steps, rows = stored_rows(callback)
    assert sorted(set(steps)) == [1, 2]
    for step in (1, 2):
        model.load_state_dict(snaps.params[step])
        picked = [i for i, s in enumerate(steps) if s == step]
        order = [int(ids[i][1:]) for i in picked]
        want, _ = GradientCollector(model, gradients).collect(
            [(docs[k]["input_ids"], docs[k]["loss_mask"]) for k in order])
        assert_close(rows[picked], want * weights[order, None].astype(np.float32))


def brute_force_advantages(rewards, groups, weighting):
    """Per group, in plain Python: mean and ddof-1 std of its finite rewards (0 for one)."""
    keys = groups if groups is not None else [""] * len(rewards)
    out = [math.nan] * len(rewards)
    for key in set(keys):
        members = [i for i, k in enumerate(keys) if k == key and math.isfinite(rewards[i])]
        if not members:
            continue
        values = [rewards[i] for i in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        for i in members:
            out[i] = rewards[i] - mean if weighting == "dr_grpo" else (rewards[i] - mean) / (std + 1e-4)
    return np.array(out)


@pytest.mark.parametrize("weighting", ["grpo", "dr_grpo"])
def test_group_advantages_equal_a_brute_force_reference(weighting):
    """Random group sizes (singletons included), shuffled, 5 % NaN and a few infinite rewards,
    constant groups (zero std), a group with no finite reward, and no groups at all."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, size=150)
    groups = [f"g{i}" for i in np.repeat(np.arange(len(sizes)), sizes)]
    rewards = rng.normal(size=len(groups)) * 3
    rewards[rng.random(len(groups)) < 0.05] = np.nan
    rewards[:3] = [np.inf, -np.inf, np.inf]
    groups += ["const"] * 4 + ["void"] * 2 + ["one"]
    rewards = np.concatenate([rewards, [0.5] * 4, [np.nan, np.inf], [2.5]])
    order = rng.permutation(len(groups))
    groups, rewards = [groups[i] for i in order], rewards[order]
    for keys in (groups, None):
        got = advantages.group_advantages(rewards.tolist(), keys, weighting)
        want = brute_force_advantages(rewards.tolist(), keys, weighting)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got = dict(zip(groups, advantages.group_advantages(rewards, groups, weighting)))
    assert got["one"] == 0.0 and got["const"] == 0.0 and np.isnan(got["void"])
    assert len(advantages.group_advantages([], [], weighting)) == 0
    with pytest.raises(advantages.AdvantageError, match="2 groups for 3 rewards"):
        advantages.group_advantages([1.0, 2.0, 3.0], ["a", "b"], weighting)


def test_nan_rewards_are_skipped_and_counted_or_rejected():
    records = [{"text": t, "reward": r, "group": "g"} for t, r in zip(TEXTS, [1.0, float("nan"), None, 3.0])]
    spec = DataSpec(reward_column="reward", group_column="group", advantage_weighting="dr_grpo")
    docs = build_documents(records, spec)
    assert [d["advantage"] for d in docs][0::3] == [-1.0, 1.0]  # the finite pair's own mean
    assert drop_nan_advantages(docs, spec) == 2 and len(docs) == 2
    strict = DataSpec(reward_column="reward", advantage_weighting="grpo", nan_rewards="error")
    with pytest.raises(DataError, match="nan_rewards: skip"):
        drop_nan_advantages(build_documents(records, strict), strict)


@pytest.mark.parametrize("kwargs,key", [
    ({"advantage_weighting": "grpo"}, "advantage_weighting"),
    ({"reward_column": "r"}, "advantage_weighting"),
    ({"group_column": "g", "advantage_column": "a", "advantage_weighting": "grpo"}, "group_column"),
    ({"reward_column": "r", "advantage_column": "a", "advantage_weighting": "grpo"}, "advantage_column"),
    ({"reward_column": "r", "advantage_weighting": "ppo"}, "advantage_weighting"),
    ({"reward_column": "r", "advantage_weighting": "grpo", "overflow": "chunk"}, "overflow"),
])
def test_advantage_settings_are_validated(kwargs, key):
    with pytest.raises(SpecValueError) as info:
        DataSpec(**kwargs)
    assert info.value.key == key
