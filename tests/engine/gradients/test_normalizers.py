"""Adam / Adafactor normalization against explicit formulas on full gradients."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.optimization import Adafactor

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import (
    AdafactorNormalizer,
    AdamNormalizer,
    load_optimizer_state,
    make_normalizer,
)
from attribution_assets.spec import GradientSpec

from .test_collector import assert_rows_close, doc_loss, make_docs, reference_row, tiny_neox

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model, optimizer, steps=3):
    for ids, mask in make_docs(seed=9)[:steps]:
        optimizer.zero_grad()
        doc_loss(model, ids, mask).backward()
        optimizer.step()
    return optimizer


def trainer_style_adamw(model):
    """Two groups like the Hugging Face Trainer: decayed weights first, then biases/norms."""
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )


def adam_v(opt, param):
    st = opt.state[param]
    return st["exp_avg_sq"].double() / (1 - opt.param_groups[0]["betas"][1] ** float(st["step"]))


def test_adam_matches_explicit_formula(tmp_path):
    model = tiny_neox()
    opt = train(model, trainer_style_adamw(model))
    params = dict(model.named_parameters())
    cfg = GradientSpec(projection_dim=4, include_bias=True, normalizer="adam")
    docs = make_docs((6, 10, 4))
    rows, info = GradientCollector(model, cfg, AdamNormalizer(opt, model)).collect(docs)
    assert info["normalizer"] == {"kind": "adam", "eps": 1e-8, "bias_correction": True}

    def explicit(name, grad):
        return grad / (adam_v(opt, params[f"{name}.weight"]) + 1e-8).sqrt()

    for i, (ids, mask) in enumerate(docs):
        expected = reference_row(model, ids, mask, info, project=explicit)
        # bias blocks: L (b / sqrt(v_b + eps)); compare the weight blocks and a bias block
        for m in info["modules"]:
            width = m["shape"][0] * m["shape"][1]
            assert_rows_close(
                rows[i, m["start"] : m["start"] + width], expected[m["start"] : m["start"] + width]
            )
    # the same state saved to optimizer.pt and as a Trainer checkpoint directory
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    for source in (tmp_path / "optimizer.pt", tmp_path):
        again, _ = GradientCollector(model, cfg, make_normalizer("adam", source, model)).collect(
            docs
        )
        assert again.tobytes() == rows.tobytes()


def test_adam_bias_block():
    model = tiny_neox()
    opt = train(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    cfg = GradientSpec(projection_dim=0, include_bias=True, include=("*dense",))
    ((ids, mask),) = make_docs((9,))
    rows, info = GradientCollector(model, cfg, AdamNormalizer(opt, model)).collect([(ids, mask)])
    m = info["modules"][0]
    model.zero_grad()
    doc_loss(model, ids, mask).backward()
    bias = model.get_submodule(m["name"]).bias
    expected = bias.grad.double() / (adam_v(opt, bias) + 1e-8).sqrt()
    assert_rows_close(rows[0, m["stop"] - m["shape"][0] : m["stop"]], expected.numpy())


def test_adafactor_matches_explicit_formula():
    model = tiny_neox()
    opt = train(
        model,
        Adafactor(
            model.parameters(),
            lr=1e-3,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        ),
    )
    params = dict(model.named_parameters())
    cfg = GradientSpec(projection_dim=4, normalizer="adafactor")
    docs = make_docs((7, 12))
    rows, info = GradientCollector(model, cfg, AdafactorNormalizer(opt, model)).collect(docs)

    def explicit(name, grad):
        st = opt.state[params[f"{name}.weight"]]
        r, c = st["exp_avg_sq_row"].double() + 1e-30, st["exp_avg_sq_col"].double() + 1e-30
        v_hat = torch.outer(r, c) / r.mean()
        return grad / v_hat.sqrt()

    for i, (ids, mask) in enumerate(docs):
        assert_rows_close(rows[i], reference_row(model, ids, mask, info, project=explicit))


def test_adafactor_from_adam_state():
    model = tiny_neox()
    opt = train(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    params = dict(model.named_parameters())
    cfg = GradientSpec(projection_dim=3, include=("*layers.1*",))
    docs = make_docs((8,))
    rows, info = GradientCollector(model, cfg, AdafactorNormalizer(opt, model)).collect(docs)

    def explicit(name, grad):
        v = adam_v(opt, params[f"{name}.weight"])
        r, c = v.mean(1) + 1e-30, v.mean(0) + 1e-30
        return grad / (torch.outer(r, c) / r.mean()).sqrt()

    assert_rows_close(rows[0], reference_row(model, *docs[0], info, project=explicit))


def test_mismatched_state_is_refused(tmp_path):
    model = tiny_neox()
    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )
    opt = train(other, torch.optim.Adam(other.parameters(), lr=1e-3), steps=1)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match=r"dense_h_to_4h.weight.*\[64, 32\].*\[48, 32\]"):
        load_optimizer_state(tmp_path / "optimizer.pt", model)
    with pytest.raises(ValueError, match="not in the model"):
        load_optimizer_state(opt, model)
    partial = train(model, torch.optim.Adam(model.gpt_neox.layers[0].parameters(), lr=1e-3), 1)
    with pytest.raises(ValueError, match="no 'exp_avg_sq' for parameter 'gpt_neox.layers.1"):
        GradientCollector(model, GradientSpec(), AdamNormalizer(partial, model))
    with pytest.raises(ValueError, match="holds 12 parameters, the model has 28"):
        torch.save(partial.state_dict(), tmp_path / "optimizer.pt")
        load_optimizer_state(tmp_path, model)
    with pytest.raises(FileNotFoundError):
        load_optimizer_state(tmp_path / "missing", model)
    with pytest.raises(ValueError, match="needs optimizer state"):
        GradientCollector(model, GradientSpec(normalizer="adam"))
