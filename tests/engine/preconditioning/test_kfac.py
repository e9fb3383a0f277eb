"""EK-FAC / K-FAC against ground truth computed by hand on models small enough that the full
Gauss-Newton (sampled-label Fisher) blocks fit in memory: explicit per-token activations and
output gradients, per-document gradients from plain autograd, dense solves (float64)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.projection import Projector, projection_matrix
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector, sample_labels
from attribution_assets.engine.preconditioning.kfac import (
    CorrectionSums,
    CovarianceSums,
    KroneckerEigen,
    KroneckerPreconditioner,
    merge_all,
)
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.spec import GradientSpec, ScoringSpec
from tests.engine.gradients.test_collector import make_docs as lm_docs
from tests.engine.gradients.test_heads import neox

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = GradientSpec(projection_dim=0, include=("*",), exclude=())
MODULES = ("up", "down", "head")
SEED = 7


class TinyLM(nn.Module):
    """Embedding -> causal running mean -> residual tanh MLP (``up``, ``down``) -> ``head``."""

    def __init__(self, vocab: int = 7, d: int = 4, h: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.up, self.down, self.head = nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.explicit(input_ids)[-1])

    def explicit(self, input_ids):
        """Every intermediate: ``(x, z_up, h, z_down, x2, logits)``."""
        e = self.embed(input_ids)
        x = e.cumsum(1) / torch.arange(1, e.shape[1] + 1, dtype=e.dtype)[None, :, None]
        z_up = self.up(x)
        h = torch.tanh(z_up)
        z_down = self.down(h)
        x2 = x + z_down
        return x, z_up, h, z_down, x2, self.head(x2)


def make_docs(lengths=(5, 3, 6, 4, 2, 6), vocab=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        mask = [0] + [1] * (n - 1)
        if n > 4:
            mask[1] = 0  # a prompt token that is not a target
        docs.append((ids, mask))
    return docs


def doc_labels(model, ids, seed=SEED, labels="sampled"):
    """The labels the curvature pass uses for one document (positions 0..n-2)."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    return torch.tensor(ids[1:]) if labels == "true" else sample_labels(logp, ids, seed)


