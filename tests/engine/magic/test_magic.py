"""MAGIC: deterministic replay is bit-identical, and metagradients equal finite differences of
retraining with perturbed document weights (float64)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from attribution_assets.engine.magic.metagradients import (  # noqa: E402
    magic_scores,
    metagradient,
    sequence_loss,
)
from attribution_assets.engine.magic.training import (  # noqa: E402
    Objective,
    TrainingRun,
    checkpoint_steps,
    load_checkpoint,
    lr_factor,
    training_batches,
)
from attribution_assets.spec import MagicSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 5


class TinyLM(torch.nn.Module):
    """A causal LM with 35 parameters: logits_t = W tanh(E[x_t]) + b (a bigram model)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 3)
        self.head = torch.nn.Linear(3, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids)))


def tiny_docs():
    generator = torch.Generator().manual_seed(1)
    docs = []
    for i in range(7):
        ids = torch.randint(0, VOCAB, (3 + i % 3,), generator=generator).tolist()
        docs.append((ids, [0] + [1] * (len(ids) - 1)))
    return docs


QUERIES = [([1, 2, 3, 4], [0, 0, 1, 1]), ([4, 0, 2], [0, 1, 1])]


def spec(optimizer: str, **kwargs) -> MagicSpec:
    settings = {"adamw": dict(lr=0.05, schedule="cosine", weight_decay=0.1),
                "sgd": dict(lr=0.3, schedule="linear", momentum=0.9, weight_decay=0.05)}[optimizer]
    base = dict(optimizer=optimizer, warmup_steps=2, batch_size=3, epochs=3, seed=0,
                checkpoint_every=2, dtype="float64")
    return MagicSpec(**(base | settings | kwargs))


def tiny_run(magic: MagicSpec, tmp_path=None, weights=None, model=None) -> TrainingRun:
    model = (model or TinyLM()).double()
    path = None if tmp_path is None else (lambda step: tmp_path / f"step-{step:06d}.safetensors")
    return TrainingRun(Objective(model, tiny_docs()), magic, path, weights)


def final_query_loss(magic: MagicSpec, weights: torch.Tensor) -> float:
    run = tiny_run(magic, weights=weights)
    state, _ = run.train()
    params = {k[len("param/"):]: v for k, v in state.items() if k.startswith("param/")}
    return float(sequence_loss(run, QUERIES)(params))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_metagradient_equals_finite_differences(tmp_path, optimizer):
    magic = spec(optimizer)
    run = tiny_run(magic, tmp_path)
    final, metrics = run.train()
    assert metrics["steps"] == 9 and run.checkpoints == [0, 2, 4, 6, 8, 9]
    grad, stats = metagradient(run, sequence_loss(run, QUERIES), final)
    assert grad.dtype == torch.float64 and grad.shape == (7,)
    eps = 1e-5
    for i in range(7):
        plus, minus = torch.ones(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64)
        plus[i] += eps
        minus[i] -= eps
        fd = (final_query_loss(magic, plus) - final_query_loss(magic, minus)) / (2 * eps)
        assert abs(grad[i].item() - fd) <= 1e-3 * abs(fd) + 1e-9, (i, grad[i].item(), fd)
    assert grad.abs().max() > 1e-3  # the weights matter
    assert stats["query_loss"] == pytest.approx(final_query_loss(magic, torch.ones(7, dtype=torch.float64)))


def test_metagradient_at_zero_weights_matches_removal_direction(tmp_path):
    """At weights with a removed document (w_i = 0), the metagradient still equals the finite
    difference (MAGIC is exact at any weights, not only at w = 1)."""
    magic = spec("adamw")
    weights = torch.ones(7, dtype=torch.float64)
    weights[2] = 0.0
    run = tiny_run(magic, tmp_path, weights=weights)
    run.train()
    grad, _ = metagradient(run, sequence_loss(run, QUERIES[:1]))
    eps = 1e-5
    for i in (2, 5):
        plus, minus = weights.clone(), weights.clone()
        plus[i] += eps
        minus[i] -= eps
        loss = lambda w: float(sequence_loss(tiny_run(magic), QUERIES[:1])(  # noqa: E731
            {k[6:]: v for k, v in tiny_run(magic, weights=w).train()[0].items() if k.startswith("param/")}))
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        assert abs(grad[i].item() - fd) <= 1e-3 * abs(fd) + 1e-9


