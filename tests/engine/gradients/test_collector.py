"""Per-example gradients from hooks against naive per-document backward passes.

``ATTRIBUTION_TEST_DEVICE=cuda`` runs these models on a GPU (``benchmarks/gpu_check.sh``);
references are compared in float64 on the CPU."""

import os

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.projection import Projector
from attribution_assets.spec import GradientSpec

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = os.environ.get("ATTRIBUTION_TEST_DEVICE", "cpu")


def tiny_neox(seed: int = 0, device: str = "cpu") -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(cfg).float().to(device)


def make_docs(lengths=(5, 11, 8, 3, 14), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, 64, (n,), generator=gen).tolist()
        mask = [0] + [1] * (n - 1)
        if n > 4:
            mask[2] = 0  # a prompt token that is not a target
        docs.append((ids, mask))
    return docs


def doc_loss(model, ids, mask, only=None):
    """Sum of target-token NLL (or of token ``only`` alone) for one unpadded document."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
    weights = torch.tensor(mask[1:], dtype=nll.dtype)
    if only is not None:
        weights = torch.zeros_like(weights)
        weights[only - 1] = 1.0
    return (nll * weights).sum()


def naive_grads(model, ids, mask, modules, only=None):
    """``{name: (G [O, I] float64, bias grad or None)}`` from one plain backward pass."""
    model.eval()
    model.zero_grad()
    doc_loss(model, ids, mask, only).backward()
    out = {}
    for m in modules:
        mod = model.get_submodule(m["name"])
        weight = mod.weight.grad.double().cpu()
        bias = mod.bias.grad.double().cpu() if m["has_bias"] else None
        out[m["name"]] = (weight if isinstance(mod, torch.nn.Linear) else weight.T, bias)
    return out


def reference_row(model, ids, mask, info, project=None, only=None):
    """Expected row: ``L G R^T`` (or ``G``) per module, then ``L b`` (or ``b``)."""
    proj = Projector(
        info["projection"]["dim"],
        info["projection"]["kind"],
        info["projection"]["seed"],
        dtype=torch.float64,
    )
    parts = []
    for name, (weight, bias) in naive_grads(model, ids, mask, info["modules"], only).items():
        if project is not None:
            weight = project(name, weight)
        parts.append(proj.project(name, weight).flatten())
        if bias is not None:
            parts.append(proj.matrices(name, *weight.shape)[0] @ bias if proj.dim else bias)
    return torch.cat(parts).numpy()


def positional_reference(model, ids, mask, info, project=None):
    """Rows ``[last target, dims]`` of the positional split by plain autograd: each hooked
    module gets zero per-position weights ``E [T, O, I]`` and biases ``e [T, O]`` added at
    position ``t`` only, so ``d loss / d E_t = g_t a_tᵀ`` and ``d loss / d e_t = g_t``; row
    ``t`` is ``L (d E_t) Rᵀ`` per module (``d E_t`` unprojected), then ``L d e_t``."""
    model.eval()
    extra, handles = {}, []
    for m in info["modules"]:
        mod = model.get_submodule(m["name"])
        device = mod.weight.device
        e_w = torch.zeros(len(ids), mod.out_features, mod.in_features, device=device, requires_grad=True)
        e_b = torch.zeros(len(ids), mod.out_features, device=device, requires_grad=True)

        def hook(module, args, output, e_w=e_w, e_b=e_b):
            return output + (torch.einsum("ti,toi->to", args[0][0], e_w) + e_b)[None]

        handles.append(mod.register_forward_hook(hook))
        extra[m["name"]] = (e_w, e_b)
    try:
        grads = torch.autograd.grad(doc_loss(model, ids, mask), [t for p in extra.values() for t in p])
    finally:
        for h in handles:
            h.remove()
    proj = Projector(info["projection"]["dim"], info["projection"]["kind"], info["projection"]["seed"],
                     dtype=torch.float64)
    parts = []
    for k, m in enumerate(info["modules"]):
        weight, bias = grads[2 * k].double().cpu(), grads[2 * k + 1].double().cpu()
        if project is not None:
            weight = project(m["name"], weight)
        parts.append(proj.project(m["name"], weight).flatten(1))
        if m["has_bias"]:
            parts.append(bias @ proj.matrices(m["name"], *weight.shape[1:])[0].T if proj.dim else bias)
    last = max(t for t, v in enumerate(mask) if v)
    return torch.cat(parts, dim=1)[:last].numpy()


def assert_rows_close(actual, expected, rtol=1e-5):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("dim,bias", [(4, False), (0, False), (3, True), (0, True)])
def test_matches_naive_per_document(dim, bias):
    model, docs = tiny_neox(device=DEVICE), make_docs()
    cfg = GradientSpec(projection_dim=dim, include_bias=bias, max_tokens_per_batch=30)
    rows, info = GradientCollector(model, cfg).collect(docs)
    assert rows.shape == (len(docs), info["dims"]) and rows.dtype == np.float32
    for i, (ids, mask) in enumerate(docs):
        assert_rows_close(rows[i], reference_row(model, ids, mask, info))


def test_conv1d_layout_is_out_by_in():
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).float().to(DEVICE)
    docs = make_docs((6, 9))
    for dim in (0, 4):
        rows, info = GradientCollector(model, GradientSpec(projection_dim=dim)).collect(docs)
        assert "lm_head" not in [m["name"] for m in info["modules"]]
        attn = next(m for m in info["modules"] if m["name"].endswith("c_attn"))
        assert attn["shape"] == ([96, 32] if dim == 0 else [4, 4])
        for i, (ids, mask) in enumerate(docs):
            assert_rows_close(rows[i], reference_row(model, ids, mask, info))


def test_padding_does_not_change_gradients():
    model, docs = tiny_neox(device=DEVICE), make_docs()
    cfg = GradientSpec(projection_dim=8, max_tokens_per_batch=10_000)
    batched, _ = GradientCollector(model, cfg).collect(docs)
    for i in range(len(docs)):
        alone, _ = GradientCollector(model, cfg).collect([docs[i]])
        cos = float(alone[0] @ batched[i] / np.linalg.norm(alone[0]) / np.linalg.norm(batched[i]))
        assert cos >= 0.9999


def test_per_token_rows_sum_to_document_row():
    model, docs = tiny_neox(device=DEVICE), make_docs()
    base = GradientSpec(projection_dim=4, include_bias=True, max_tokens_per_batch=30)
    doc_rows, _ = GradientCollector(model, base).collect(docs)
    cfg = GradientSpec(
        projection_dim=4, include_bias=True, per_token=True, max_tokens_per_batch=30
    )
    tok_rows, info = GradientCollector(model, cfg).collect(docs)
    offsets = info["token_offsets"]
    assert info["per_token"] is True and info["per_token_mode"] == "loss"
    assert offsets == np.cumsum([0] + [sum(m) for _, m in docs]).tolist()
    assert len(info["token_positions"]) == tok_rows.shape[0]
    for i in range(len(docs)):
        assert_rows_close(tok_rows[offsets[i] : offsets[i + 1]].sum(0), doc_rows[i])
    ids, mask = docs[1]
    t = info["token_positions"][offsets[1] + 2]
    assert_rows_close(tok_rows[offsets[1] + 2], reference_row(model, ids, mask, info, only=t))


@pytest.mark.parametrize("dim,bias", [(4, True), (0, True), (3, False)])
def test_positional_rows_match_autograd_of_the_positional_split(dim, bias):
    model, docs = tiny_neox(device=DEVICE), make_docs()
    cfg = GradientSpec(projection_dim=dim, include_bias=bias, per_token="positional",
                       max_tokens_per_batch=30)
    rows, info = GradientCollector(model, cfg).collect(docs)
    doc_rows, _ = GradientCollector(model, GradientSpec(projection_dim=dim, include_bias=bias)).collect(docs)
    lasts = [max(t for t, v in enumerate(mask) if v) for _, mask in docs]
    offsets = info["token_offsets"]
    assert offsets == np.cumsum([0] + lasts).tolist() and info["per_token_mode"] == "positional"
    assert info["token_positions"] == [t for last in lasts for t in range(last)]
    for i, (ids, mask) in enumerate(docs):
        mine = rows[offsets[i] : offsets[i + 1]]
        assert_rows_close(mine, positional_reference(model, ids, mask, info))
        assert_rows_close(mine.sum(0), doc_rows[i])


def test_positional_rows_under_adam_normalization():
    from attribution_assets.engine.gradients.normalizers import AdamNormalizer

    model, docs = tiny_neox(device=DEVICE), make_docs((6, 9))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for ids, mask in make_docs(seed=9)[:2]:
        opt.zero_grad()
        doc_loss(model, ids, mask).backward()
        opt.step()
    params = dict(model.named_parameters())
    cfg = GradientSpec(projection_dim=4, normalizer="adam", per_token="positional")
    rows, info = GradientCollector(model, cfg, AdamNormalizer(opt, model)).collect(docs)

    def explicit(name, grad):
        st = opt.state[params[f"{name}.weight"]]
        v = st["exp_avg_sq"].double().cpu() / (1 - opt.param_groups[0]["betas"][1] ** float(st["step"]))
        return grad / (v + 1e-8).sqrt()

    offsets = info["token_offsets"]
    for i, (ids, mask) in enumerate(docs):
        expected = positional_reference(model, ids, mask, info, project=explicit)
        assert_rows_close(rows[offsets[i] : offsets[i + 1]], expected)


def test_module_selection_and_model_state_restored():
    model = tiny_neox(device=DEVICE)
    default = GradientCollector(model, GradientSpec()).module_layout
    names = [m["name"] for m in default]
    assert len(names) == 8 and not any("embed_out" in n for n in names)
    mlp = GradientCollector(model, GradientSpec(include=("*mlp*",), exclude=("*4h_to_h",)))
    assert [m["name"] for m in mlp.module_layout] == [
        "gpt_neox.layers.0.mlp.dense_h_to_4h",
        "gpt_neox.layers.1.mlp.dense_h_to_4h",
    ]
    model.train()
    mlp.collect(make_docs((4,)))
    assert model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D module matches.*query_key_value"):
        GradientCollector(model, GradientSpec(include=("*nothing*",)))


def test_hooked_collection_is_deterministic():
    model, docs = tiny_neox(device=DEVICE), make_docs()
    cfg = GradientSpec(projection_dim=4, max_tokens_per_batch=25)
    first, _ = GradientCollector(model, cfg).collect(docs)
    second, _ = GradientCollector(model, cfg).collect(docs)
    assert first.tobytes() == second.tobytes()


def test_invalid_documents():
    collector = GradientCollector(tiny_neox(device=DEVICE), GradientSpec())
    with pytest.raises(ValueError, match="loss_mask\\[0\\] must be 0"):
        collector.collect([([1, 2, 3], [1, 1, 1])])
    with pytest.raises(ValueError, match="3 input_ids but 2"):
        collector.collect([([1, 2, 3], [0, 1])])


@pytest.mark.parametrize("mode", ["none", "positional"])
def test_reduced_precision_and_autocast_rows_follow_float32(mode):
    """bfloat16 weights, float16 weights and bfloat16 autocast (float32 weights) all give
    float32 rows close to the float32 rows; products accumulate in float32."""
    docs = make_docs()
    cfg = GradientSpec(projection_dim=8, per_token=mode)
    reference, _ = GradientCollector(tiny_neox(device=DEVICE), cfg).collect(docs)
    runs = {"bfloat16": GradientCollector(tiny_neox(device=DEVICE).to(torch.bfloat16), cfg),
            "float16": GradientCollector(tiny_neox(device=DEVICE).to(torch.float16), cfg),
            "autocast": GradientCollector(tiny_neox(device=DEVICE), cfg, autocast=torch.bfloat16)}
    for name, collector in runs.items():
        rows, _ = collector.collect(docs)
        assert rows.dtype == np.float32 and np.isfinite(rows).all(), name
        cos = (rows * reference).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(reference, axis=1)
        assert cos.min() > 0.99, (name, cos.min())
        assert not np.array_equal(rows, reference), name  # it did run in reduced precision