def pseudo_loss(logits, ids, mask, targets):
    logp = torch.log_softmax(logits[0, :-1], -1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    return (nll * torch.tensor(mask[1:], dtype=nll.dtype)).sum()


def explicit_tokens(model, docs, labels="sampled"):
    """Per module, stacked per-token ``a [N, I]`` and ``g [N, O]`` from an explicit forward."""
    out = {m: ([], []) for m in MODULES}
    for ids, mask in docs:
        x, z_up, h, z_down, x2, logits = model.explicit(torch.tensor([ids]))
        loss = pseudo_loss(logits, ids, mask, doc_labels(model, ids, labels=labels))
        grads = torch.autograd.grad(loss, [z_up, z_down, logits])
        for name, a, g in zip(MODULES, (x, h, x2), grads):
            out[name][0].append(a[0].detach().numpy())
            out[name][1].append(g[0].numpy())
    return {m: (np.concatenate(a), np.concatenate(g)) for m, (a, g) in out.items()}


def document_gradients(model, docs, targets=None):
    """Per module ``[n_docs, O*I]``: vec (row-major) of ``weight.grad`` of each document's loss
    (sampled labels, or the document's own tokens when ``targets == "true"``)."""
    rows = {m: [] for m in MODULES}
    for ids, mask in docs:
        model.zero_grad()
        labels = doc_labels(model, ids, labels=targets or "sampled")
        pseudo_loss(model(torch.tensor([ids])).logits, ids, mask, labels).backward()
        for m in MODULES:
            rows[m].append(getattr(model, m).weight.grad.reshape(-1).numpy().copy())
    return {m: np.stack(r) for m, r in rows.items()}


@pytest.fixture(scope="module")
def model():
    return TinyLM().double()


@pytest.fixture(scope="module")
def fitted(model):
    docs = make_docs()
    collector = CurvatureCollector(model, ALL, "sampled", SEED)
    eigen = KroneckerEigen.from_covariance(collector.covariance(docs))
    return docs, collector, eigen, collector.correction(docs, eigen)


def basis(eigen, name):
    """``Q_S ⊗ Q_A``: the Kronecker eigenbasis in row-major vec order."""
    return np.kron(eigen.gradient_vectors[name], eigen.activation_vectors[name])


def test_factors_equal_explicit_token_covariances(model, fitted):
    docs, collector, _, _ = fitted
    covariance = collector.covariance(docs)
    tokens = explicit_tokens(model, docs)
    assert covariance.sequences == len(docs)
    for name, (a, g) in tokens.items():
        assert covariance.tokens[name] == len(a) == sum(len(ids) for ids, _ in docs)
        factor_a, factor_s = covariance.factors(name)
        np.testing.assert_allclose(factor_a, a.T @ a / len(a), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(factor_s, g.T @ g / len(g), rtol=1e-10, atol=1e-14)


def test_kfac_is_the_kronecker_approximation_and_preconditions_exactly(model, fitted):
    docs, _, eigen, _ = fitted
    tokens, query = explicit_tokens(model, docs), document_gradients(model, make_docs(seed=5)[:2], "true")
    kfac = KroneckerPreconditioner(eigen, None, damping=0.3)
    for name, (a, g) in tokens.items():
        per_doc = len(a) / len(docs)
        kron = per_doc * np.kron(g.T @ g / len(g), a.T @ a / len(a))  # T (S ⊗ A), vec row-major
        q = basis(eigen, name)
        np.testing.assert_allclose(q @ np.diag(kfac.curvature[name].reshape(-1)) @ q.T, kron,
                                   atol=1e-12 * np.abs(kron).max())
        damped = kron + 0.3 * np.trace(kron) / len(kron) * np.eye(len(kron))
        shape = kfac.curvature[name].shape
        got = kfac.apply_full(name, torch.from_numpy(query[name].reshape(-1, *shape))).reshape(len(query[name]), -1)
        np.testing.assert_allclose(got.numpy(), np.linalg.solve(damped, query[name].T).T, rtol=1e-8,
                                   atol=1e-10 * np.abs(got.numpy()).max())


def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_eigenbasis(model, fitted):
    docs, _, eigen, correction = fitted
    grads = document_gradients(model, docs)
    query = document_gradients(model, make_docs(seed=5)[:2], "true")
    ekfac = KroneckerPreconditioner(eigen, correction, damping=0.1)
    for name in MODULES:
        fisher = grads[name].T @ grads[name] / len(docs)  # the full GGN block (sampled labels)
        q = basis(eigen, name)
        expected = np.diag(q.T @ fisher @ q).reshape(ekfac.curvature[name].shape)
        np.testing.assert_allclose(ekfac.curvature[name], expected, rtol=1e-9, atol=1e-14 * fisher.max())
        curvature = q @ np.diag(expected.reshape(-1)) @ q.T
        damped = curvature + 0.1 * np.trace(fisher) / len(fisher) * np.eye(len(fisher))
        direct = np.linalg.solve(damped, query[name].T).T
        got = ekfac.apply_full(name, torch.from_numpy(query[name].reshape(-1, *expected.shape)))
        np.testing.assert_allclose(got.reshape(len(direct), -1).numpy(), direct, rtol=1e-5,
                                   atol=1e-8 * np.abs(direct).max())


def test_query_collector_preconditions_then_projects(model, fitted):
    _, _, eigen, correction = fitted
    ekfac = KroneckerPreconditioner(eigen, correction, damping=0.1)
    queries = make_docs(lengths=(4, 6, 3), seed=9)
    spec = GradientSpec(projection_dim=3, include=("*",), exclude=(), max_tokens_per_batch=8)
    collector = GradientCollector(model, spec, transform=ekfac)
    rows, info = collector.collect(queries)
    grads = document_gradients(model, queries, "true")
    for m in info["modules"]:
        shape = ekfac.curvature[m["name"]].shape
        full = ekfac.apply_full(m["name"], torch.from_numpy(grads[m["name"]].reshape(-1, *shape)))
        left = projection_matrix(0, m["name"], "out", 3, shape[0]).double()
        right = projection_matrix(0, m["name"], "in", 3, shape[1]).double()
        expected = (left @ full @ right.T).reshape(len(queries), -1).numpy()
        np.testing.assert_allclose(rows[:, m["start"]:m["stop"]], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())


def test_projected_space_is_ekfac_of_the_projected_rows(model, fitted):
    docs, collector, _, _ = fitted
    projection = {"dim": 3, "kind": "rademacher", "seed": 0}
    eigen = KroneckerEigen.from_covariance(collector.covariance(docs), projection)
    ekfac = KroneckerPreconditioner(eigen, collector.correction(docs, eigen), damping=0.1)
    tokens, grads = explicit_tokens(model, docs), document_gradients(model, docs)
    queries = make_docs(lengths=(4, 6), seed=9)
    query = document_gradients(model, queries, "true")
    spec = GradientSpec(projection_dim=3, include=("*",), exclude=())
    rows, info = GradientCollector(model, spec, transform=ekfac).collect(queries)
    for m in info["modules"]:
        name, (a, g) = m["name"], tokens[m["name"]]
        left = projection_matrix(0, name, "out", 3, g.shape[1]).double().numpy()
        right = projection_matrix(0, name, "in", 3, a.shape[1]).double().numpy()
        for vals, vecs, x in ((eigen.activation_values, eigen.activation_vectors, a @ right.T),
                              (eigen.gradient_values, eigen.gradient_vectors, g @ left.T)):
            np.testing.assert_allclose((vecs[name] * vals[name]) @ vecs[name].T, x.T @ x / len(x), rtol=1e-9,
                                       atol=1e-13 * np.abs(x).max() ** 2)
        def projected(full, left=left, right=right):  # vec(L G R^T) per row of vec(G)
            return np.stack([(left @ G.reshape(left.shape[1], right.shape[1]) @ right.T).reshape(-1) for G in full])

        rows_n = projected(grads[name])
        fisher = rows_n.T @ rows_n / len(docs)  # the Gauss-Newton of the projected parametrization
        q = basis(eigen, name)
        assert ekfac.curvature[name].shape == (3, 3)
        np.testing.assert_allclose(ekfac.curvature[name].reshape(-1), np.diag(q.T @ fisher @ q), rtol=1e-9,
                                   atol=1e-14 * fisher.max())
        damped = q @ np.diag(ekfac.curvature[name].reshape(-1)) @ q.T + ekfac.shift(name) * np.eye(9)
        expected = np.linalg.solve(damped, projected(query[name]).T).T
        np.testing.assert_allclose(rows[:, m["start"]:m["stop"]], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="live in the projection"):
        GradientCollector(model, GradientSpec(projection_dim=2, include=("*",), exclude=()), transform=ekfac)


class LinearClassifier(nn.Module):
    """One hooked layer: fixed input embeddings ``a(x)`` -> ``head`` (logits over the vocabulary)."""

    def __init__(self, embeddings: torch.Tensor, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = embeddings.double()
        self.head = nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False).double()

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.embeddings[input_ids]))


