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
  ``gradients.split: head`` splits attention projections into per-head blocks
  (``heads``): each block is a layout entry of its own, laid out the same way.
- Per-token rows (``gradients.per_token``); either way a document's rows sum to its
  document row. ``token_offsets[i]:token_offsets[i+1]`` are document ``i``'s rows and
  ``token_positions`` their token indices ``t``.

  * ``positional``: row ``t`` is position ``t``'s share of the document gradient,
    ``sum over the module's calls of L g_t a_tᵀ Rᵀ`` (unprojected ``g_t a_tᵀ``), where
    ``g_t`` is the output gradient of the document's whole loss at position ``t`` and
    ``a_t`` the input there: one backward pass, as for document rows. Rows for positions
    ``0 .. last target - 1`` (later positions reach no loss).
  * ``loss``: row ``t`` is the gradient of target token ``t``'s loss alone (one backward
    pass per target index per batch); rows for the targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from attribution_assets.engine.gradients.batching import (
    Batch,
    Document,
    make_batches,
    row_positions,
    validate_documents,
)
from attribution_assets.engine.gradients.heads import module_blocks
from attribution_assets.engine.gradients.hooks import (
    ModuleSpec,
    clear_records,
    hooked_modules,
    select_modules,
)
from attribution_assets.engine.gradients.loss import token_nll
from attribution_assets.engine.gradients.projection import Projector
from attribution_assets.engine.gradients.store import rows_hash
from attribution_assets.engine.progress import track
from attribution_assets.spec import GradientSpec

_FULL_GRAD_BUDGET = 1 << 26  # floats of full [B, O, I] gradients formed at once


@dataclass
class ProjectedInput:
    """A hooked call's input already projected: ``(right key, column span) -> a_c R_bᵀ`` masked,
    ``[B, T, p]`` each (what :meth:`GradientCollector._module_rows` needs of ``a``)."""

    parts: dict[tuple, torch.Tensor]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ProjectedInput:
        return ProjectedInput({k: fn(v) for k, v in self.parts.items()})


