"""Per-example (and per-token) gradients of causal LMs from module hooks.

Conventions (DESIGN.md "Math conventions"):

- Hooked modules are ``nn.Linear`` and transformers' ``Conv1D`` chosen by
  ``fnmatch`` globs over module names. For input activations ``a [T, I]`` and
  output gradients ``g [T, O]`` of one document, the weight gradient is
  ``G = g^T a``, an ``[O, I]`` matrix: the layout of ``weight.grad`` for
  ``nn.Linear`` and of ``weight.grad.T`` for ``Conv1D`` (weight ``[I, O]``).
- Loss is the SUM over target tokens (``loss_mask[t] == 1``) of
  ``-log p(input_ids[t] | input_ids[:t])``, summed over documents, so a
  document's gradient does not depend on its batch mates.
- Row layout: modules in ``model.named_modules()`` order; each module owns
  columns ``[start, stop)``: the weight block (``L G R^T`` flattened row-major as
  ``[p_out, p_in]``, or ``G`` as ``[O, I]`` when ``projection_dim == 0``), then,
  with ``include_bias``, a bias block (``L b`` or ``b``, ``b = sum_t g``).
- ``per_token=True`` emits one row per target token ``t``: the gradient of that
  token's loss alone (one backward pass per target index per batch), so a
  document's rows sum to its document row. ``token_offsets[i]:token_offsets[i+1]``
  are document ``i``'s rows and ``token_positions`` their token indices ``t``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attribution_assets.engine.gradients.batching import (
    Batch,
    Document,
    make_batches,
    validate_documents,
)
from attribution_assets.engine.gradients.projection import Projector
from attribution_assets.engine.io.digests import json_digest
from attribution_assets.spec import GradientSpec

try:
    from transformers.pytorch_utils import Conv1D

    _HOOKABLE: tuple[type, ...] = (nn.Linear, Conv1D)
except ImportError:  # transformers is optional for plain nn.Linear models
    _HOOKABLE = (nn.Linear,)

_FULL_GRAD_BUDGET = 1 << 26  # floats of full [B, O, I] gradients formed at once


def rows_hash(gradients: GradientSpec, normalizer_settings: dict | None = None) -> str:
    """SHA-256 (16 hex) of the settings that change the rows (``config_hash`` in a store's
    ``info.json``): every ``GradientSpec`` field but the batch budget and the optimizer-state
    path, plus the normalizer's settings (the optimizer state itself is not hashed)."""
    payload = {
        "projection_dim": gradients.projection_dim, "projection_kind": gradients.projection_kind,
        "seed": gradients.seed, "include": list(gradients.include), "exclude": list(gradients.exclude),
        "include_bias": gradients.include_bias, "per_token": gradients.per_token,
        "dtype": gradients.dtype,
        "normalizer": None if gradients.normalizer == "none" else gradients.normalizer,
        "normalizer_settings": normalizer_settings,
    }
    return json_digest(payload)


@dataclass
class ModuleSpec:
    """One hooked module and its column range in a gradient row."""

    name: str
    module: nn.Module
    out_features: int
    in_features: int
    transposed: bool  # Conv1D: weight is [I, O]
    has_bias: bool
    start: int = 0
    stop: int = 0
    shape: tuple[int, int] = (0, 0)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"

    def layout(self) -> dict:
        return {
            "name": self.name,
            "start": self.start,
            "stop": self.stop,
            "shape": list(self.shape),
            "has_bias": self.has_bias,
        }


def select_modules(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str], include_bias: bool = False
) -> list[ModuleSpec]:
    """Linear/Conv1D modules whose names match an ``include`` glob and no ``exclude`` glob."""
    specs, available = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, _HOOKABLE):
            continue
        available.append(name)
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        transposed = not isinstance(mod, nn.Linear)
        inp, out = mod.weight.shape if transposed else mod.weight.shape[::-1]
        specs.append(
            ModuleSpec(
                name,
                mod,
                out,
                inp,
                transposed,
                include_bias and getattr(mod, "bias", None) is not None,
            )
        )
    if not specs:
        raise ValueError(
            f"no nn.Linear/Conv1D module matches include={list(include)} exclude={list(exclude)}; "
            f"available modules include {available[:8]}"
            + (f" (and {len(available) - 8} more)" if len(available) > 8 else "")
        )
    return specs


