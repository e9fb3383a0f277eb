"""EK-FAC / K-FAC with biases (a ones column on the input side, as Kronfluence does) and with
several label draws per document (``curvature.label_samples``), against hand computations on
the tiny float64 LM of ``test_kfac`` (whose three linears all have biases): per-token
activations and output gradients from an explicit forward, per-document ``[weight.grad |
bias.grad]`` from plain autograd, factors, eigenbases and dense solves built with NumPy."""

from pathlib import Path

import numpy as np
import pytest
import torch

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.projection import Projector, projection_matrix
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector, sample_labels
from attribution_assets.engine.preconditioning.kfac import KroneckerEigen, KroneckerPreconditioner
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.spec import GradientSpec, PipelineSpecError, ScoringSpec, spec_from_dict
from tests.engine.gradients.test_collector import make_docs as lm_docs
from tests.engine.gradients.test_heads import neox
from tests.engine.preconditioning.test_kfac import (
    MODULES,
    SEED,
    TinyLM,
    doc_labels,
    make_docs,
    pseudo_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BIASED = GradientSpec(projection_dim=0, include=("*",), exclude=(), include_bias=True)
P = 3
PROJECTED = {"dim": P, "kind": "rademacher", "seed": 0}
INFERENCE = ScoringSpec(metric="inner_product", preconditioner="none")


@pytest.fixture(scope="module")
def model():
    return TinyLM().double()


def _true(ids):
    return torch.tensor(ids[1:])


def _sampled(model, k=None, samples=None):
    """Label function of one document: the curvature pass's single draw, or draw ``k`` of
    ``samples``."""
    def labels(ids):
        if k is None:
            return doc_labels(model, ids)
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        return sample_labels(logp, ids, SEED, samples)[k]
    return labels


def token_stats(model, docs, labels):
    """Per module, per-token ``a`` with the ones column ``[N, I + 1]`` and ``g [N, O]``."""
    out = {m: ([], []) for m in MODULES}
    for ids, mask in docs:
        x, z_up, h, z_down, x2, logits = model.explicit(torch.tensor([ids]))
        grads = torch.autograd.grad(pseudo_loss(logits, ids, mask, labels(ids)), [z_up, z_down, logits])
        for name, a, g in zip(MODULES, (x, h, x2), grads):
            out[name][0].append(np.concatenate([a[0].detach().numpy(), np.ones((len(ids), 1))], 1))
            out[name][1].append(g[0].numpy())
    return {m: (np.concatenate(a), np.concatenate(g)) for m, (a, g) in out.items()}


def block_grads(model, docs, labels):
    """Per module ``[n, O, I + 1]``: ``[weight.grad | bias.grad]`` of each document's loss."""
    rows = {m: [] for m in MODULES}
    for ids, mask in docs:
        model.zero_grad()
        pseudo_loss(model(torch.tensor([ids])).logits, ids, mask, labels(ids)).backward()
        for m in MODULES:
            lin = getattr(model, m)
            rows[m].append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).numpy().copy())
    return {m: np.stack(r) for m, r in rows.items()}


def projections(name, out_features, in_features):
    """``L [p, O]`` and ``diag(R, 1)`` ``[p + 1, I + 1]``, float64."""
    left = projection_matrix(0, name, "out", P, out_features).double().numpy()
    right = projection_matrix(0, name, "in", P, in_features).double().numpy()
    return left, np.block([[right, np.zeros((P, 1))], [np.zeros((1, in_features)), np.ones((1, 1))]])


def projected(name, grads):
    """Row-major vec of ``L [G | b] diag(R, 1)ᵀ = [L G Rᵀ | L b]`` ``[n, p (p + 1)]``."""
    left, right = projections(name, grads.shape[1], grads.shape[2] - 1)
    return (left @ grads @ right.T).reshape(len(grads), -1)


