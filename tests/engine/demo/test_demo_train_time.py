"""The demo's own training loop recording train-time rows (``DemoSpec.record_epochs``)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

from attribution_assets.engine.demo.corpus import generate_demo_corpus  # noqa: E402
from attribution_assets.engine.demo.model import (  # noqa: E402
    _encode_documents,
    _pad,
    data_order,
    gpt_neox_config,
    train_demo_model,
    train_demo_tokenizer,
    weighted_lm_loss,
)
from attribution_assets.engine.gradients.collector import GradientCollector  # noqa: E402
from attribution_assets.engine.gradients.normalizers import make_normalizer  # noqa: E402
from attribution_assets.engine.gradients.store import GradientStore  # noqa: E402
from attribution_assets.engine.io.paths import PipelinePaths  # noqa: E402
from attribution_assets.engine.training.stored_rows import training_tags  # noqa: E402
from attribution_assets.spec import DemoSpec, GradientSpec, SpecValueError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
GRADIENTS = GradientSpec(projection_dim=4, normalizer="adafactor")
SILENT = {"log": lambda _: None}


@pytest.fixture(scope="module")
def texts():
    corpus = generate_demo_corpus(DemoSpec(people=4, train_templates_per_relation=2))
    return [d["text"] for d in corpus.documents]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_demo_tokenizer(texts, vocab_size=400)


def config(epochs: int, record: int) -> DemoSpec:
    return DemoSpec(epochs=epochs, batch_size=8, warmup_steps=2, log_every=100, layers=1, hidden=32,
                    heads=2, intermediate=64, record_epochs=record)


def stores(model_dir) -> list[GradientStore]:
    return [GradientStore(p) for p in sorted(PipelinePaths.recorded_gradients(model_dir).iterdir())]


def test_recording_leaves_the_model_unchanged(tokenizer, texts, tmp_path):
    ids = [f"doc{i}" for i in range(len(texts))]
    weights = [0.0 if i % 5 == 0 else 1.0 for i in range(len(texts))]
    off = train_demo_model(tokenizer, texts, config(3, 0), tmp_path / "off", loss_weights=weights,
                           record=GRADIENTS, doc_ids=ids, **SILENT)
    on = train_demo_model(tokenizer, texts, config(3, 2), tmp_path / "on", loss_weights=weights,
                          record=GRADIENTS, doc_ids=ids, **SILENT)
    first, second = load_file(tmp_path / "off" / "model.safetensors"), load_file(tmp_path / "on" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert off["final_loss"] == on["final_loss"]
    assert not PipelinePaths.recorded_gradients(tmp_path / "off").exists()
    recorded = stores(tmp_path / "on")
    steps_per_epoch = len(data_order(len(texts), config(3, 2))) // 3
    assert [s.path.name for s in recorded] == [f"steps_{steps_per_epoch * e + 1:06d}-{steps_per_epoch * (e + 1):06d}"
                                               for e in (1, 2)]
    kept = [d for d, w in zip(ids, weights) if w]
    batches = data_order(len(texts), config(3, 2))
    for epoch, store in zip((1, 2), recorded):  # each weighted document once per epoch, weight 0 never
        assert sorted(store.doc_ids) == sorted(kept)
        steps, epochs = training_tags(store)
        for doc, step, tag in zip(store.doc_ids, steps, epochs):
            assert epoch * steps_per_epoch < step <= (epoch + 1) * steps_per_epoch
            assert ids.index(doc) in batches[step - 1] and tag == pytest.approx(step / steps_per_epoch)
    assert on["train_time_rows"] == 2 * len(kept)


def test_recorded_rows_equal_the_post_hoc_collector(tokenizer, texts, tmp_path):
    """One recorded epoch of a one-epoch run: the first step's rows equal the collector's rows
    at the seeded init, normalized by the AdamW state right after that step."""
    spec = config(1, 1)
    ids = [f"doc{i}" for i in range(len(texts))]
    train_demo_model(tokenizer, texts, spec, tmp_path / "m", record=GRADIENTS, doc_ids=ids, **SILENT)
    (store,) = stores(tmp_path / "m")
    steps, epochs = training_tags(store)
    picked = [i for i, s in enumerate(steps) if s == 1]
    batch = data_order(len(texts), spec)[0]
    assert [store.doc_ids[i] for i in picked] == [ids[i] for i in batch]
    assert epochs[picked[0]] == pytest.approx(1 / len(data_order(len(texts), spec)))

    encoded = _encode_documents(tokenizer, texts, spec.max_position_embeddings)
    torch.manual_seed(spec.seed)
    model = GPTNeoXForCausalLM(gpt_neox_config(spec, tokenizer)).float()
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    optimizer.param_groups[0]["lr"] = spec.lr / spec.warmup_steps  # the schedule's first step
    tokens, mask = _pad([encoded[i] for i in batch], tokenizer.pad_token_id)
    weighted_lm_loss(model(input_ids=tokens, attention_mask=mask).logits, tokens, mask,
                     torch.ones(len(batch))).backward()
    optimizer.step()
    normalizer = make_normalizer("adafactor", optimizer, model)
    want, _ = GradientCollector(before, GRADIENTS, normalizer=normalizer).collect(
        [(encoded[i], [0] + [1] * (len(encoded[i]) - 1)) for i in batch])
    got = np.asarray(store.array)[picked]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_record_epochs_is_validated():
    with pytest.raises(SpecValueError, match="record_epochs"):
        DemoSpec(epochs=2, record_epochs=3)
    with pytest.raises(SpecValueError, match="record_epochs"):
        DemoSpec(record_epochs=-1)
