"""Per-head gradient blocks (``gradients.split: head``) against slices of naive autograd gradients.

The expected slices are written from each architecture's forward pass in transformers, not
from ``heads.py``: GPT-NeoX views ``query_key_value``'s outputs as ``[H, 3 d]`` and chunks q, k,
v; GPT-2 splits ``c_attn``'s outputs into ``[q | k | v]`` and views each ``[H, d]``; Llama views
``q_proj`` as ``[H, d]`` and ``k_proj``/``v_proj`` as ``[KV, d]``; every output projection reads
head ``h``'s output at input columns ``[h d, (h+1) d)``.
"""

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import make_normalizer
from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.preconditioning.autocorrelation import normalize_layout
from attribution_assets.spec import GradientSpec, SpecValueError
from tests.engine.gradients.test_collector import doc_loss, make_docs

pytestmark = pytest.mark.usefixtures("one_thread")

H, D = 4, 8  # heads, head_dim (hidden 32)


def neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=64, hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H,
        intermediate_size=64, max_position_embeddings=64)).float()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=H * D, n_layer=2, n_head=H, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).float()


def llama_gqa(kv_heads=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H,
        num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=64,
        attention_bias=True)).float()


MODELS = {"gpt_neox": neox, "gpt2": gpt2, "llama_gqa": llama_gqa}


def head_slices(arch: str, leaf: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """``{(kind, head): (G slice, bias slice or None)}`` of one attention module's ``G [O, I]``."""
    out = {}
    if leaf in ("dense", "c_proj", "o_proj"):
        for h in range(H):
            out["o", h] = (weight[:, h * D:(h + 1) * D], None)
        return out
    if arch == "gpt_neox":
        w = weight.view(H, 3 * D, -1)
        b = bias.view(H, 3 * D) if bias is not None else None
        for h in range(H):
            for j, kind in enumerate("qkv"):
                out[kind, h] = (w[h, j * D:(j + 1) * D], b[h, j * D:(j + 1) * D] if b is not None else None)
    elif arch == "gpt2":
        for j, (kind, part) in enumerate(zip("qkv", weight.split(H * D, dim=0))):
            b = bias.split(H * D)[j].view(H, D) if bias is not None else None
            for h in range(H):
                out[kind, h] = (part.view(H, D, -1)[h], b[h] if b is not None else None)
    else:
        kind = leaf[0]
        n = weight.shape[0] // D
        for h in range(n):
            out[kind, h] = (weight.view(n, D, -1)[h], bias.view(n, D)[h] if bias is not None else None)
    return out


def naive_module_grads(model, ids, mask):
    """``{module: (G [O, I], bias grad)}`` float64 for every Linear/Conv1D, one backward pass."""
    model.eval()
    model.zero_grad()
    doc_loss(model, ids, mask).backward()
    grads = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "weight") and mod.weight is not None and mod.weight.grad is not None \
                and mod.weight.ndim == 2 and "embed" not in name and name not in ("lm_head", "embed_out") \
                and not name.endswith("wte") and not name.endswith("wpe"):
            w = mod.weight.grad.double()
            w = w if isinstance(mod, torch.nn.Linear) else w.T
            b = mod.bias.grad.double() if getattr(mod, "bias", None) is not None else None
            grads[name] = (w, b)
    return grads


def expected_parts(arch, model, ids, mask, layout):
    """``{entry name: (weight slice or None, bias slice or None)}`` from naive autograd."""
    grads = naive_module_grads(model, ids, mask)
    expected = {}
    for entry in layout:
        module = entry.get("module", entry["name"])
        weight, b = grads[module]
        b = b if entry["has_bias"] else None
        if entry.get("kind") is None:
            expected[entry["name"]] = (weight, b)
        elif entry["head"] is None:  # the output projection's bias block
            expected[entry["name"]] = (None, b)
        else:
            leaf = module.rsplit(".", 1)[-1]
            expected[entry["name"]] = head_slices(arch, leaf, weight, b)[entry["kind"], entry["head"]]
    return expected


def seeds(entry) -> tuple[str, str]:
    """Seed names of ``(L, R)``: row blocks own L, column blocks (kind o) own R."""
    module, name = entry.get("module", entry["name"]), entry["name"]
    if entry.get("kind") is None:
        return module, module
    return (module, name) if entry["kind"] == "o" else (name, module)


