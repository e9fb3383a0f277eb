"""The Trainer callback's rows against the post-hoc collector and against hand computations."""

import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import OptimizerState, make_normalizer
from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.training.callback import AttributionCallback, AttributionCollator
from attribution_assets.engine.training.recorder import loss_scales
from attribution_assets.engine.training.stored_rows import train_time_document_rows, training_tags
from attribution_assets.spec import FinetuneSpec, GradientSpec, SpecValueError
from tests.helpers import SENTENCES

EXTRA = ["A short one.", "Lisbon and Orbitex and Norwood University, all in one long sentence here."]


class Snapshots(TrainerCallback):
    """The model's parameters before each optimizer step and the optimizer state after it."""

    def __init__(self):
        self.params, self.states = {}, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step + 1] = copy.deepcopy(model.state_dict())

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        live = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.states[state.global_step + 1] = {
            names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for p, st in live.state.items()}
        self.hyper = {names[id(p)]: g for g in live.param_groups for p in g["params"]}

    def optimizer_state(self, step):
        """The optimizer state right after ``step``, as the normalizers read it."""
        tensors = {n: {k: v for k, v in st.items() if torch.is_tensor(v)} for n, st in self.states[step].items()}
        return OptimizerState(tensors, self.hyper)


@pytest.fixture(scope="module")
def docs(tiny_tokenizer):
    ids = [tiny_tokenizer(s)["input_ids"] for s in SENTENCES + EXTRA]
    return [{"input_ids": i, "loss_mask": [0] + [1] * (len(i) - 1), "doc_index": k}
            for k, i in enumerate(ids)]


def train(model_dir, docs, tmp_path, gradients, *, batch=2, accumulation=2, mean_loss=False,
          optim="adamw_torch", doc_weights=None, trainer_cls=Trainer, steps_per_shard=100, dropout="step"):
    torch.manual_seed(0)
    model = model_dir if isinstance(model_dir, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, num_train_epochs=2, learning_rate=1e-2,
        lr_scheduler_type="constant", optim=optim, report_to=[], remove_unused_columns=False,
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    callback = AttributionCallback(gradients, [f"d{d['doc_index']}" for d in docs], tmp_path / "rows",
                                   doc_weights=doc_weights, steps_per_shard=steps_per_shard, dropout=dropout)
    snaps = Snapshots()
    trainer = trainer_cls(model=model, args=args, train_dataset=docs, data_collator=AttributionCollator(0),
                          callbacks=[callback, snaps])
    if mean_loss:  # the model returns a per-micro-batch token mean; the Trainer divides by the steps
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return model, callback, snaps


def stored_rows(callback):
    """``(doc_ids, steps, rows)`` over every written shard."""
    ids, steps, rows = [], [], []
    for path in callback.shards:
        store = GradientStore(path)
        ids += store.doc_ids
        steps += training_tags(store)[0]
        rows.append(np.asarray(store.array))
    return ids, steps, np.concatenate(rows)


def assert_close(got, want, tol=1e-5):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize("accumulation,mean_loss", [(2, False), (2, True), (1, False)])
def test_callback_rows_equal_the_post_hoc_collector(one_thread, tiny_model_dir, docs, tmp_path,
                                                     accumulation, mean_loss):
    gradients = GradientSpec(projection_dim=4)
    model, callback, snaps = train(tiny_model_dir, docs, tmp_path, gradients, batch=4 // accumulation,
                                   accumulation=accumulation, mean_loss=mean_loss)
    ids, steps, rows = stored_rows(callback)
    assert sorted(set(steps)) == [1, 2, 3, 4] and len(ids) == 2 * len(docs)  # 2 epochs x 2 steps
    assert sorted(ids) == sorted(f"d{d['doc_index']}" for d in docs for _ in range(2))
    for step in sorted(set(steps)):
        model.load_state_dict(snaps.params[step])
        picked = [i for i, s in enumerate(steps) if s == step]
        by_id = {f"d{d['doc_index']}": d for d in docs}
        want, _ = GradientCollector(model, gradients).collect(
            [(by_id[ids[i]]["input_ids"], by_id[ids[i]]["loss_mask"]) for i in picked])
        assert_close(rows[picked], want)


@pytest.mark.parametrize("mode,normalizer", [("off", "none"), ("step", "none"), ("off", "adam")])
def test_rows_with_dropout_off_equal_post_hoc_rows_and_with_step_masks_do_not(
        one_thread, tiny_model_dir, docs, tmp_path, mode, normalizer):
    """A model with dropout 0.2: ``off`` rows equal the post-hoc collector's (eval mode) at each
    step's parameters (with the Adam normalizer: and that step's optimizer state); ``step`` rows
    carry the step's masks, differ, and warn when recorded and when read back."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, hidden_dropout=0.2, attention_dropout=0.2)
    gradients = GradientSpec(projection_dim=4, normalizer=normalizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, callback, snaps = train(model, docs, tmp_path, gradients, dropout=mode)
    said = [str(w.message) for w in caught if "record_dropout: off" in str(w.message)]
    assert len(said) == (mode == "step")
    ids, steps, rows = stored_rows(callback)
    tags = GradientStore(callback.shards[0]).info["training"]
    assert (tags["dropout"], tags["model_dropout"]) == (mode, 0.2)
    by_id = {f"d{d['doc_index']}": d for d in docs}
    gap = 0.0
    for step in sorted(set(steps)):
        model.load_state_dict(snaps.params[step])
        picked = [i for i, s in enumerate(steps) if s == step]
        norm = make_normalizer(normalizer, snaps.optimizer_state(step), model)
        want, _ = GradientCollector(model, gradients, norm).collect(
            [(by_id[ids[i]]["input_ids"], by_id[ids[i]]["loss_mask"]) for i in picked])
        gap = max(gap, np.abs(rows[picked] - want).max() / np.abs(want).max())
    if mode == "off":
        assert gap <= 1e-6, gap
    else:
        assert gap > 0.05, gap
        with pytest.warns(UserWarning, match="dropout 0.2"):
            train_time_document_rows([GradientStore(p) for p in callback.shards], sorted(by_id))


def _hand_rows(model, doc, gradients, normalize):
    """Autograd of the document's summed token loss per hooked weight, normalized by
    ``normalize(name, G)``, projected ``L G Rᵀ``; modules in model order."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    weights = [model.get_submodule(n).weight for n in names]
    ids = torch.tensor([doc["input_ids"]])
    logits = model(input_ids=ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    grads = torch.autograd.grad(loss, weights)
    p = gradients.projection_dim
    out = []
    for name, g in zip(names, grads):
        g = normalize(f"{name}.weight", g)
        left = projection_matrix(gradients.seed, name, "out", p, g.shape[0])
        right = projection_matrix(gradients.seed, name, "in", p, g.shape[1])
        out.append((left @ g @ right.T).flatten())
    return torch.cat(out).detach().numpy()


@pytest.mark.parametrize("kind", ["adam", "adafactor"])
def test_normalization_uses_the_optimizer_state_of_that_step(one_thread, tiny_model_dir, docs,
                                                              tmp_path, kind):
    gradients = GradientSpec(projection_dim=4, normalizer=kind)
    optim = "adamw_torch" if kind == "adam" else "adafactor"
    model, callback, snaps = train(tiny_model_dir, docs, tmp_path, gradients, optim=optim)
    ids, steps, rows = stored_rows(callback)
    by_id = {f"d{d['doc_index']}": d for d in docs}
    for i in (0, len(ids) - 1):  # a row of the first step and one of the last
        step = steps[i]
        state, hyper = snaps.states[step], snaps.hyper

        def normalize(name, g, state=state, hyper=hyper):
            st = state[name]
            if kind == "adam":
                beta2 = hyper[name]["betas"][1]
                v = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
                return g / torch.sqrt(v + 1e-8)
            r, c = st["exp_avg_sq_row"] + 1e-30, st["exp_avg_sq_col"] + 1e-30
            return g * torch.sqrt(r.mean()) / torch.sqrt(r)[:, None] / torch.sqrt(c)[None, :]

        model.load_state_dict(snaps.params[step])
        assert_close(rows[i], _hand_rows(model, by_id[ids[i]], gradients, normalize), 1e-4)


def test_loss_scales_recover_per_document_factors():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[1, 3:] = -100
    labels[2, 1:] = -100  # no target: scale 0
    weights = torch.tensor([0.5, -2.0, 3.0])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                            reduction="none", ignore_index=-100)
    (nll.sum(1) * weights).sum().backward()
    got = loss_scales(logits.detach(), logits.grad, labels)
    torch.testing.assert_close(got, torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64))


