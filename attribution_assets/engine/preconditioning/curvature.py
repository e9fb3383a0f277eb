"""EK-FAC / K-FAC curvature passes: pseudo-gradients of documents through module hooks, summed
into the covariance factors and the eigenvalue corrections of ``preconditioning.kfac`` (whose
module docstring states the conventions)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from attribution_assets.engine.gradients.batching import Document, make_batches, validate_documents
from attribution_assets.engine.gradients.hooks import (
    clear_records,
    hooked_modules,
    select_modules,
)
from attribution_assets.engine.io.digests import stable_seed
from attribution_assets.engine.preconditioning.kfac import (
    CorrectionSums,
    CovarianceSums,
    KroneckerEigen,
    KroneckerModule,
    _check_same,
)
from attribution_assets.spec import GradientSpec

LABELS = ("sampled", "true")
_CHUNK_FLOATS = 1 << 24  # float64 entries of rotated per-document gradients [B, O, I] at once


def sample_labels(log_probs: torch.Tensor, tokens: Sequence[int], seed: int) -> torch.Tensor:
    """Labels ``[n]`` drawn from ``softmax`` rows of ``log_probs [n, V]`` (one document's
    positions), deterministically: one uniform per position from a CPU generator seeded with
    ``stable_seed(seed, "kfac-labels", tokens)``, mapped through the float64 CDF."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, "kfac-labels", ",".join(str(int(t)) for t in tokens)))
    u = torch.rand(log_probs.shape[0], 1, generator=gen, dtype=torch.float64)
    cdf = log_probs.detach().double().exp().cumsum(-1).cpu()
    labels = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)
    return labels.clamp_max(log_probs.shape[-1] - 1).to(log_probs.device)


class CurvatureCollector:
    """The two passes over documents (``(input_ids, loss_mask)`` pairs) with pseudo-gradients:
    :meth:`covariance` (factors) and :meth:`correction` (EK-FAC's eigenvalues).

    Modules: ``gradients.include`` / ``exclude`` (as the gradient collector selects them);
    batches: ``gradients.max_tokens_per_batch`` (speed and memory only, never the result).
    """

    def __init__(self, model: nn.Module, gradients: GradientSpec | None = None, labels: str = "sampled",
                 seed: int = 0, device: torch.device | str | None = None):
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        self.model, self.gradients = model, gradients or GradientSpec()
        self.labels, self.seed = labels, int(seed)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.specs = select_modules(model, self.gradients.include, self.gradients.exclude)
        self.modules = tuple(KroneckerModule(s.name, s.out_features, s.in_features) for s in self.specs)

    def _loss(self, batch, docs: Sequence[Document]) -> torch.Tensor:
        """Summed NLL of the target tokens under sampled (or true) labels."""
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.labels == "true":
            targets = batch.input_ids[:, 1:]
        else:
            targets = torch.zeros_like(batch.input_ids[:, 1:])
            for row, i in enumerate(batch.indices):
                n = len(docs[i][0]) - 1
                targets[row, :n] = sample_labels(logp[row, :n], docs[i][0], self.seed)
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
        return (nll * batch.loss_mask[:, 1:].to(nll.dtype)).sum()

    def _batches(self, docs: Sequence[Document]) -> Iterator[tuple[Any, torch.Tensor, dict[str, list]]]:
        """Per batch: ``(batch, valid [B, T] bool, {module: [(a [B, T, I], g [B, T, O]), ...]})``."""
        validate_documents(docs)
        with hooked_modules(self.model, self.specs) as records:
            for batch in make_batches(docs, self.gradients.max_tokens_per_batch, 0, self.device):
                clear_records(records)
                loss = self._loss(batch, docs)
                outputs = [o for s in self.specs for _, o in records[s.name]]
                grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True))
                calls = {s.name: [(a, next(grads)) for a, _ in records[s.name]] for s in self.specs}
                yield batch, batch.attention_mask.bool(), calls

    def covariance(self, docs: Sequence[Document]) -> CovarianceSums:
        """Token sums of ``a aᵀ`` and ``g gᵀ`` per module (padding excluded), float64."""
        sums = {m.name: (torch.zeros((m.in_features,) * 2, dtype=torch.float64, device=self.device),
                         torch.zeros((m.out_features,) * 2, dtype=torch.float64, device=self.device))
                for m in self.modules}
        tokens = {m.name: 0 for m in self.modules}
        for _, valid, calls in self._batches(docs):
            for name, pairs in calls.items():
                for a, g in pairs:
                    a_v, g_v = a[valid].double(), g[valid].double()
                    sums[name][0].add_(a_v.T @ a_v)
                    sums[name][1].add_(g_v.T @ g_v)
                    tokens[name] += int(a_v.shape[0])
        return CovarianceSums(self.modules, {k: v[0].cpu().numpy() for k, v in sums.items()},
                              {k: v[1].cpu().numpy() for k, v in sums.items()}, tokens, len(docs),
                              self.labels, self.seed)

    def correction(self, docs: Sequence[Document], eigen: KroneckerEigen) -> CorrectionSums:
        """Per module ``sum_n ((Q_Sᵀ G_n Q_A)[o, i])^2`` over the documents (``G_n`` projected
        when ``eigen`` is), float64."""
        _check_same(self.modules, eigen.modules, "modules of the collector and the eigendecomposition",
                    "use the same model and gradients.include / exclude")
        _check_same((self.labels, self.seed), (eigen.labels, eigen.seed), "label settings",
                    "use the eigendecomposition's kfac_labels and kfac_seed")
        bases = {m.name: tuple(torch.from_numpy(x).to(self.device) for x in eigen.bases(m.name))
                 for m in self.modules}
        squares = {name: torch.zeros(q_s.shape[1], q_a.shape[1], dtype=torch.float64, device=self.device)
                   for name, (q_a, q_s) in bases.items()}
        for batch, valid, calls in self._batches(docs):
            mask = valid[..., None]
            for m in self.modules:
                q_a, q_s = bases[m.name]
                chunk = max(1, _CHUNK_FLOATS // squares[m.name].numel())
                if not calls[m.name]:
                    continue
                for start in range(0, len(batch.indices), chunk):
                    rotated = 0.0
                    for a, g in calls[m.name]:  # a module called twice adds both calls' gradients
                        g_r = torch.where(mask[start:start + chunk], g[start:start + chunk].double(), 0.0) @ q_s
                        a_r = a[start:start + chunk].double() @ q_a
                        rotated = rotated + g_r.transpose(1, 2) @ a_r
                    squares[m.name].add_((rotated ** 2).sum(0))
        return CorrectionSums(self.modules, {k: v.cpu().numpy() for k, v in squares.items()}, len(docs),
                              eigen.digest())
