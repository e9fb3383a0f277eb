"""Tests of the demo tokenizer, model training and fact accuracy."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, GPTNeoXForCausalLM  # noqa: E402

from attribution_assets.engine.demo.corpus import generate_demo_corpus  # noqa: E402
from attribution_assets.engine.demo.model import (  # noqa: E402
    data_order,
    fact_accuracy,
    train_demo,
    train_demo_model,
    train_demo_tokenizer,
    weighted_lm_loss,
)
from attribution_assets.spec import DemoSpec  # noqa: E402

TINY = DemoSpec(epochs=4, batch_size=16, warmup_steps=5, log_every=10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return generate_demo_corpus(DemoSpec(people=8, train_templates_per_relation=3))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_demo_tokenizer([d["text"] for d in corpus.documents], vocab_size=400)


@pytest.fixture(scope="module")
def tiny_runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    metrics = [train_demo(corpus, root / f"run{i}", TINY, log=lambda _: None) for i in (0, 1)]
    return root, metrics


def test_tokenizer_round_trip_and_special_tokens(corpus, tokenizer):
    for text in [corpus.documents[0]["text"], corpus.queries[0]["text"], "Zebra 1987 ünïcode!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.model_max_length == 64


def test_tokenizer_deterministic_and_splits_at_answer(corpus, tokenizer):
    again = train_demo_tokenizer([d["text"] for d in corpus.documents], vocab_size=400)
    assert again.get_vocab() == tokenizer.get_vocab()
    prompt, completion = corpus.training_prompts[0]
    whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    parts = tokenizer([prompt, completion], add_special_tokens=False)["input_ids"]
    assert whole == parts[0] + parts[1]


def test_data_order_is_deterministic_epochs():
    config = DemoSpec(epochs=3, batch_size=4)
    batches = data_order(10, config)
    assert batches == data_order(10, config)
    assert len(batches) == 3 * math.ceil(10 / 4)
    assert sorted(i for b in batches[:3] for i in b) == list(range(10))
    # an explicit seed overrides config.seed (LDS retrains that change only the data order)
    assert data_order(10, config, seed=7) == data_order(10, dataclasses.replace(config, seed=7)) != batches


def test_weighted_loss_drops_zero_weight_documents():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)
    )
    assert torch.allclose(weighted_lm_loss(logits, ids, mask, torch.ones(2)), plain)
    first_only = weighted_lm_loss(logits[:1], ids[:1], mask[:1], torch.ones(1))
    assert torch.allclose(weighted_lm_loss(logits, ids, mask, torch.tensor([1.0, 0.0])), first_only)


def test_tiny_run_saves_everything(tiny_runs):
    root, metrics = tiny_runs
    out = root / "run0"
    assert (out / "model.safetensors").exists()
    state = torch.load(out / "optimizer.pt", weights_only=True)
    assert state["state"] and "exp_avg_sq" in state["state"][0]
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["epochs"] == TINY.epochs
    assert record["metrics"]["steps"] == metrics[0]["steps"]
    model = GPTNeoXForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_dropout == 0.0
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert sorted(p.name for p in root.iterdir()) == ["run0", "run1"]


def test_tiny_run_deterministic_and_learns(tiny_runs):
    root, metrics = tiny_runs
    first = load_file(root / "run0" / "model.safetensors")
    second = load_file(root / "run1" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert metrics[0]["final_loss"] < metrics[0]["first_loss"] - 1.0
    assert metrics[0]["final_loss"] == metrics[1]["final_loss"]
    assert 0.0 <= metrics[0]["heldout_phrasings_accuracy"] <= 1.0


def test_loss_weights(tokenizer, tmp_path):
    texts = ["Alice Varga was born in Lisbon.", "Boris Novak works for Orbitex."] * 2
    config = DemoSpec(epochs=2, batch_size=2, warmup_steps=1, log_every=100)
    silent = {"log": lambda _: None}
    plain = train_demo_model(tokenizer, texts, config, tmp_path / "a", **silent)
    ones = train_demo_model(
        tokenizer, texts, config, tmp_path / "b", loss_weights=[1.0] * 4, **silent
    )
    dropped = train_demo_model(
        tokenizer, texts, config, tmp_path / "a", loss_weights=[1.0, 0.0, 1.0, 0.0], **silent
    )
    assert plain == {**ones, "train_seconds": plain["train_seconds"]}
    assert dropped["steps"] == plain["steps"] and dropped["final_loss"] != plain["final_loss"]
    assert (plain["documents_with_weight"], dropped["documents_with_weight"]) == (4, 2)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["metrics"]["final_loss"] == dropped["final_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    with pytest.raises(ValueError):
        train_demo_model(tokenizer, texts, config, tmp_path / "d", loss_weights=[1.0], **silent)


class _BigramOracle(torch.nn.Module):
    """Predicts the next token from a fixed bigram table (for exact accuracy checks)."""

    def __init__(self, table: dict[int, int], vocab: int):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for t, token in enumerate(row):
                logits[b, t, self.table.get(token, 0)] = 1.0
        return SimpleNamespace(logits=logits)


def test_fact_accuracy_counts_exact_completions():
    texts = ["the apple tastes sweet", "the sky looks blue"] * 20
    tokenizer = train_demo_tokenizer(texts, vocab_size=300)
    table = {}
    for text in texts[:2]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        table.update(zip(ids[:-1], ids[1:]))
    model = _BigramOracle(table, len(tokenizer))
    right = [("the apple tastes", " sweet"), ("the sky looks", " blue")]
    wrong = [("the apple tastes", " blue"), ("the sky looks", " sweet")]
    assert fact_accuracy(model, tokenizer, right) == 1.0
    assert fact_accuracy(model, tokenizer, wrong) == 0.0
    assert fact_accuracy(model, tokenizer, right + wrong, batch_size=3) == 0.5


def test_fact_accuracy_after_memorising_two_facts(tokenizer, tmp_path):
    texts = ["Alice Varga was born in Lisbon.", "Boris Novak works for Orbitex."]
    config = DemoSpec(epochs=40, batch_size=2, warmup_steps=5, lr=5e-3, log_every=100)
    metrics = train_demo_model(
        tokenizer,
        texts,
        config,
        tmp_path / "m",
        log=lambda _: None,
        eval_pairs={
            "right": [
                ("Alice Varga was born in", " Lisbon"),
                ("Boris Novak works for", " Orbitex"),
            ],
            "wrong": [("Alice Varga was born in", " Orbitex")],
        },
    )
    assert metrics["right_accuracy"] == 1.0
    assert metrics["wrong_accuracy"] == 0.0
