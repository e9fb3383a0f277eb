"""LoRA adapters (PEFT) and quantized base models: rows against naive autograd of the adapter."""

import numpy as np
import pytest
import torch

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import make_normalizer
from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.io.models import ModelLoadError, is_quantized, load_model
from attribution_assets.spec import GradientSpec, ModelSpec
from tests.engine.training.test_callback import assert_close, stored_rows, train
from tests.helpers import SENTENCES

peft = pytest.importorskip("peft")
LORA = GradientSpec(projection_dim=4, include=("*lora_A*", "*lora_B*"))


def _adapter(tmp_path_factory, model_dir):
    """A LoRA adapter with random (nonzero) A and B on q/k/v and the MLP input projection."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"],
                             lora_dropout=0.0, init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    peft.get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return _adapter(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny GPT-NeoX at hidden size 64: bitsandbytes' CPU 4-bit kernels need inputs of at
    least one quantization block (64)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-model")
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=128)).save_pretrained(path)
    return path


def _docs(tokenizer):
    return [(ids, [0] + [1] * (len(ids) - 1)) for ids in (tokenizer(s)["input_ids"] for s in SENTENCES[:4])]


def naive_adapter_rows(model, docs, gradients):
    """Per document: autograd of its summed token loss w.r.t. each lora_A/lora_B weight, ``L G Rᵀ``."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and ("lora_A" in n or "lora_B" in n)]
    assert named
    weights = [m.weight for _, m in named]
    for w in weights:
        w.requires_grad_(True)
    p, out = gradients.projection_dim, []
    for ids, _ in docs:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, weights)
        row = [(projection_matrix(gradients.seed, n, "out", p, g.shape[0]) @ g.float()
                @ projection_matrix(gradients.seed, n, "in", p, g.shape[1]).T).flatten()
               for (n, _), g in zip(named, grads)]
        out.append(torch.cat(row).detach().numpy())
    return np.stack(out)


def test_lora_rows_equal_autograd_of_the_adapter(one_thread, tiny_model_dir, adapter_dir, tiny_tokenizer):
    model = load_model(ModelSpec(name_or_path=str(tiny_model_dir), adapter=str(adapter_dir)))
    assert isinstance(model, peft.PeftModel)
    docs = _docs(tiny_tokenizer)
    collector = GradientCollector(model, LORA)
    assert collector.specs and all("lora_" in s.name for s in collector.specs)
    rows, _ = collector.collect(docs)
    assert_close(rows, naive_adapter_rows(model, docs, LORA))


def test_default_modules_of_a_peft_model_are_the_adapter(one_thread, tiny_model_dir, adapter_dir,
                                                         tiny_tokenizer):
    """Default ``include`` on a PEFT model: the 8 lora_A / lora_B modules (2 layers x 2 targets),
    not the 16 Linear modules a match-all glob finds (base layers, attention output, MLP
    output); rows equal those of the explicit adapter globs. Named globs still reach the base."""
    model = load_model(ModelSpec(name_or_path=str(tiny_model_dir), adapter=str(adapter_dir)))
    default = GradientCollector(model, GradientSpec(projection_dim=4))
    names = [s.name for s in default.specs]
    assert len(names) == 8 and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B") for n in names)
    assert names == [s.name for s in GradientCollector(model, LORA).specs]
    docs = _docs(tiny_tokenizer)
    np.testing.assert_array_equal(default.collect(docs)[0], GradientCollector(model, LORA).collect(docs)[0])
    base = GradientCollector(model, GradientSpec(projection_dim=4, include=("*base_layer",)))
    assert len(base.specs) == 4 and all(s.name.endswith("base_layer") for s in base.specs)
    plain = load_model(ModelSpec(name_or_path=str(tiny_model_dir)))
    assert len(GradientCollector(plain, GradientSpec(projection_dim=4)).specs) == 8  # 4 per layer


def test_callback_on_a_peft_model(one_thread, tiny_model_dir, adapter_dir, tiny_tokenizer, tmp_path):
    model = peft.PeftModel.from_pretrained(load_model(ModelSpec(name_or_path=str(tiny_model_dir))),
                                           str(adapter_dir), is_trainable=True)
    docs = [{"input_ids": i, "loss_mask": m, "doc_index": k} for k, (i, m) in enumerate(_docs(tiny_tokenizer))]
    gradients = GradientSpec(projection_dim=4, include=LORA.include, normalizer="adam")
    model, callback, snaps = train(model, docs, tmp_path, gradients)
    ids, steps, rows = stored_rows(callback)
    assert sorted(set(steps)) == [1, 2]
    for step in (1, 2):
        model.load_state_dict(snaps.params[step])
        state = snaps.optimizer_state(step)
        picked = [i for i, s in enumerate(steps) if s == step]
        order = [int(ids[i][1:]) for i in picked]
        collector = GradientCollector(model, gradients, make_normalizer("adam", state, model))
        want, _ = collector.collect([(docs[k]["input_ids"], docs[k]["loss_mask"]) for k in order])
        assert_close(rows[picked], want)


def test_unknown_adapter_directory_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_model(ModelSpec(name_or_path=str(tiny_model_dir), adapter=str(tmp_path)))


bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_loads_in_place_and_refuses_its_own_gradients(one_thread, wide_model_dir, bits):
    config = {f"load_in_{bits}bit": True, **({"bnb_4bit_compute_dtype": "float32"} if bits == 4 else {})}
    model = load_model(ModelSpec(name_or_path=str(wide_model_dir), model_kwargs={"quantization_config": config}))
    assert is_quantized(model)
    with pytest.raises(ValueError, match="quantized weights.*lora_A"):
        GradientCollector(model, GradientSpec(projection_dim=4))


def test_lora_on_a_4bit_base_equals_autograd(one_thread, wide_model_dir, tiny_tokenizer, tmp_path_factory):
    adapter = _adapter(tmp_path_factory, wide_model_dir)
    spec = ModelSpec(name_or_path=str(wide_model_dir), adapter=str(adapter),
                     model_kwargs={"quantization_config": {"load_in_4bit": True,
                                                           "bnb_4bit_compute_dtype": "float32"}})
    model = load_model(spec)
    assert is_quantized(model.get_base_model())
    docs = _docs(tiny_tokenizer)
    rows, _ = GradientCollector(model, LORA).collect(docs)
    assert_close(rows, naive_adapter_rows(model, docs, LORA), 1e-4)