def test_scores_are_negative_metagradients_per_query(tmp_path):
    run = tiny_run(spec("sgd"), tmp_path)
    final, _ = run.train()
    scores, stats = magic_scores(run, QUERIES, final)
    assert scores.shape == (2, 7) and len(stats) == 2
    summed, _ = metagradient(run, sequence_loss(run, QUERIES), final)
    torch.testing.assert_close(torch.from_numpy(-scores.sum(axis=0)), summed, rtol=1e-9, atol=1e-12)


def tiny_gpt_neox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=12, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=16, hidden_dropout=0.0,
                           attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0)
    return GPTNeoXForCausalLM(config)


def lm_docs():
    generator = torch.Generator().manual_seed(2)
    docs = []
    for i in range(8):
        ids = torch.randint(1, 12, (4 + i % 4,), generator=generator).tolist()
        docs.append((ids, [0] + [1] * (len(ids) - 1)))
    return docs


def test_replay_is_bit_identical(tmp_path):
    run = TrainingRun(Objective(tiny_gpt_neox(), lm_docs()), spec("adamw", dtype="float32", batch_size=3),
                      lambda step: tmp_path / f"{step}.safetensors")
    final, _ = run.train()
    assert run.checkpoints == [0, 2, 4, 6, 8, 9]
    for start, stop in zip(run.checkpoints[:-1], run.checkpoints[1:]):
        replayed = run.replay(run.load(start), start, stop)
        stored, step = load_checkpoint(tmp_path / f"{stop}.safetensors")
        assert step == stop and replayed.keys() == stored.keys()
        assert all(torch.equal(replayed[k], stored[k]) for k in stored)
    assert all(torch.equal(final[k], run.load(run.total_steps)[k]) for k in final)
    assert any(not torch.equal(final[k], run.load(0)[k]) for k in final)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_gpt_neox_metagradient_equals_finite_differences(tmp_path, optimizer):
    """A 1-layer GPT-NeoX (attention, MLP, layer norms; float64): reverse mode through the
    Hugging Face model equals retraining with perturbed weights."""
    magic = spec(optimizer, batch_size=3, epochs=2, checkpoint_every=2)
    docs = lm_docs()
    query = [([3, 5, 7, 9, 2], [0, 0, 0, 1, 1])]

    def loss(weights=None, path=None):
        run = TrainingRun(Objective(tiny_gpt_neox().double(), docs), magic, path, weights)
        state, _ = run.train()
        return run, state, sequence_loss(run, query)

    run, final, f = loss(path=lambda step: tmp_path / f"{step}.safetensors")
    grad, _ = metagradient(run, f, final)
    eps = 1e-5
    for i in (0, 3, 6):
        plus, minus = torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
        plus[i] += eps
        minus[i] -= eps
        values = []
        for w in (plus, minus):
            r, state, g = loss(w)
            values.append(float(g({k[6:]: v for k, v in state.items() if k.startswith("param/")})))
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(grad[i].item() - fd) <= 1e-3 * abs(fd) + 1e-9, (i, grad[i].item(), fd)


def test_schedule_and_data_order():
    magic = spec("adamw", warmup_steps=2, schedule="linear")
    assert [lr_factor(t, 6, magic) for t in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cosine = spec("adamw", warmup_steps=0, schedule="cosine")
    assert lr_factor(0, 4, cosine) == 1.0 and lr_factor(2, 4, cosine) == pytest.approx(0.5)
    assert lr_factor(5, 6, spec("sgd", schedule="constant", warmup_steps=0)) == 1.0
    batches = training_batches(7, magic)
    assert len(batches) == 9 and batches == training_batches(7, magic)
    for epoch in range(3):
        assert sorted(i for b in batches[3 * epoch: 3 * epoch + 3] for i in b) == list(range(7))
    assert checkpoint_steps(9, 4) == [0, 4, 8, 9] and checkpoint_steps(8, 4) == [0, 4, 8]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="resolved"):
        TrainingRun(Objective(TinyLM(), tiny_docs()), MagicSpec())
    with pytest.raises(ValueError, match="one per document"):
        TrainingRun(Objective(TinyLM(), tiny_docs()), spec("sgd", dtype="float32"), weights=torch.ones(3))
    assert MagicSpec().resolved(None).lr == 3e-3