@contextmanager
def hooked_modules(model: nn.Module, specs: Sequence[ModuleSpec]) -> Iterator[dict[str, list]]:
    """Eval mode, frozen parameters, and hooks appending ``(input, output)`` to
    ``records[name]`` per call of each module in ``specs``; yields ``records``.

    Inputs are made to require grad, so every hooked output has a gradient even with frozen
    parameters; outputs retain their ``.grad`` (read by ``trace()``). Callers empty the
    lists between batches (:func:`clear_records`).
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    records: dict[str, list] = {s.name: [] for s in specs}
    handles = []

    def pre_hook(module, args):
        x = args[0]
        if not x.requires_grad:  # lets gradients reach every hooked output
            return (x.detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def make_hook(name):
        def hook(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                output.retain_grad()  # read by trace(); autograd.grad() ignores it
            records[name].append((args[0].detach(), output))

        return hook

    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for s in specs:
            handles.append(s.module.register_forward_pre_hook(pre_hook))
            handles.append(s.module.register_forward_hook(make_hook(s.name)))
        yield records
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def clear_records(records: dict[str, list]) -> None:
    """Empty every module's call list (the hooks keep appending to the same lists)."""
    for calls in records.values():
        calls.clear()


def _token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Masked per-token losses ``[B, T-1]``; entry ``t-1`` is the loss of token ``t``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(batch.loss_mask[:, 1:].bool(), nll, torch.zeros_like(nll))


