"""Tail patch: one training step on top documents, against a hand-written step on a tiny model."""

import copy

import numpy as np
import pytest
import torch

from attribution_assets.engine.evaluation import tail_patch
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.models import load_model
from attribution_assets.spec import EvaluationSpec, ModelSpec, SpecValueError
from tests.helpers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_tokenizer):
    model = load_model(ModelSpec(name_or_path=str(tiny_model_dir)))
    docs = [TokenizedDoc(f"d{i}", ids, [0] + [1] * (len(ids) - 1), text)
            for i, text in enumerate(SENTENCES) for ids in [tiny_tokenizer(text)["input_ids"]]]
    queries = [TokenizedDoc(f"q{i}", d.input_ids, [0] * (len(d.input_ids) - 2) + [1, 1], d.text)
               for i, d in enumerate(docs[:3])]
    return model, docs, queries


def _log_p(model, query: TokenizedDoc) -> float:
    """Sum of log p of the query's target tokens, one unpadded sequence."""
    ids = torch.tensor([query.input_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return sum(float(log_probs[t - 1, query.input_ids[t]]) for t, m in enumerate(query.loss_mask) if m)


def _manual_step(model, docs, lr, denominators=None):
    """A copy of ``model`` after one hand-written step on ``docs``: mean token cross-entropy over
    the documents' target tokens, each document run alone (no padding)."""
    patched = copy.deepcopy(model)
    total, count = 0.0, 0
    for d in docs:
        logits = patched(input_ids=torch.tensor([d.input_ids])).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(d.input_ids[1:]), reduction="none")
        mask = torch.tensor(d.loss_mask[1:], dtype=torch.float32)
        total, count = total + (losses * mask).sum(), count + int(mask.sum())
    (total / count).backward()
    with torch.no_grad():
        for name, p in patched.named_parameters():
            p -= lr * (p.grad if denominators is None else p.grad / denominators[name])
    return patched


def test_sgd_increase_equals_hand_computed_step(setup):
    model, docs, queries = setup
    before = {n: p.clone() for n, p in model.named_parameters()}
    scores = np.array([[0.9, 0.1, 0.8, 0.0, 0.3, 0.2],   # top 2: d0, d2
                       [0.0, 0.5, 0.5, 0.9, 0.1, 0.1],   # d3, then the tie d1/d2 -> d1
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])  # d5, d4
    np.testing.assert_array_equal(tail_patch.top_k_indices(scores, 2), [[0, 2], [3, 1], [5, 4]])
    lr = 0.05
    patcher = tail_patch.TailPatcher(model, lr, "sgd")
    got = tail_patch.tail_patch_increases(patcher, docs, queries, scores, k=2)
    for q, top in enumerate([[0, 2], [3, 1], [5, 4]]):
        patched = _manual_step(model, [docs[i] for i in top], lr)
        expected = _log_p(patched, queries[q]) - _log_p(model, queries[q])
        assert got[q] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert abs(expected) > 1e-4  # the step does move the answer
    # the model itself is untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # a subset of rows: same numbers
    np.testing.assert_allclose(tail_patch.tail_patch_increases(patcher, docs, queries, scores, 2, rows=[2]),
                               got[2:], rtol=1e-6)


def test_training_on_the_query_itself_raises_it_and_lr_scales_it(setup):
    model, docs, queries = setup
    small = tail_patch.TailPatcher(model, 1e-3).increase([docs[0]], [queries[0]])
    large = tail_patch.TailPatcher(model, 2e-3).increase([docs[0]], [queries[0]])
    assert float(small[0]) > 0
    assert float(large[0]) == pytest.approx(2 * float(small[0]), rel=0.05)  # first order in lr


def test_adam_step_uses_the_stored_second_moments(setup, tmp_path):
    model, docs, queries = setup
    trained = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for d in docs[:3]:  # three real steps give a state with step = 3
        optimizer.zero_grad()
        trained(input_ids=torch.tensor([d.input_ids]), labels=torch.tensor([d.input_ids])).loss.backward()
        optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    denominators = {}
    for name, p in trained.named_parameters():
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.95 ** float(state["step"]))
        denominators[name] = v_hat.sqrt() + 1e-8
    lr = 1e-4
    patcher = tail_patch.TailPatcher(trained, lr, "adam", tmp_path / "optimizer.pt")
    got = float(patcher.increase([docs[4], docs[5]], [queries[1]])[0])
    patched = _manual_step(trained, [docs[4], docs[5]], lr, denominators)
    expected = _log_p(patched, queries[1]) - _log_p(trained, queries[1])
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-6) and abs(expected) > 1e-4


def test_settings_are_checked(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="one of"):
        tail_patch.TailPatcher(model, 0.1, "adafactor")
    with pytest.raises(ValueError, match="optimizer state"):
        tail_patch.TailPatcher(model, 0.1, "adam")
    with pytest.raises(SpecValueError, match="tail_patch_optimizer"):
        EvaluationSpec(tail_patch_optimizer="lion")
    with pytest.raises(SpecValueError, match="tail_patch_lr"):
        EvaluationSpec(tail_patch_lr=0)


def test_sample_rows():
    assert tail_patch.sample_rows(5, 0) == [0, 1, 2, 3, 4] == tail_patch.sample_rows(5, 9)
    rows = tail_patch.sample_rows(100, 10, seed=3)
    assert rows == sorted(set(rows)) and len(rows) == 10 and rows == tail_patch.sample_rows(100, 10, seed=3)