def assert_close(actual, expected, rtol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(np.abs(expected).max(), 1e-12))


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("bias", [False, True])
def test_unprojected_head_blocks_equal_slices_of_the_weight_gradient(arch, bias):
    model, docs = MODELS[arch](), make_docs((6, 11, 4))
    rows, info = GradientCollector(model, GradientSpec(projection_dim=0, split="head", include_bias=bias,
                                                      max_tokens_per_batch=20)).collect(docs)
    layout = info["modules"]
    normalize_layout(layout)  # contiguous, unique names: readable by the preconditioner
    kinds = {(e["kind"], e["head"]) for e in layout if e.get("kind")}
    kv = 2 if arch == "llama_gqa" else H
    assert {h for k, h in kinds if k == "q"} == set(range(H))
    assert {h for k, h in kinds if k in "kv"} == set(range(kv))
    assert {h for k, h in kinds if k == "o"} == set(range(H)) | ({None} if bias else set())
    assert {e["layer"] for e in layout if e.get("kind")} == {0, 1}
    for i, (ids, mask) in enumerate(docs):
        expected = expected_parts(arch, model, ids, mask, layout)
        for entry in layout:
            weight, b = expected[entry["name"]]
            parts = ([] if weight is None else [weight.flatten()]) + ([] if b is None else [b])
            assert_close(rows[i, entry["start"]:entry["stop"]], torch.cat(parts).numpy())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_projected_head_blocks_use_per_block_seeds(arch):
    """Row blocks: own L (block name) and the module's R; column blocks: the module's L, own R."""
    p, seed = 3, 7
    model, docs = MODELS[arch](), make_docs((7, 10))
    cfg = GradientSpec(projection_dim=p, seed=seed, split="head", include_bias=True)
    rows, info = GradientCollector(model, cfg).collect(docs)
    again, _ = GradientCollector(model, cfg).collect(docs)
    assert rows.tobytes() == again.tobytes()
    for i, (ids, mask) in enumerate(docs):
        expected = expected_parts(arch, model, ids, mask, info["modules"])
        for entry in info["modules"]:
            weight, b = expected[entry["name"]]
            left, right = seeds(entry)
            parts = []
            if weight is not None:
                lm = projection_matrix(seed, left, "out", p, weight.shape[0], dtype=torch.float64)
                rm = projection_matrix(seed, right, "in", p, weight.shape[1], dtype=torch.float64)
                parts.append((lm @ weight @ rm.T).flatten())
            if b is not None:
                parts.append(projection_matrix(seed, left, "out", p, b.shape[0], dtype=torch.float64) @ b)
            assert_close(rows[i, entry["start"]:entry["stop"]], torch.cat(parts).numpy())


def test_qkv_module_blocks_concatenate_to_the_module_block():
    """Unprojected q/k/v blocks follow the weight's rows, so they concatenate to the module's G."""
    model, docs = neox(), make_docs((6, 9))
    by_module, info_m = GradientCollector(model, GradientSpec(projection_dim=0)).collect(docs)
    by_head, info_h = GradientCollector(model, GradientSpec(projection_dim=0, split="head")).collect(docs)
    for entry in info_m["modules"]:
        if entry["name"].endswith("query_key_value"):
            blocks = [e for e in info_h["modules"] if e.get("module") == entry["name"]]
            assert len(blocks) == 3 * H
            cols = np.concatenate([np.arange(e["start"], e["stop"]) for e in blocks])
            np.testing.assert_array_equal(by_head[:, cols], by_module[:, entry["start"]:entry["stop"]])


@pytest.mark.parametrize("kind", ["adam", "adafactor"])
def test_normalized_head_blocks_equal_slices_of_normalized_gradients(kind):
    """Normalizers act on the whole module, then blocks are sliced (and projected)."""
    model, docs = llama_gqa(), make_docs((6, 9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    norm = make_normalizer(kind, opt, model)
    full, info_m = GradientCollector(model, GradientSpec(projection_dim=0, normalizer=kind), norm).collect(docs)
    p = 3
    heads, info_h = GradientCollector(model, GradientSpec(projection_dim=p, normalizer=kind, split="head"),
                                      norm).collect(docs)
    whole = {e["name"]: e for e in info_m["modules"]}
    for entry in info_h["modules"]:
        module = entry.get("module", entry["name"])
        m = whole[module]
        shape = m["shape"]
        g = torch.from_numpy(full[:, m["start"]:m["stop"]].astype(np.float64)).view(-1, *shape)
        if entry.get("kind") == "o":
            g = g[:, :, entry["head"] * D:(entry["head"] + 1) * D]
        elif entry.get("kind") is not None:
            g = g[:, entry["head"] * D:(entry["head"] + 1) * D]
        left, right = seeds(entry)
        lm = projection_matrix(0, left, "out", p, g.shape[1], dtype=torch.float64)
        rm = projection_matrix(0, right, "in", p, g.shape[2], dtype=torch.float64)
        assert_close(heads[:, entry["start"]:entry["stop"]], (lm @ g @ rm.T).flatten(1).numpy(), rtol=2e-5)


def test_split_errors_name_the_problem():
    with pytest.raises(SpecValueError, match="`split` is 'heads'.*choose one of \\['module', 'head'\\]"):
        GradientSpec(split="heads")
    with pytest.raises(ValueError, match="found no attention projection"):
        GradientCollector(neox(), GradientSpec(split="head", include=("*mlp*",)))
    model = neox()
    model.config.num_attention_heads = 3
    with pytest.raises(ValueError, match="query_key_value.*96 output rows.*3 heads"):
        GradientCollector(model, GradientSpec(split="head"))
    model = neox()
    model.config.model_type = "falcon"
    with pytest.raises(ValueError, match="does not know how the fused projection .*query_key_value"):
        GradientCollector(model, GradientSpec(split="head"))


def test_store_addresses_a_split_module_by_its_name(tmp_path):
    from attribution_assets.engine.gradients.store import write_store

    model, docs = gpt2(), make_docs((5, 8))
    rows, info = GradientCollector(model, GradientSpec(projection_dim=2, split="head")).collect(docs)
    store = write_store(tmp_path / "s", rows, info, doc_ids=["a", "b"], model_fingerprint="f")
    assert store.module_names[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    blocks = [m for m in info["modules"] if m.get("module") == "transformer.h.0.attn.c_attn"]
    assert [m["name"] for m in blocks[:2]] == ["transformer.h.0.attn.c_attn[q:0]", "transformer.h.0.attn.c_attn[q:1]"]
    assert store.module_slice("transformer.h.0.attn.c_attn") == slice(blocks[0]["start"], blocks[-1]["stop"])
    assert store.module_slice(blocks[1]["name"]) == slice(blocks[1]["start"], blocks[1]["stop"])
