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
)
from attribution_assets.engine.preconditioning.kfac_files import check_same
from attribution_assets.spec import GradientSpec, PipelineSpec

LABELS = ("sampled", "true")
_CHUNK_FLOATS = 1 << 24  # float64 entries of rotated per-document gradients [B, O, I] at once


def sample_labels(log_probs: torch.Tensor, tokens: Sequence[int], seed: int,
                  samples: int | None = None) -> torch.Tensor:
    """Labels ``[n]`` (``samples`` given: ``[samples, n]``, one label sequence per draw) drawn from
    ``softmax`` rows of ``log_probs [n, V]`` (one document's positions), deterministically:
    ``samples x n`` uniforms, draw after draw, from a CPU generator seeded with
    ``stable_seed(seed, "kfac-labels", tokens)``, mapped through the float64 CDF. Draw 0 is the
    single draw, so one sample gives the same labels as ever."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, "kfac-labels", ",".join(str(int(t)) for t in tokens)))
    u = torch.rand(samples or 1, log_probs.shape[0], 1, generator=gen, dtype=torch.float64)
    cdf = log_probs.detach().double().exp().cumsum(-1).cpu()
    labels = torch.searchsorted(cdf.expand(u.shape[0], -1, -1).contiguous(), u * cdf[:, -1:]).squeeze(-1)
    labels = labels.clamp_max(log_probs.shape[-1] - 1).to(log_probs.device)
    return labels if samples is not None else labels[0]


class CurvatureCollector:
    """The two passes over documents (``(input_ids, loss_mask)`` pairs) with pseudo-gradients:
    :meth:`covariance` (factors) and :meth:`correction` (EK-FAC's eigenvalues).

    Modules: ``gradients.include`` / ``exclude`` (as the gradient collector selects them), with
    ``gradients.include_bias`` each biased module's ones column (``kfac`` module docstring);
    batches: ``gradients.max_tokens_per_batch`` (speed and memory only, never the result).
    ``label_samples``: label draws per document (``sampled`` labels only), one backward pass each
    after one forward pass; the pseudo-gradients' squares are averaged over them.
    """

    def __init__(self, model: nn.Module, gradients: GradientSpec | None = None, labels: str = "sampled",
                 seed: int = 0, device: torch.device | str | None = None, *, label_samples: int = 1):
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        if isinstance(label_samples, bool) or not isinstance(label_samples, int) or label_samples < 1:
            raise ValueError(f"label_samples must be an integer >= 1, got {label_samples!r}")
        if labels == "true" and label_samples != 1:
            raise ValueError(f"label_samples={label_samples} draws labels, but labels='true' uses the "
                             "documents' own tokens: set label_samples to 1 or labels to 'sampled'")
        self.model, self.gradients = model, gradients or GradientSpec()
        self.labels, self.seed, self.label_samples = labels, int(seed), label_samples
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        cfg = self.gradients
        self.specs = select_modules(model, cfg.include, cfg.exclude, cfg.include_bias)
        self.modules = tuple(KroneckerModule(s.name, s.out_features, s.in_features, s.has_bias)
                             for s in self.specs)

    @classmethod
    def from_spec(cls, model: nn.Module, spec: PipelineSpec,
                  device: torch.device | str | None = None) -> CurvatureCollector:
        """The pipeline's curvature passes: ``gradients`` (modules, biases, batches),
        ``scoring.kfac_labels`` / ``kfac_seed`` and ``curvature.label_samples``."""
        return cls(model, spec.gradients, spec.scoring.kfac_labels, spec.scoring.kfac_seed, device,
                   label_samples=spec.curvature.label_samples)

    @property
    def label_settings(self) -> tuple[str, int, int]:
        return self.labels, self.seed, self.label_samples

    def _losses(self, batch, docs: Sequence[Document]) -> list[torch.Tensor]:
        """Summed NLL of the target tokens, one per label draw (``true`` labels: one)."""
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.labels == "true":
            draws = batch.input_ids[None, :, 1:]
        else:
            draws = torch.zeros_like(batch.input_ids[:, 1:]).expand(self.label_samples, -1, -1).clone()
            for row, i in enumerate(batch.indices):
                n = len(docs[i][0]) - 1
                draws[:, row, :n] = sample_labels(logp[row, :n], docs[i][0], self.seed, self.label_samples)
        losses = []
        for targets in draws:
            nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
            losses.append((nll * batch.loss_mask[:, 1:].to(nll.dtype)).sum())
        return losses

    def _batches(self, docs: Sequence[Document]) -> Iterator[tuple[Any, torch.Tensor, dict, Iterator[dict]]]:
        """Per batch: ``(batch, valid [B, T] bool, {module: [a [B, T, I] per call]}, draws)``;
        ``draws`` yields ``{module: [g [B, T, O] per call]}`` per label draw (a backward pass
        each), to be consumed before the next batch."""
        validate_documents(docs)
        with hooked_modules(self.model, self.specs) as records:
            for batch in make_batches(docs, self.gradients.max_tokens_per_batch, 0, self.device):
                clear_records(records)
                losses = self._losses(batch, docs)
                outputs = [o for s in self.specs for _, o in records[s.name]]
                inputs = {s.name: [a for a, _ in records[s.name]] for s in self.specs}

                def draws(losses=losses, outputs=outputs, inputs=inputs):
                    for k, loss in enumerate(losses):
                        grads = iter(torch.autograd.grad(loss, outputs, retain_graph=k + 1 < len(losses),
                                                         allow_unused=True, materialize_grads=True))
                        yield {name: [next(grads) for _ in calls] for name, calls in inputs.items()}

                yield batch, batch.attention_mask.bool(), inputs, draws()

    def covariance(self, docs: Sequence[Document]) -> CovarianceSums:
        """Token sums of ``a aᵀ`` (``[a; 1]`` with a bias) and ``g gᵀ`` (mean over the label
        draws) per module (padding excluded), float64."""
        sums = {m.name: (torch.zeros((m.columns,) * 2, dtype=torch.float64, device=self.device),
                         torch.zeros((m.out_features,) * 2, dtype=torch.float64, device=self.device))
                for m in self.modules}
        tokens = {m.name: 0 for m in self.modules}
        for _, valid, inputs, draws in self._batches(docs):
            for m in self.modules:
                for a in inputs[m.name]:
                    a_v = a[valid].double()
                    if m.bias:
                        a_v = torch.cat([a_v, a_v.new_ones(a_v.shape[0], 1)], dim=1)
                    sums[m.name][0].add_(a_v.T @ a_v)
                    tokens[m.name] += int(a_v.shape[0])
            for grads in draws:
                for name, calls in grads.items():
                    for g in calls:
                        g_v = g[valid].double()
                        sums[name][1].add_(g_v.T @ g_v)
        return CovarianceSums(self.modules, {k: v[0].cpu().numpy() for k, v in sums.items()},
                              {k: (v[1] / self.label_samples).cpu().numpy() for k, v in sums.items()}, tokens,
                              len(docs), *self.label_settings)

    def correction(self, docs: Sequence[Document], eigen: KroneckerEigen) -> CorrectionSums:
        """Per module ``sum_n ((Q_Sᵀ G_n Q_A)[o, i])^2`` over the documents (``G_n`` projected
        when ``eigen`` is, ``[G_n | b_n]`` with a bias; the mean over the label draws), float64."""
        check_same(self.modules, eigen.modules, "modules of the collector and the eigendecomposition",
                    "use the same model and gradients.include / exclude / include_bias")
        check_same(self.label_settings, eigen.label_settings, "label settings (labels, seed, samples)",
                    "use the eigendecomposition's kfac_labels, kfac_seed and curvature.label_samples")
        bases = {m.name: tuple(torch.from_numpy(x).to(self.device) for x in eigen.bases(m.name))
                 for m in self.modules}
        squares = {name: torch.zeros(q_s.shape[1], q_a.shape[1], dtype=torch.float64, device=self.device)
                   for name, (q_a, q_s) in bases.items()}
        chunks = {name: max(1, _CHUNK_FLOATS // x.numel()) for name, x in squares.items()}
        for batch, valid, inputs, draws in self._batches(docs):
            mask = valid[..., None]
            rotated_inputs = {}  # per module, chunk and call: a Q_A, shared by every label draw
            for m in self.modules:
                q_a = bases[m.name][0]
                rotated_inputs[m.name] = [[self._rotate_input(m, a[rows], q_a) for a in inputs[m.name]]
                                          for rows in _slices(len(batch.indices), chunks[m.name])]
            for grads in draws:
                for m in self.modules:
                    q_s = bases[m.name][1]
                    for rows, a_rs in zip(_slices(len(batch.indices), chunks[m.name]), rotated_inputs[m.name]):
                        if not a_rs:
                            continue
                        rotated = 0.0
                        for a_r, g in zip(a_rs, grads[m.name]):  # a module called twice adds both calls
                            g_r = torch.where(mask[rows], g[rows].double(), 0.0) @ q_s
                            rotated = rotated + g_r.transpose(1, 2) @ a_r
                        squares[m.name].add_((rotated ** 2).sum(0))
        return CorrectionSums(self.modules, {k: (v / self.label_samples).cpu().numpy() for k, v in squares.items()},
                              len(docs), eigen.digest())

    @staticmethod
    def _rotate_input(m: KroneckerModule, a: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        """``[a, 1] B_A`` ``[B, T, k_A]`` (``a B_A`` without a bias), float64."""
        a_r = a.double() @ q_a[:m.in_features]
        return a_r + q_a[m.in_features] if m.bias else a_r  # the ones column: the basis's last row


def _slices(n: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, n, chunk)]