# Two cases where the Kronecker factorization of the Gauss-Newton matrix is exact, each with one
# training sequence per class ``[x, y]``: two classes (every pseudo-gradient p - e_y is parallel to
# (1, -1)) with orthogonal inputs of distinct norms (A diagonal, its eigenbasis the inputs'), and
# five classes with a constant one-dimensional input (A a scalar).
EXACT_CASES = {"two classes": (torch.diag(torch.tensor([1.0, 2.0])), [[0, 1], [1, 0]]),
               "five classes": (torch.ones(5, 1), [[c, (c + 1) % 5] for c in range(5)])}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_ekfac_influence_equals_exact_damped_inverse_gauss_newton(case):
    embeddings, sequences = EXACT_CASES[case]
    model = LinearClassifier(embeddings)
    spec = GradientSpec(projection_dim=0, include=("head",), exclude=())
    docs = [(ids, [0, 1]) for ids in sequences]
    collector = CurvatureCollector(model, spec, "sampled", SEED)
    eigen = KroneckerEigen.from_covariance(collector.covariance(docs))
    ekfac = KroneckerPreconditioner(eigen, collector.correction(docs, eigen), damping=0.05)
    # brute force: the Gauss-Newton (sampled-label Fisher) matrix from per-sequence gradients
    grads = np.stack([_head_grad(model, ids, doc_labels(model, ids)) for ids in sequences])
    fisher = grads.T @ grads / len(docs)
    q = basis(eigen, "head")
    np.testing.assert_allclose(q @ np.diag(ekfac.curvature["head"].reshape(-1)) @ q.T, fisher,
                               atol=1e-12 * fisher.max())  # the factorization is exact here
    damped = fisher + 0.05 * np.trace(fisher) / len(fisher) * np.eye(len(fisher))
    vocab = embeddings.shape[0]
    queries = [[c, (c + 2) % vocab] for c in range(vocab)]
    train = [[c, d] for c in range(vocab) for d in range(vocab)]
    g_q = np.stack([_head_grad(model, ids, torch.tensor(ids[1:])) for ids in queries])
    g_t = np.stack([_head_grad(model, ids, torch.tensor(ids[1:])) for ids in train])
    exact = g_q @ np.linalg.solve(damped, g_t.T)
    scoring = ScoringSpec(metric="inner_product", preconditioner="none")
    prepared = GradientCollector(model, spec, transform=ekfac).collect([(ids, [0, 1]) for ids in queries])[0]
    rows = GradientCollector(model, spec).collect([(ids, [0, 1]) for ids in train])[0]
    influence = QueryScorer(prepared, None, None, scoring).score(rows)
    np.testing.assert_allclose(influence, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    if case == "five classes":  # a scalar A: K-FAC is exact too
        kfac = KroneckerPreconditioner(eigen, None, damping=0.05)
        prepared = GradientCollector(model, spec, transform=kfac).collect([(ids, [0, 1]) for ids in queries])[0]
        np.testing.assert_allclose(QueryScorer(prepared, None, None, scoring).score(rows), exact, rtol=1e-5,
                                   atol=1e-5 * np.abs(exact).max())


def _head_grad(model, ids, targets):
    model.zero_grad()
    pseudo_loss(model(torch.tensor([ids])).logits, ids, [0, 1], targets).backward()
    return model.head.weight.grad.reshape(-1).numpy().copy()


def test_sampled_labels_are_deterministic_and_follow_the_model():
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0, 1.0]]).double(), -1)
    draws = torch.stack([sample_labels(logp, [i, 3, 1], seed=0)[0] for i in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    np.testing.assert_allclose(freq.numpy(), logp.exp()[0].numpy(), atol=0.03)
    assert torch.equal(sample_labels(logp.repeat(3, 1), [5, 6, 7, 8], 1),
                       sample_labels(logp.repeat(3, 1), [5, 6, 7, 8], 1))
    assert not all(torch.equal(sample_labels(logp.repeat(8, 1), [5, 6], 1), sample_labels(logp.repeat(8, 1),
                                                                                          [5, 6], s))
                   for s in (2, 3, 4))


def test_batching_never_changes_the_sums_and_shards_merge(model, fitted, tmp_path):
    docs, collector, eigen, correction = fitted
    small = CurvatureCollector(model, GradientSpec(projection_dim=0, include=("*",), exclude=(),
                                                   max_tokens_per_batch=6), "sampled", SEED)
    parts = [small.covariance(docs[:2]), small.covariance(docs[2:])]
    for i, part in enumerate(parts):
        part.save(tmp_path / f"cov-{i}")
    merged = merge_all((CovarianceSums.load(tmp_path / f"cov-{i}") for i in range(2)), "covariance")
    whole = collector.covariance(docs)
    assert merged.sequences == whole.sequences and merged.tokens == whole.tokens
    for name in MODULES:
        for x, y in zip(merged.factors(name), whole.factors(name)):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-16)
    eigen.save(tmp_path / "eigen")
    loaded = KroneckerEigen.load(tmp_path / "eigen")
    assert loaded.digest() == eigen.digest() and loaded.tokens_per_sequence == eigen.tokens_per_sequence
    halves = [small.correction(docs[:3], loaded), small.correction(docs[3:], loaded)]
    halves[0].save(tmp_path / "corr")
    joined = CorrectionSums.load(tmp_path / "corr").merge(halves[1])
    for name in MODULES:
        np.testing.assert_allclose(joined.curvature(name), correction.curvature(name), rtol=1e-12, atol=1e-18)


def test_true_labels_use_the_documents_tokens(model):
    docs = make_docs()
    covariance = CurvatureCollector(model, ALL, "true").covariance(docs)
    for name, (_, g) in explicit_tokens(model, docs, labels="true").items():
        np.testing.assert_allclose(covariance.factors(name)[1], g.T @ g / len(g), rtol=1e-10, atol=1e-14)


def test_mismatches_and_bad_curvature_are_refused(model, fitted):
    docs, collector, eigen, correction = fitted
    other = CurvatureCollector(model, ALL, "true").covariance(docs)
    with pytest.raises(ValueError, match="label settings differ"):
        collector.covariance(docs).merge(other)
    stale = CorrectionSums(correction.modules, correction.squares, correction.sequences, "0" * 16)
    with pytest.raises(ValueError, match="another eigenbasis"):
        KroneckerPreconditioner(eigen, stale)
    with pytest.raises(ValueError, match="factors have"):
        GradientCollector(model, GradientSpec(projection_dim=2, include=("up", "head"), exclude=()),
                          transform=KroneckerPreconditioner(eigen, correction))
    with pytest.raises(ValueError, match=r"the collector has \('up', 5, 4, True\).*include_bias"):
        GradientCollector(model, GradientSpec(include=("*",), exclude=(), include_bias=True),
                          transform=KroneckerPreconditioner(eigen, correction))  # factors without biases
    zero = CorrectionSums(correction.modules, {k: np.zeros_like(v) for k, v in correction.squares.items()},
                          correction.sequences, correction.eigen_digest)
    assert KroneckerPreconditioner(eigen, zero, damping=0.1).report()["ok"]  # mean 0 -> shift = damping
    assert not KroneckerPreconditioner(eigen, zero, damping=0.0).report()["ok"]
    broken = {k: v.copy() for k, v in correction.squares.items()}
    broken["down"][0, 0] = np.nan
    report = KroneckerPreconditioner(eigen, CorrectionSums(correction.modules, broken, correction.sequences,
                                                           correction.eigen_digest)).report()
    assert not report["ok"] and not report["modules"]["down"]["finite"] and report["modules"]["up"]["positive"]


def _per_module(rows, info, fn):
    """``rows`` with ``fn(name, block [n, p, p]) -> [n, p, p]`` applied to each module's columns."""
    out = rows.copy()
    for m in info["modules"]:
        block = torch.from_numpy(rows[:, m["start"]:m["stop"]].reshape(len(rows), *m["shape"]))
        out[:, m["start"]:m["stop"]] = fn(m["name"], block.double()).reshape(len(rows), -1).numpy()
    return out


@pytest.mark.parametrize("per_token", ["none", "positional", "loss"])
def test_projected_transform_preconditions_every_per_token_mode(model, fitted, per_token):
    """Per-document and per-token rows alike: the transformed rows are the collector's own rows
    (checked against autograd in tests/engine/gradients) preconditioned block by block."""
    docs, collector, _, _ = fitted
    eigen = KroneckerEigen.from_covariance(collector.covariance(docs), {"dim": 3, "kind": "rademacher", "seed": 0})
    ekfac = KroneckerPreconditioner(eigen, collector.correction(docs, eigen), damping=0.1)
    spec = GradientSpec(projection_dim=3, include=("*",), exclude=(), per_token=per_token, max_tokens_per_batch=12)
    queries = make_docs(lengths=(4, 6, 3), seed=9)
    plain, info = GradientCollector(model, spec).collect(queries)
    rows, info_t = GradientCollector(model, spec, transform=ekfac).collect(queries)
    assert info_t["rows"] == info["rows"] == (len(queries) if per_token == "none" else len(rows))
    expected = _per_module(plain, info, ekfac.apply_full)
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_full_space_transform_with_head_blocks():
    """``split: head`` with ``kfac_space: full``: each head block is its slice of the
    preconditioned full gradient, projected with the block's own L and R; a projected-space
    transform refuses head blocks."""
    net, docs = neox(), lm_docs((6, 9, 5))
    curvature = CurvatureCollector(net, GradientSpec(projection_dim=0), "sampled", SEED)
    eigen = KroneckerEigen.from_covariance(curvature.covariance(docs))
    ekfac = KroneckerPreconditioner(eigen, curvature.correction(docs, eigen), damping=0.1)
    full, info = GradientCollector(net, GradientSpec(projection_dim=0)).collect(docs)
    preconditioned = _per_module(full, info, ekfac.apply_full)
    p = 3
    heads = GradientCollector(net, GradientSpec(projection_dim=p, split="head"), transform=ekfac)
    rows, _ = heads.collect(docs)
    projector = Projector(p, "rademacher", 0, "cpu", torch.float64)
    starts = {m["name"]: m for m in info["modules"]}
    for s in heads.specs:
        g = preconditioned[:, starts[s.name]["start"]:starts[s.name]["stop"]].reshape(len(docs), *starts[s.name]["shape"])
        for b in s.blocks:
            piece = torch.from_numpy(g[:, b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]).double()
            expected = (projector.left(b.left, b.n_rows) @ piece @ projector.right(b.right, b.n_cols).T)
            expected = expected.reshape(len(docs), -1).numpy()
            np.testing.assert_allclose(rows[:, b.start:b.stop], expected, rtol=1e-3,
                                       atol=1e-4 * np.abs(expected).max())
    assert any(len(s.blocks) > 1 for s in heads.specs)
    projected = KroneckerEigen.from_covariance(curvature.covariance(docs), {"dim": p, "kind": "rademacher", "seed": 0})
    with pytest.raises(ValueError, match="split: module, or scoring.kfac_space: full"):
        GradientCollector(net, GradientSpec(projection_dim=p, split="head"),
                          transform=KroneckerPreconditioner(projected, None))