def _outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_t g_t a_tᵀ``: ``[B, O, I]`` from ``g [B, T, O]`` and ``a [B, T, I]`` (a broadcast
    product for single-position units: a batched matmul of inner size 1 is ~15x slower)."""
    return g.transpose(1, 2) * a if a.shape[1] == 1 else g.transpose(1, 2) @ a


def masked_token_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Masked per-token losses ``[B, T-1]``; entry ``t-1`` is the loss of token ``t``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # every position's logits, contiguous (no slice copy); the last one's target is a dummy
    targets = torch.roll(batch.input_ids, -1, dims=1)
    nll = token_nll(logits.flatten(0, 1), targets.flatten()).view(targets.shape)[:, :-1]
    return torch.where(batch.loss_mask[:, 1:].bool(), nll, torch.zeros_like(nll))


class GradientCollector:
    """Hook-based per-example gradient collector (see the module docstring for conventions).

    ``normalizer``: an ``AdamNormalizer`` / ``AdafactorNormalizer`` (``normalizers``).
    ``device``: where batches go (default: the model's device). ``autocast``: a dtype
    (``torch.bfloat16`` / ``torch.float16``) to run the forward pass in under
    ``torch.autocast`` with the weights as they are (None: off). Products are float32.
    ``live_normalizer``: the normalizer is bound later, per optimizer step
    (:meth:`bind_normalizer`), so none is needed now.
    ``transform``: a linear map of each example's weight gradient and bias, ``transform.apply(name,
    G [B, O, I], b [B, O] or None) -> (G', b')`` before the projection, or with
    ``transform.projected`` of the projected block ``[B, p, p]`` and ``L b`` ``[B, p]`` (the EK-FAC /
    K-FAC query-side preconditioner of ``preconditioning.kfac``); ``b`` is given for the modules
    with a bias block (``include_bias``). It checks the modules with
    ``transform.check_modules([(name, O, I, has_bias), ...], projection_settings)``. No
    normalizer; whole-module blocks when projected (``gradients.split: module``).
    """

    def __init__(
        self,
        model: nn.Module,
        gradients: GradientSpec | None = None,
        normalizer=None,
        device: torch.device | str | None = None,
        autocast: torch.dtype | None = None,
        live_normalizer: bool = False,
        transform=None,
    ):
        self.model, self.gradients, self.autocast = model, gradients or GradientSpec(), autocast
        cfg = self.gradients
        if normalizer is not None and cfg.normalizer not in ("none", normalizer.kind):
            raise ValueError(
                f"gradients.normalizer={cfg.normalizer!r} but a {normalizer.kind!r} "
                "normalizer was passed"
            )
        if normalizer is None and cfg.normalizer != "none" and not live_normalizer:
            raise ValueError(
                f"gradients.normalizer={cfg.normalizer!r} needs optimizer state: pass "
                "normalizer=make_normalizer(kind, optimizer_or_checkpoint, model)"
            )
        if transform is not None and normalizer is not None:
            raise ValueError(
                "a gradient transform (EK-FAC / K-FAC) acts on gradients without optimizer "
                "normalization: set gradients.normalizer: none"
            )
        self.normalizer, self.transform = normalizer, transform
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.projector = Projector(cfg.projection_dim, cfg.projection_kind, cfg.seed, self.device)
        self.specs = select_modules(model, cfg.include, cfg.exclude, cfg.include_bias)
        self._spec_by_name = {s.name: s for s in self.specs}
        blocks = module_blocks(
            model, [(s.name, s.out_features, s.in_features, s.has_bias) for s in self.specs], cfg.split
        )
        col = 0
        for s in self.specs:
            s.blocks, s.start = blocks[s.name], col
            for b in s.blocks:
                col = b.place(col, cfg.projection_dim)
            s.stop = col
        self.dims = col
        if normalizer is not None:
            normalizer.bind(self.specs, self.device)
        if transform is not None:
            transform.check_modules([(s.name, s.out_features, s.in_features, s.has_bias) for s in self.specs],
                                    self.projector.settings())
            if transform.projected and any(len(s.blocks) != 1 for s in self.specs):
                raise ValueError(
                    "a projected EK-FAC / K-FAC transform maps whole-module blocks: set "
                    "gradients.split: module, or scoring.kfac_space: full"
                )
        self._records: dict[str, list] = {}

    @property
    def module_layout(self) -> list[dict]:
        """``[{name, start, stop, shape, has_bias}]`` per block in column order (head blocks add
        ``module, layer, head, kind``)."""
        return [entry for s in self.specs for entry in s.layout()]

    def layout_info(self) -> dict:
        """The settings part of a store's ``info.json``."""
        norm = self.normalizer.settings() if self.normalizer else None
        return {
            "dims": self.dims,
            "modules": self.module_layout,
            "per_token": self.gradients.token_rows,
            "per_token_mode": self.gradients.per_token if self.gradients.token_rows else None,
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

    def _projects_inputs(self) -> bool:
        """Whether rows need only projected inputs (no full ``[O, I]`` gradient): projected, with no
        normalizer or a factored one, and no full-space transform."""
        norm, transform = self.normalizer, self.transform
        return bool(self.gradients.projection_dim) and (norm is None or norm.factored) \
            and (transform is None or transform.projected)

    def _project_input(self, spec: ModuleSpec, a: torch.Tensor, valid: torch.Tensor):
        """``a [B, T, I]`` as :class:`ProjectedInput` (masked by ``valid [B, T, 1]``), or ``a``
        itself when the module's rows need the full gradient."""
        if not self._projects_inputs():
            return a
        norm, proj = self.normalizer, self.projector
        factors = norm.factors(spec.name) if norm is not None else None
        parts = {}
        with torch.autocast(a.device.type, enabled=False):  # float32 products, as in the backward
            for b in spec.blocks:
                span = b.cols
                if span is None or (b.right, span) in parts:
                    continue
                m = proj.right(b.right, span[1] - span[0])
                if factors is not None:
                    m = m * factors[1][span[0] : span[1]]
                parts[b.right, span] = torch.where(valid, a[..., span[0] : span[1]].float() @ m.T, 0.0)
        return ProjectedInput(parts)

    def _module_rows(
        self, spec: ModuleSpec, a: torch.Tensor | ProjectedInput, g: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``[B, stop - start]`` from ``a [B, T, I]`` (or its :meth:`_project_input`),
        ``g [B, T, O]``, ``valid [B, T, 1]``.

        Block ``b`` (rows ``r``, columns ``c`` of ``G``) is ``(g_r L_bᵀ)ᵀ (a_c R_bᵀ)`` projected,
        else ``g_rᵀ a_c``; products with a matrix shared by several blocks are formed once.
        Padding is masked at the cheapest point (after projecting ``a`` and ``g``); an
        Adafactor normalizer's factors scale ``L`` and ``R`` (the same as scaling ``g`` and ``a``).
        A normalizer that does not factor, or a full-space ``transform``, needs each example's
        full ``[O, I]`` gradient (formed in chunks); a projected ``transform`` maps the projected
        whole-module block. A ``transform`` maps a module's bias with its weight gradient
        (``[G | b]``; projected: ``[L G Rᵀ | L b]``).
        """
        norm, p, proj, transform = (self.normalizer, self.gradients.projection_dim, self.projector,
                                    self.transform)
        factors = norm.factors(spec.name) if norm is not None and norm.factored else None
        bias, bias_projected = None, False
        if spec.has_bias:
            bias = (valid.transpose(1, 2).to(g.dtype) @ g).squeeze(1)  # sum_t g over real tokens
            if norm is not None:
                bias = norm.scale_bias(spec.name, bias)
        weights: list[torch.Tensor | None] = []
        if self._projects_inputs():
            done: dict[tuple, torch.Tensor] = {}
            if isinstance(a, ProjectedInput):
                done.update({(1, *k): v for k, v in a.parts.items()})

            def projected(side, key, span):
                if (side, key, span) not in done:
                    x, matrix = (g, proj.left) if side == 0 else (a, proj.right)
                    m = matrix(key, span[1] - span[0])
                    if factors is not None:
                        m = m * factors[side][span[0] : span[1]]
                    done[side, key, span] = torch.where(valid, x[..., span[0] : span[1]] @ m.T, 0.0)
                return done[side, key, span]

            for b in spec.blocks:
                if b.cols is None:
                    weights.append(None)
                    continue
                g_p, a_p = projected(0, b.left, b.rows), projected(1, b.right, b.cols)
                weight = _outer_sum(g_p, a_p)
                if transform is not None:  # the whole module (a projected transform refuses head blocks)
                    weight, moved = transform.apply(spec.name, weight, g_p.sum(1) if b.bias else None)
                    if moved is not None:
                        bias, bias_projected = moved, True  # L b preconditioned
                weights.append(weight.flatten(1))
        else:
            a, g = torch.where(valid, a, 0.0), torch.where(valid, g, 0.0)
            chunk = max(1, _FULL_GRAD_BUDGET // (spec.out_features * spec.in_features))
            parts: list[list[torch.Tensor]] = [[] for _ in spec.blocks]
            moved: list[torch.Tensor] = []
            for i in range(0, a.shape[0], chunk):
                full = _outer_sum(g[i : i + chunk], a[i : i + chunk])
                if factors is not None:
                    full = full * factors[0][:, None] * factors[1]
                elif norm is not None:
                    full = norm.scale_full(spec.name, full)
                if transform is not None:
                    full, part = transform.apply(spec.name, full, None if bias is None else bias[i : i + chunk])
                    if part is not None:
                        moved.append(part)
                for part, b in zip(parts, spec.blocks):
                    if b.cols is None:
                        continue
                    piece = full[:, b.rows[0] : b.rows[1], b.cols[0] : b.cols[1]]
                    if p:
                        piece = proj.left(b.left, b.n_rows) @ piece @ proj.right(b.right, b.n_cols).T
                    part.append(piece.flatten(1))
            weights = [torch.cat(part) if part else None for part in parts]
            bias = torch.cat(moved) if moved else bias  # preconditioned with the weight part
        blocks = []
        for b, weight in zip(spec.blocks, weights):
            if weight is not None:
                blocks.append(weight)
            if b.bias:
                piece = bias[:, b.rows[0] : b.rows[1]]
                blocks.append(piece @ proj.left(b.left, b.n_rows).T if p and not bias_projected else piece)
        return torch.cat(blocks, dim=1)

    def _rows(self, grads, valid, pick: Callable | None = None) -> torch.Tensor:
        """All modules' rows ``[n, dims]``. ``pick`` maps each recorded ``[B, T, .]`` tensor
        to the ``[n, T', .]`` units that become rows (``None``: the batch's documents);
        ``valid [n, T', 1]`` marks the positions that count."""
        calls, k = {}, 0
        for s in self.specs:
            calls[s.name] = []
            for recorded, _ in self._records[s.name]:
                a, g = (recorded, grads[k]) if pick is None else (pick(recorded), pick(grads[k]))
                calls[s.name].append((a, g))
                k += 1
        return self.hook_rows(calls, valid)

    def hook_rows(self, calls: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
                  valid: torch.Tensor) -> torch.Tensor:
        """Rows ``[n, dims]`` (float32) from each hooked module's calls ``(a [n, T, I], g [n, T, O])``
        (input activations and output gradients, summed over calls), ``valid [n, T, 1]`` marking
        the positions that count: the same projection and normalization as :meth:`collect`, for
        hooks run elsewhere (e.g. ``engine.training.recorder`` during a Trainer's backward)."""
        blocks: dict[str, torch.Tensor] = {}
        for name, pairs in calls.items():
            for a, g in pairs:
                part = self.module_rows(name, a, g, valid)
                blocks[name] = part if name not in blocks else blocks[name] + part
        return self.assemble(blocks, valid.shape[0])

    def module_rows(self, name: str, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One call of hooked module ``name``: its columns ``[n, stop - start]`` (float32)."""
        return self._module_rows(self._spec_by_name[name], a.float(), g.float(), valid)

    def assemble(self, blocks: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Rows ``[n, dims]`` from per-module blocks (:meth:`module_rows`, summed over calls);
        a module without a block gets zeros."""
        return torch.cat([blocks[s.name] if s.name in blocks
                          else torch.zeros(n, s.stop - s.start, device=self.device) for s in self.specs], dim=1)

    def bind_normalizer(self, normalizer) -> None:
        """Normalize with ``normalizer`` from now on (e.g. a live optimizer's state of the current
        step); its kind must be ``gradients.normalizer``."""
        if normalizer is None or normalizer.kind != self.gradients.normalizer:
            kind = normalizer.kind if normalizer is not None else None
            raise ValueError(f"gradients.normalizer={self.gradients.normalizer!r} but a {kind!r} "
                             "normalizer was passed")
        normalizer.bind(self.specs, self.device)
        self.normalizer = normalizer

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
            result.append(self._rows(grads, valid).detach().cpu().numpy())

    def _grad(self, loss, outputs, retain):
        return torch.autograd.grad(
            loss, outputs, retain_graph=retain, allow_unused=True, materialize_grads=True
        )

    def _streamed_rows(self, loss: torch.Tensor, valid: torch.Tensor, n: int,
                       pick: Callable | None = None) -> torch.Tensor:
        """Rows ``[n, dims]`` of ``loss`` (as :meth:`_rows` of its output gradients), each
        module call's block formed in that output's gradient hook as the backward pass reaches
        it, so no two calls' output gradients are held at once and each call's input is freed
        once used. The backward pass runs to the hook-made leaves (``HookRecords.leaves``)."""
        blocks: dict[str, torch.Tensor] = {}
        handles = []
        for s in self.specs:
            for recorded, output in self._records[s.name]:
                held = [recorded]

                def on_grad(g, spec=s, held=held):
                    a, g = held.pop(), g.detach()
                    if pick is not None:
                        a, g = (a.map(pick) if isinstance(a, ProjectedInput) else pick(a)), pick(g)
                    part = self._module_rows(spec, a if isinstance(a, ProjectedInput) else a.float(),
                                             g.float(), valid)
                    blocks[spec.name] = part if spec.name not in blocks else blocks[spec.name] + part

                handles.append(output.register_hook(on_grad))
        leaves = list(self._records.leaves)
        clear_records(self._records)  # the hooks hold the inputs until their gradient arrives
        try:
            if leaves and loss.requires_grad:
                torch.autograd.grad(loss, leaves, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return self.assemble(blocks, n)

    def _batch_rows(self, batch: Batch, positions: list[list[int]]) -> list[torch.Tensor]:
        """Per document of the batch, its rows ``[n_rows, dims]`` (``positions``: each
        document's row positions, :func:`row_positions`)."""
        clear_records(self._records)
        valid = batch.attention_mask.bool()[..., None]
        mode = self.gradients.per_token
        if mode != "loss":  # keep only projected inputs when the rows need no more
            self._records.prepare = lambda name, a: self._project_input(self._spec_by_name[name], a, valid)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                losses = masked_token_losses(self.model, batch)
        finally:
            self._records.prepare = None
        if mode == "none":
            return list(self._streamed_rows(losses.sum(), valid, len(batch.indices)).split(1))
        pos = [positions[i] for i in batch.indices]
        if mode == "positional":  # every kept position becomes a unit of one token
            width = batch.input_ids.shape[1]
            keep = torch.tensor([b * width + t for b, p in enumerate(pos) for t in p],
                                dtype=torch.long, device=self.device)
            units = torch.ones(len(keep), 1, 1, dtype=torch.bool, device=self.device)
            rows = self._streamed_rows(losses.sum(), units, len(keep),
                                       lambda x: x.flatten(0, 1)[keep].unsqueeze(1))
            return list(rows.split([len(p) for p in pos]))
        outputs = [o for s in self.specs for _, o in self._records[s.name]]
        per_doc = [[] for _ in pos]
        n_max = max(len(p) for p in pos)
        for k in range(n_max):
            docs = [b for b, p in enumerate(pos) if len(p) > k]
            loss = sum(losses[b, pos[b][k] - 1] for b in docs)  # entry t-1: token t's loss
            sel = torch.tensor(docs, device=self.device)
            pick = partial(torch.index_select, dim=0, index=sel)
            rows = self._rows(self._grad(loss, outputs, k + 1 < n_max), pick(valid), pick)
            for j, b in enumerate(docs):
                per_doc[b].append(rows[j : j + 1])
        return [
            torch.cat(r) if r else torch.zeros(0, self.dims, device=self.device) for r in per_doc
        ]

    def collect(self, docs: Sequence[Document]) -> tuple[np.ndarray, dict]:
        """Gradient rows for ``docs`` (``(input_ids, loss_mask)`` pairs) in their given order.

        Returns ``(array [rows, dims] float32, info)`` where ``info`` holds
        :meth:`layout_info` plus ``rows``, ``token_offsets`` and ``token_positions``
        (both ``None`` unless rows are per token). Progress: step ``gradients``, in documents.
        """
        validate_documents(docs)
        token_rows = self.gradients.token_rows
        positions = [row_positions(mask, self.gradients.per_token) for _, mask in docs]
        n_rows = [len(p) for p in positions] if token_rows else [1] * len(docs)
        offsets = np.concatenate([[0], np.cumsum(n_rows, dtype=np.int64)]).astype(np.int64)
        out = np.zeros((int(offsets[-1]), self.dims), dtype=np.float32)
        with self._hooked(), track("gradients", len(docs), "documents") as tracker:
            for batch in make_batches(docs, self.gradients.max_tokens_per_batch, 0, self.device):
                for i, rows in zip(batch.indices, self._batch_rows(batch, positions)):
                    out[offsets[i] : offsets[i + 1]] = rows.detach().cpu().numpy()
                tracker.update(len(batch.indices), tokens=sum(len(docs[i][0]) for i in batch.indices))
        info = self.layout_info()
        info["rows"] = int(out.shape[0])
        info["token_offsets"] = offsets.tolist() if token_rows else None
        info["token_positions"] = [t for p in positions for t in p] if token_rows else None
        return out, info