class GradientCollector:
    """Hook-based per-example gradient collector (see the module docstring for conventions).

    ``normalizer``: an ``AdamNormalizer`` / ``AdafactorNormalizer`` (``normalizers``).
    ``device``: where batches go (default: the model's device). Products are float32.
    ``transform``: a linear map of each example's weight gradient, ``transform.apply_full(name,
    G [B, O, I]) -> [B, O, I]`` before the projection, or with ``transform.projected`` of the
    projected block ``[B, p, p]`` (the EK-FAC / K-FAC query-side preconditioner of
    ``preconditioning.kfac``); it checks the modules with ``transform.check_modules([(name, O,
    I), ...], projection_settings)``. Weight blocks only: no bias, no normalizer.
    """

    def __init__(
        self,
        model: nn.Module,
        gradients: GradientSpec | None = None,
        normalizer=None,
        device: torch.device | str | None = None,
        transform=None,
    ):
        self.model, self.gradients = model, gradients or GradientSpec()
        cfg = self.gradients
        if normalizer is not None and cfg.normalizer not in ("none", normalizer.kind):
            raise ValueError(
                f"gradients.normalizer={cfg.normalizer!r} but a {normalizer.kind!r} "
                "normalizer was passed"
            )
        if normalizer is None and cfg.normalizer != "none":
            raise ValueError(
                f"gradients.normalizer={cfg.normalizer!r} needs optimizer state: pass "
                "normalizer=make_normalizer(kind, optimizer_or_checkpoint, model)"
            )
        if transform is not None and (normalizer is not None or cfg.include_bias):
            raise ValueError(
                "a gradient transform (EK-FAC / K-FAC) acts on weight gradients without "
                "optimizer normalization: set gradients.normalizer: none and include_bias: false"
            )
        self.normalizer, self.transform = normalizer, transform
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.projector = Projector(cfg.projection_dim, cfg.projection_kind, cfg.seed, self.device)
        self.specs = select_modules(model, cfg.include, cfg.exclude, cfg.include_bias)
        col = 0
        for s in self.specs:
            p = cfg.projection_dim
            s.shape = (p, p) if p else (s.out_features, s.in_features)
            s.start, col = col, col + s.shape[0] * s.shape[1] + (s.shape[0] if s.has_bias else 0)
            s.stop = col
        self.dims = col
        if normalizer is not None:
            normalizer.bind(self.specs, self.device)
        if transform is not None:
            transform.check_modules([(s.name, s.out_features, s.in_features) for s in self.specs],
                                    self.projector.settings())
        self._records: dict[str, list] = {}

    @property
    def module_layout(self) -> list[dict]:
        """``[{name, start, stop, shape, has_bias}]`` in column order."""
        return [s.layout() for s in self.specs]

    def layout_info(self) -> dict:
        """The settings part of a store's ``info.json``."""
        norm = self.normalizer.settings() if self.normalizer else None
        return {
            "dims": self.dims,
            "modules": self.module_layout,
            "per_token": self.gradients.per_token,
            "projection": self.projector.settings(),
            "normalizer": norm,
            "config_hash": rows_hash(self.gradients, norm),
        }

    @contextmanager
    def _hooked(self):
        """:func:`hooked_modules` over this collector's modules, recording into ``_records``."""
        with hooked_modules(self.model, self.specs) as records:
            self._records = records
            try:
                yield
            finally:
                self._records = {}

    def _module_rows(
        self, spec: ModuleSpec, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``[B, stop - start]`` from ``a [B, T, I]``, ``g [B, T, O]``, ``valid [B, T, 1]``.

        Padding is masked at the cheapest point (after projecting ``a`` and ``g``);
        an Adafactor normalizer's factors scale ``L`` and ``R`` (the same as scaling
        ``g`` and ``a``). A normalizer that does not factor, or a full-space ``transform``,
        needs each example's full ``[O, I]`` gradient (formed in chunks).
        """
        norm, p, transform = self.normalizer, self.gradients.projection_dim, self.transform
        factors = norm.factors(spec.name) if norm is not None and norm.factored else None
        blocks = []
        projected_transform = transform is None or transform.projected
        if p and (norm is None or factors is not None) and projected_transform:
            left, right = self.projector.matrices(spec.name, spec.out_features, spec.in_features)
            if factors is not None:
                left, right = left * factors[0], right * factors[1]
            a_p = torch.where(valid, a @ right.T, 0.0)
            g_p = torch.where(valid, g @ left.T, 0.0)
            block = g_p.transpose(1, 2) @ a_p
            blocks.append((block if transform is None else transform.apply_full(spec.name, block)).flatten(1))
        else:
            a, g = torch.where(valid, a, 0.0), torch.where(valid, g, 0.0)
            chunk = max(1, _FULL_GRAD_BUDGET // (spec.out_features * spec.in_features))
            parts = []
            for i in range(0, a.shape[0], chunk):
                full = g[i : i + chunk].transpose(1, 2) @ a[i : i + chunk]
                if factors is not None:
                    full = full * factors[0][:, None] * factors[1]
                elif norm is not None:
                    full = norm.scale_full(spec.name, full)
                if self.transform is not None:
                    full = self.transform.apply_full(spec.name, full)
                parts.append(self.projector.project(spec.name, full).flatten(1))
            blocks.append(torch.cat(parts))
        if spec.has_bias:
            bias = (valid.transpose(1, 2).to(g.dtype) @ g).squeeze(1)  # sum_t g over real tokens
            if norm is not None:
                bias = norm.scale_bias(spec.name, bias)
            if p:
                left = self.projector.matrices(spec.name, spec.out_features, spec.in_features)[0]
                bias = bias @ left.T
            blocks.append(bias)
        return torch.cat(blocks, dim=1)

    def _rows(self, grads, select, valid) -> torch.Tensor:
        """All modules' rows ``[n, dims]`` for documents ``select`` (``None``: all)."""
        blocks, k = [], 0
        pick = (lambda t: t) if select is None else (lambda t: t[select])
        valid = pick(valid)
        for s in self.specs:
            block = None
            for a, _ in self._records[s.name]:
                part = self._module_rows(s, pick(a).float(), pick(grads[k]).float(), valid)
                block = part if block is None else block + part
                k += 1
            if block is None:
                block = torch.zeros(valid.shape[0], s.stop - s.start, device=self.device)
            blocks.append(block)
        return torch.cat(blocks, dim=1)

    @contextmanager
    def trace(self):
        """Capture per-example rows from whatever loss the caller backpropagates.

        ``with collector.trace() as rows: model(**batch).loss.backward()`` leaves
        ``rows[0]`` = float32 ``[B, dims]``: example ``b``'s rows are
        ``sum_t g_bt a_btᵀ`` of the caller's loss (scaled by its reduction, e.g. 1/tokens
        for a mean loss; cosine scores are unaffected). Positions that do not reach the
        loss (padding, masked labels) have zero output gradient and add nothing.
        """
        result: list[np.ndarray] = []
        with self._hooked():
            clear_records(self._records)
            yield result
            outputs = [o for s in self.specs for _, o in self._records[s.name]]
            if not outputs:
                raise RuntimeError("no hooked module ran inside trace(); run the model's forward there")
            grads = [o.grad if o.grad is not None else torch.zeros_like(o) for o in outputs]
            a = self._records[self.specs[0].name][0][0]
            valid = torch.ones(a.shape[0], a.shape[1], 1, dtype=torch.bool, device=a.device)
            result.append(self._rows(grads, None, valid).detach().cpu().numpy())

    def _grad(self, loss, outputs, retain):
        return torch.autograd.grad(
            loss, outputs, retain_graph=retain, allow_unused=True, materialize_grads=True
        )

    def _batch_rows(self, batch: Batch, counts: list[int]) -> list[torch.Tensor]:
        """Per document of the batch, its rows ``[n_rows, dims]``."""
        clear_records(self._records)
        losses = _token_loss(self.model, batch)
        outputs = [o for s in self.specs for _, o in self._records[s.name]]
        valid = batch.attention_mask.bool()[..., None]
        if not self.gradients.per_token:
            rows = self._rows(self._grad(losses.sum(), outputs, False), None, valid)
            return [rows[b : b + 1] for b in range(len(batch.indices))]
        positions = [
            torch.nonzero(batch.loss_mask[b, 1:]).flatten() for b in range(len(batch.indices))
        ]
        per_doc = [[] for _ in batch.indices]
        n_max = max(counts[i] for i in batch.indices)
        for k in range(n_max):
            docs = [b for b, pos in enumerate(positions) if len(pos) > k]
            loss = sum(losses[b, positions[b][k]] for b in docs)
            sel = torch.tensor(docs, device=self.device)
            rows = self._rows(self._grad(loss, outputs, k + 1 < n_max), sel, valid)
            for j, b in enumerate(docs):
                per_doc[b].append(rows[j : j + 1])
        return [
            torch.cat(r) if r else torch.zeros(0, self.dims, device=self.device) for r in per_doc
        ]

    def collect(self, docs: Sequence[Document]) -> tuple[np.ndarray, dict]:
        """Gradient rows for ``docs`` (``(input_ids, loss_mask)`` pairs) in their given order.

        Returns ``(array [rows, dims] float32, info)`` where ``info`` holds
        :meth:`layout_info` plus ``rows``, ``token_offsets`` and ``token_positions``
        (both ``None`` unless ``per_token``).
        """
        counts = validate_documents(docs)
        per_token = self.gradients.per_token
        n_rows = counts if per_token else [1] * len(docs)
        offsets = np.concatenate([[0], np.cumsum(n_rows, dtype=np.int64)]).astype(np.int64)
        out = np.zeros((int(offsets[-1]), self.dims), dtype=np.float32)
        with self._hooked():
            for batch in make_batches(docs, self.gradients.max_tokens_per_batch, 0, self.device):
                for i, rows in zip(batch.indices, self._batch_rows(batch, counts)):
                    out[offsets[i] : offsets[i + 1]] = rows.detach().cpu().numpy()
        info = self.layout_info()
        info["rows"] = int(out.shape[0])
        info["token_offsets"] = offsets.tolist() if per_token else None
        info["token_positions"] = (
            [t for _, mask in docs for t, m in enumerate(mask) if m] if per_token else None
        )
        return out, info


def collect_to_store(
    model: nn.Module,
    docs: Sequence[Document],
    doc_ids: Sequence[str],
    path,
    gradients: GradientSpec | None = None,
    model_fingerprint: str = "",
    normalizer=None,
    device=None,
):
    """Collect ``docs`` and write one gradient shard at ``path``; returns the ``GradientStore``."""
    from attribution_assets.engine.gradients.store import write_store

    if len(doc_ids) != len(docs):
        raise ValueError(f"{len(doc_ids)} doc_ids for {len(docs)} documents")
    collector = GradientCollector(model, gradients, normalizer, device)
    array, info = collector.collect(docs)
    return write_store(
        path,
        array,
        info,
        doc_ids=doc_ids,
        model_fingerprint=model_fingerprint,
        dtype=collector.gradients.dtype,
    )