def test_callback_refuses_dropped_columns(tiny_model_dir, docs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    callback = AttributionCallback(GradientSpec(projection_dim=4), ["a"], tmp_path / "rows")
    trainer = Trainer(model=model, args=args, train_dataset=docs, data_collator=AttributionCollator(0),
                      callbacks=[callback])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_loss_scales_refuse_per_token_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 6))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    (nll * torch.linspace(0.5, 2.0, 5)).sum().backward()  # later tokens weigh more
    with pytest.raises(ValueError, match="per-token loss weights"):
        loss_scales(logits.detach(), logits.grad, labels)


def test_loss_scales_of_memorized_tokens():
    """Targets at probability ~1 - 1e-7 (a memorized document): the target entry of the logits'
    gradient cancels to float32 noise, the other entries still give each factor."""
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (3, 6))
    logits = torch.randn(3, 6, 50)
    logits.scatter_add_(2, labels.roll(-1, 1)[..., None], torch.full((3, 6, 1), 20.0))
    logits.requires_grad_(True)
    weights = torch.tensor([1 / 700, -3.0, 0.25])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    (nll.sum(1) * weights).sum().backward()
    got = loss_scales(logits.detach(), logits.grad, labels)
    torch.testing.assert_close(got, weights.double(), rtol=1e-5, atol=0)


def test_record_dropout_setting():
    assert FinetuneSpec().record_dropout == "step"
    assert FinetuneSpec(record_dropout=False).record_dropout == "off"  # YAML's unquoted `off`
    with pytest.raises(SpecValueError, match="record_dropout"):
        FinetuneSpec(record_dropout="sometimes")
    with pytest.raises(ValueError, match="dropout must be one of"):
        AttributionCallback(GradientSpec(projection_dim=4), ["a"], "rows", dropout="eval")