def hand_inverse(a, g, grads, kind, damping, name=None):
    """``(F~ + lam I)^-1`` ``[O (I + 1)]^2`` (row-major vec of ``[G | b]``) by hand: factors with
    the ones column, ``np.linalg.eigh``, K-FAC's ``T e_S ⊗ e_A`` or EK-FAC's diagonal of the
    per-document Gauss-Newton in the eigenbasis, ``lam = damping * mean``; with ``name``, of the
    projected ``[L G Rᵀ | L b]`` (factors of ``diag(R, 1) [a; 1]`` and ``L g``)."""
    n, tokens = len(grads), len(a)
    vec = grads.reshape(n, -1)
    if name is not None:
        left, right = projections(name, g.shape[1], a.shape[1] - 1)
        a, g, vec = a @ right.T, g @ left.T, projected(name, grads)
    e_a, q_a = np.linalg.eigh(a.T @ a / tokens)
    e_s, q_s = np.linalg.eigh(g.T @ g / tokens)
    basis = np.kron(q_s, q_a)
    if kind == "kfac":
        curvature = tokens / n * np.kron(np.clip(e_s, 0, None), np.clip(e_a, 0, None))
    else:
        curvature = np.diag(basis.T @ (vec.T @ vec / n) @ basis)
    return (basis / (curvature + damping * curvature.mean())) @ basis.T


def fit(model, docs, kind, damping=0.1, projection=None, label_samples=1):
    curvature = CurvatureCollector(model, BIASED, "sampled", SEED, label_samples=label_samples)
    eigen = KroneckerEigen.from_covariance(curvature.covariance(docs), projection)
    correction = curvature.correction(docs, eigen) if kind == "ekfac" else None
    return curvature, KroneckerPreconditioner(eigen, correction, damping)


def split(vec, out_rows, cols):
    """``[n, out_rows * (cols + 1)]`` row-major ``[G | b]`` -> the store's ``[vec(G) | b]``."""
    full = vec.reshape(len(vec), out_rows, cols + 1)
    return np.concatenate([full[..., :cols].reshape(len(vec), -1), full[..., cols]], 1)


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_biased_factors_curvature_and_influence_equal_a_hand_computation(model, kind):
    docs, queries, train = make_docs(), make_docs(lengths=(4, 6, 3), seed=9), make_docs(seed=3)
    curvature, pre = fit(model, docs, kind, damping=0.2)
    covariance = curvature.covariance(docs)
    tokens = token_stats(model, docs, _sampled(model))
    grads = block_grads(model, docs, _sampled(model))
    g_q, g_t = block_grads(model, queries, _true), block_grads(model, train, _true)
    rows_q, info = GradientCollector(model, BIASED, transform=pre).collect(queries)
    rows_t, _ = GradientCollector(model, BIASED).collect(train)
    exact = 0.0
    for name in MODULES:
        a, g = tokens[name]
        assert pre.modules[name].bias and pre.curvature[name].shape == (g.shape[1], a.shape[1])
        for factor, x in zip(covariance.factors(name), (a, g)):  # A carries the ones column
            np.testing.assert_allclose(factor, x.T @ x / len(x), rtol=1e-10, atol=1e-14)
        inverse = hand_inverse(a, g, grads[name], kind, 0.2)
        vec_q = g_q[name].reshape(len(queries), -1)
        # the engine's float64 operator on [G | b] equals the dense solve
        weight, bias = pre.apply(name, torch.from_numpy(g_q[name][..., :-1]), torch.from_numpy(g_q[name][..., -1]))
        got = torch.cat([weight, bias[..., None]], -1).reshape(len(queries), -1).numpy()
        np.testing.assert_allclose(got, vec_q @ inverse, rtol=1e-8, atol=1e-10 * np.abs(got).max())
        # the collector's query rows: [vec(G') | b'], the training rows' layout
        m = next(m for m in info["modules"] if m["name"] == name)
        expected = split(vec_q @ inverse, *m["shape"])
        np.testing.assert_allclose(rows_q[:, m["start"]:m["stop"]], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())
        exact = exact + vec_q @ inverse @ g_t[name].reshape(len(train), -1).T
    influence = QueryScorer(rows_q, None, None, INFERENCE).score(rows_t)
    np.testing.assert_allclose(influence, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_biased_projected_space_keeps_the_ones_column_unprojected(model, kind):
    """The model reparametrized as ``W = W_0 + Lᵀ Θ R``, ``b = b_0 + Lᵀ β``: its block
    ``[L G Rᵀ | L b]`` is exactly the stored row, and EK-FAC / K-FAC of it is the hand computation."""
    docs, queries, train = make_docs(), make_docs(lengths=(4, 6), seed=9), make_docs(seed=3)
    _, pre = fit(model, docs, kind, projection=PROJECTED)
    tokens, grads = token_stats(model, docs, _sampled(model)), block_grads(model, docs, _sampled(model))
    g_q, g_t = block_grads(model, queries, _true), block_grads(model, train, _true)
    spec = GradientSpec(projection_dim=P, include=("*",), exclude=(), include_bias=True)
    rows_q, info = GradientCollector(model, spec, transform=pre).collect(queries)
    rows_t, _ = GradientCollector(model, spec).collect(train)
    exact = 0.0
    for name in MODULES:
        a, g = tokens[name]
        assert pre.curvature[name].shape == (P, P + 1)
        inverse = hand_inverse(a, g, grads[name], kind, 0.1, name=name)
        vec_q, vec_t = projected(name, g_q[name]), projected(name, g_t[name])
        m = next(m for m in info["modules"] if m["name"] == name)
        np.testing.assert_allclose(rows_t[:, m["start"]:m["stop"]], split(vec_t, P, P), rtol=1e-5,
                                   atol=1e-6 * np.abs(vec_t).max())  # the stored layout, by hand
        expected = split(vec_q @ inverse, P, P)
        np.testing.assert_allclose(rows_q[:, m["start"]:m["stop"]], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())
        exact = exact + vec_q @ inverse @ vec_t.T
    influence = QueryScorer(rows_q, None, None, INFERENCE).score(rows_t)
    np.testing.assert_allclose(influence, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_biased_full_space_preconditions_then_projects_weight_and_bias(model):
    docs, queries = make_docs(), make_docs(lengths=(4, 6, 3), seed=9)
    _, pre = fit(model, docs, "ekfac")
    tokens, grads = token_stats(model, docs, _sampled(model)), block_grads(model, docs, _sampled(model))
    g_q = block_grads(model, queries, _true)
    spec = GradientSpec(projection_dim=P, include=("*",), exclude=(), include_bias=True)
    rows, info = GradientCollector(model, spec, transform=pre).collect(queries)
    for m in info["modules"]:
        name, (a, g) = m["name"], tokens[m["name"]]
        inverse, vec_q = hand_inverse(a, g, grads[name], "ekfac", 0.1), g_q[name].reshape(len(queries), -1)
        full = (vec_q @ inverse).reshape(g_q[name].shape)
        left, right = projections(name, g.shape[1], a.shape[1] - 1)
        expected = np.concatenate([(left @ full[..., :-1] @ right[:P, :-1].T).reshape(len(queries), -1),
                                   full[..., -1] @ left.T], 1)
        np.testing.assert_allclose(rows[:, m["start"]:m["stop"]], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())


def test_biased_head_blocks_are_slices_of_the_preconditioned_module():
    """``split: head`` with a full-space transform and biases (GPT-NeoX, biased like the demo):
    each q/k/v head block is its rows of the preconditioned ``[G' | b']``, the output projection's
    bias its own block, all projected with the block's matrices."""
    net, docs = neox(), lm_docs((6, 9, 5))
    unsplit = GradientSpec(projection_dim=0, include_bias=True)
    curvature = CurvatureCollector(net, unsplit, "sampled", SEED)
    eigen = KroneckerEigen.from_covariance(curvature.covariance(docs))
    ekfac = KroneckerPreconditioner(eigen, curvature.correction(docs, eigen), damping=0.1)
    assert all(m.bias for m in eigen.modules)
    full, info = GradientCollector(net, unsplit, transform=ekfac).collect(docs)
    heads = GradientCollector(net, GradientSpec(projection_dim=P, split="head", include_bias=True), transform=ekfac)
    rows, _ = heads.collect(docs)
    projector = Projector(P, "rademacher", 0, "cpu", torch.float64)
    modules = {m["name"]: m for m in info["modules"]}
    checked = set()
    for s in heads.specs:
        m = modules[s.name]
        out, cols = m["shape"]
        weight = torch.from_numpy(full[:, m["start"]:m["start"] + out * cols]).double().reshape(len(docs), out, cols)
        bias = torch.from_numpy(full[:, m["start"] + out * cols:m["stop"]]).double()
        for b in s.blocks:
            left = projector.left(b.left, b.n_rows)
            parts = [] if b.cols is None else [
                (left @ weight[:, b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
                 @ projector.right(b.right, b.n_cols).T).reshape(len(docs), -1)]
            parts += [bias[:, b.rows[0]:b.rows[1]] @ left.T] if b.bias else []
            expected = torch.cat(parts, 1).numpy()
            np.testing.assert_allclose(rows[:, b.start:b.stop], expected, rtol=1e-3,
                                       atol=1e-4 * np.abs(expected).max())
            checked.add((b.kind, b.bias, b.cols is None))
    assert {("q", True, False), ("o", False, False), ("o", True, True)} <= checked


def test_label_samples_average_the_draws_exactly(model):
    """``label_samples = 3``: ``S`` and EK-FAC's eigenvalues are the means over the three draws
    (``sample_labels(..., samples=3)``, draw 0 the single draw of ``label_samples = 1``) of the
    hand-computed ones; ``A`` does not depend on the labels."""
    docs, n = make_docs(), 3
    curvature, pre = fit(model, docs, "ekfac", label_samples=n)
    covariance = curvature.covariance(docs)
    assert covariance.label_samples == pre.eigen.label_samples == n
    draws = [_sampled(model, k, n) for k in range(n)]
    assert torch.equal(draws[0](docs[0][0]), _sampled(model)(docs[0][0]))
    assert not all(torch.equal(draws[0](ids), draws[1](ids)) for ids, _ in docs)
    stats = [token_stats(model, docs, d) for d in draws]
    grads = [block_grads(model, docs, d) for d in draws]
    for name in MODULES:
        a = stats[0][name][0]
        np.testing.assert_allclose(covariance.factors(name)[0], a.T @ a / len(a), rtol=1e-10, atol=1e-14)
        s = np.mean([x[name][1].T @ x[name][1] / len(a) for x in stats], axis=0)
        np.testing.assert_allclose(covariance.factors(name)[1], s, rtol=1e-10, atol=1e-14)
        basis = np.kron(pre.eigen.gradient_vectors[name], pre.eigen.activation_vectors[name])
        diagonals = [np.diag(basis.T @ (v.T @ v / len(docs)) @ basis)
                     for v in (x[name].reshape(len(docs), -1) for x in grads)]
        np.testing.assert_allclose(pre.curvature[name].reshape(-1), np.mean(diagonals, axis=0), rtol=1e-9,
                                   atol=1e-14 * np.abs(diagonals).max())


def test_many_label_samples_converge_to_the_gauss_newton_expectation(model):
    """Sampled labels at the head, whose output gradient is ``p_t - e_y`` at target positions:
    ``E_y[g gᵀ] = diag(p_t) - p_t p_tᵀ`` and, labels independent across positions with
    ``E[g_t] = 0``, ``E[vec G vec Gᵀ] = sum_t (diag(p_t) - p_t p_tᵀ) ⊗ a_t a_tᵀ``. With 1,000 draws
    the factor ``S`` and EK-FAC's eigenvalues are within Monte Carlo error of these expectations,
    with one draw far from them."""
    docs = make_docs()
    cov_s, per_doc, n_tok = 0.0, 0.0, sum(len(ids) for ids, _ in docs)
    for ids, mask in docs:
        x, _, _, _, x2, logits = model.explicit(torch.tensor([ids]))
        p = torch.softmax(logits[0, :-1], -1).detach().numpy()
        a = np.concatenate([x2[0, :-1].detach().numpy(), np.ones((len(ids) - 1, 1))], 1)
        for t in np.flatnonzero(mask[1:]):
            expected = np.diag(p[t]) - np.outer(p[t], p[t])
            cov_s = cov_s + expected / n_tok
            per_doc = per_doc + np.kron(expected, np.outer(a[t], a[t])) / len(docs)
    errors = {}
    for n in (1, 1000):
        _, pre = fit(model, docs, "ekfac", label_samples=n)
        s = (pre.eigen.gradient_vectors["head"] * pre.eigen.gradient_values["head"]) @ pre.eigen.gradient_vectors["head"].T
        basis = np.kron(pre.eigen.gradient_vectors["head"], pre.eigen.activation_vectors["head"])
        c = np.diag(basis.T @ per_doc @ basis)
        errors[n] = (np.linalg.norm(s - cov_s) / np.linalg.norm(cov_s),
                     np.linalg.norm(pre.curvature["head"].reshape(-1) - c) / np.linalg.norm(c))
    assert max(errors[1000]) < 0.04 and min(errors[1]) > 8 * max(errors[1000]), errors  # 0.022 vs 0.39


def test_curvature_settings_are_validated():
    model = TinyLM().double()
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="label_samples must be an integer >= 1"):
            CurvatureCollector(model, BIASED, label_samples=bad)
    with pytest.raises(ValueError, match="labels='true' uses the documents' own tokens"):
        CurvatureCollector(model, BIASED, "true", label_samples=2)
    _, pre = fit(model, make_docs(), "kfac")
    with pytest.raises(ValueError, match="computed with its bias but the gradient has none"):
        pre.apply("up", torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match=r"factors have \('up', 5, 4, True\), the collector has \('up', 5, 4, "
                                         r"False\).*include_bias"):
        GradientCollector(model, GradientSpec(projection_dim=0, include=("*",), exclude=()), transform=pre)
    with pytest.raises(ValueError, match="label settings"):
        CurvatureCollector(model, BIASED, "sampled", SEED, label_samples=2).correction(make_docs(), pre.eigen)


def _pipeline(**sections):
    return {"name": "p", "model": {"name_or_path": "m"}, "corpus": {"path": "x"},
            "scoring": {"preconditioner": "ekfac"}, **sections}


@pytest.mark.parametrize("sections, message", [
    ({"curvature": {"label_samples": 0}}, r"`curvature.label_samples` must be an integer >= 1 \(label draws"),
    ({"curvature": {"label_samples": "4"}}, r"`curvature.label_samples` must be an integer >= 1.*got '4'"),
    ({"curvature": {"label_samples": 1.5}}, r"`curvature.label_samples` must be an integer >= 1"),
    ({"curvature": {"samples": 4}}, r"unknown key\(s\) `samples` \(did you mean `label_samples`\?\) in `curvature`"),
    ({"curvature": {"label_samples": 4}, "scoring": {"preconditioner": "kfac", "kfac_labels": "true"}},
     r"`curvature.label_samples` is 4, but `scoring.kfac_labels: true`.*set it to 1"),
])
def test_spec_refuses_bad_curvature_sections(sections, message):
    with pytest.raises(PipelineSpecError, match=message):
        spec_from_dict(_pipeline(**sections), "pipelines.yaml: pipelines[0]", Path("."))


def test_spec_accepts_biases_and_label_samples_with_kronecker_preconditioners():
    from attribution_assets.defs.kfac import curvature_version
    from attribution_assets.spec import spec_from_json, spec_to_json

    plain = spec_from_dict(_pipeline(), "here", Path("."))
    spec = spec_from_dict(_pipeline(gradients={"include_bias": True}, curvature={"label_samples": 4}), "here", Path("."))
    assert spec.gradients.include_bias and spec.curvature.label_samples == 4 and plain.curvature.label_samples == 1
    assert spec_from_json(spec_to_json(spec)) == spec
    versions = {curvature_version("v", s) for s in (plain, spec, spec_from_dict(
        _pipeline(gradients={"include_bias": True}), "here", Path(".")))}
    assert len(versions) == 3  # biases and label draws change what the curvature assets compute
