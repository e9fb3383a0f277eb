"""Gradient blocks: a module's weight gradient split by attention head (``gradients.split: head``).

A hooked module's weight gradient ``G [O, I]`` (the collector's convention: output rows x input
columns) becomes one or more *blocks*, each a rectangle of ``G`` and/or a slice of its bias; every
block is one entry of a store's column layout (its own columns, its own preconditioner block).

``split: module`` (default): one block per module, the whole ``G`` (then its bias).

``split: head``, attention projections only (every other module stays one block):

- query/key/value projections split by OUTPUT ROWS, one block of ``head_dim`` rows per head:
  ``G[rows of head h, :]``, then (``include_bias``) ``b[rows of head h]``. Grouped-query
  attention: the key and value projections have ``num_key_value_heads`` blocks each (a key/value
  head shared by several query heads is a block of its own).
- output projection split by INPUT COLUMNS, one block per head: ``G[:, columns of head h]`` (head
  h's attention output enters through those columns). Its bias belongs to no head: with
  ``include_bias`` it is a block of its own (kind ``o``, head ``None``, name ``<module>[o:bias]``).

Head counts come from ``model.config`` (``num_attention_heads``, ``num_key_value_heads``, default
the former; ``head_dim``, default ``hidden_size / num_attention_heads``). Layouts:

- separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` children of one module (Llama, Qwen,
  Mistral, ...): head ``h`` of each at rows (``o_proj``: columns) ``[h d, (h+1) d)``;
- GPT-NeoX ``query_key_value`` (outputs viewed ``[H, 3 d]``, as ``GPTNeoXAttention`` does): head
  ``h`` owns rows ``[3 h d, 3 (h+1) d)``, its q, k, v ``d`` rows each in that order; ``dense`` is
  the output projection;
- GPT-2 ``c_attn`` (``Conv1D``, outputs ``[q | k | v]`` each ``H d`` wide): head ``h`` of part
  ``j`` at rows ``[j H d + h d, j H d + (h+1) d)``; the attention's ``c_proj`` is the output.

Blocks follow the rows (q/k/v) or columns (o) they cover, in order, so the unprojected blocks of
a q/k/v module, concatenated, are its flattened ``G``.

Names: ``<module>[<kind>:<head>]`` (e.g. ``model.layers.0.self_attn.k_proj[k:1]``); a whole
module keeps its own name. Projection (``projection_dim p > 0``): block ``b`` is ``L_b G_b R_bᵀ``
with ``L_b`` seeded from the name in :attr:`Block.left` and ``R_b`` from :attr:`Block.right`
(``projection.projection_matrix``): a row block has its own ``L_b [p, d]`` (its block name) and
shares the module's ``R [p, I]`` (the module name); a column block shares the module's
``L [p, O]`` and has its own ``R_b [p, d]``. A whole module uses the module's ``L`` and ``R``,
exactly as under ``split: module``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

SPLITS = ("module", "head")
HEAD_KINDS = ("q", "k", "v", "o")
#: Fused q/k/v projections whose head order is only known for these model types.
_FUSED = {"query_key_value": "gpt_neox", "c_attn": "gpt2"}
_FUSED_NAMES = ("query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv")
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module: str) -> int | None:
    """The first integer component of a dotted module name (``model.layers.3.mlp`` -> 3)."""
    found = _LAYER.search(module)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Role:
    """How one attention projection splits: ``kind`` is ``q``/``k``/``v``/``o`` (separate
    projections), ``qkv-interleaved`` (GPT-NeoX) or ``qkv-split`` (GPT-2)."""

    kind: str
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Block:
    """Rows ``[rows[0], rows[1])`` x columns ``[cols[0], cols[1])`` of a module's ``G [O, I]``
    (``cols`` None: no weight part), then, with ``bias``, the bias rows ``[rows[0], rows[1])``.

    ``left`` / ``right`` name the seeds of ``L`` / ``R``; ``start``, ``stop``, ``shape`` are the
    block's columns in a gradient row and its weight part's shape (set by the collector).
    """

    name: str
    module: str
    kind: str | None
    head: int | None
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    bias: bool
    left: str
    right: str
    start: int = 0
    stop: int = 0
    shape: tuple[int, ...] = ()

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_cols(self) -> int:
        return 0 if self.cols is None else self.cols[1] - self.cols[0]

    def place(self, start: int, projection_dim: int) -> int:
        """Set ``shape``, ``start`` and ``stop`` for columns from ``start``; return ``stop``.

        ``shape``: ``[p, p]`` / ``[rows, cols]`` of the weight part, or ``[p]`` / ``[rows]`` for a
        bias-only block."""
        p = projection_dim
        out = p or self.n_rows
        if self.cols is None:
            self.shape = (out,)
            width = out
        else:
            self.shape = (p, p) if p else (self.n_rows, self.n_cols)
            width = self.shape[0] * self.shape[1] + (out if self.bias else 0)
        self.start, self.stop = start, start + width
        return self.stop

    def layout(self) -> dict:
        """The store's layout entry; a whole module's is the same as under ``split: module``."""
        entry = {"name": self.name, "start": self.start, "stop": self.stop,
                 "shape": list(self.shape), "has_bias": self.bias}
        if self.kind is not None:
            entry |= {"module": self.module, "layer": layer_index(self.module),
                      "head": self.head, "kind": self.kind}
        return entry


def whole_module(name: str, out_features: int, in_features: int, has_bias: bool) -> Block:
    return Block(name, name, None, None, (0, out_features), (0, in_features), has_bias, name, name)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("gradients.split: head reads head counts from model.config, and this model "
                         "has none; use split: module")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_counts(model: nn.Module) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` from the model's config."""
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"gradients.split: head needs model.config.num_attention_heads, got {heads!r}; "
                         "use split: module")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"model.config: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    return heads, kv_heads, head_dim


def attention_roles(model: nn.Module) -> dict[str, Role]:
    """Attention projections of ``model`` by module name (see the module docstring)."""
    heads, kv_heads, head_dim = head_counts(model)
    model_type = getattr(_text_config(model), "model_type", "")
    roles: dict[str, Role] = {}
    for name, module in model.named_modules():
        children = {n for n, _ in module.named_children()}
        prefix = f"{name}." if name else ""
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= children:
            for kind in HEAD_KINDS:
                roles[f"{prefix}{kind}_proj"] = Role(kind, heads, kv_heads, head_dim)
        elif model_type == "gpt_neox" and {"query_key_value", "dense"} <= children:
            roles[f"{prefix}query_key_value"] = Role("qkv-interleaved", heads, heads, head_dim)
            roles[f"{prefix}dense"] = Role("o", heads, heads, head_dim)
        elif model_type == "gpt2" and {"c_attn", "c_proj"} <= children:
            roles[f"{prefix}c_attn"] = Role("qkv-split", heads, heads, head_dim)
            roles[f"{prefix}c_proj"] = Role("o", heads, heads, head_dim)
    return roles


def _check_size(module: str, what: str, size: int, want: int, counts: str) -> None:
    if size != want:
        raise ValueError(f"module {module!r}: {size} {what}, but model.config gives {counts} = {want}; "
                         "gradients.split: head cannot split it (use split: module)")


def _head_block(module: str, kind: str, head: int, rows: tuple[int, int], cols: tuple[int, int],
                bias: bool) -> Block:
    name = f"{module}[{kind}:{head}]"
    row_split = kind != "o"
    return Block(name, module, kind, head, rows, cols, bias and row_split,
                 name if row_split else module, module if row_split else name)


def split_module(name: str, out_features: int, in_features: int, has_bias: bool,
                 role: Role | None) -> list[Block]:
    """The blocks of one module: its heads when ``role`` is given, else the whole module."""
    if role is None:
        return [whole_module(name, out_features, in_features, has_bias)]
    d, h, kv = role.head_dim, role.heads, role.kv_heads
    full_in = (0, in_features)
    if role.kind == "o":
        _check_size(name, "input columns", in_features, h * d, f"{h} heads x head_dim {d}")
        blocks = [_head_block(name, "o", i, (0, out_features), (i * d, (i + 1) * d), has_bias)
                  for i in range(h)]
        if has_bias:
            blocks.append(Block(f"{name}[o:bias]", name, "o", None, (0, out_features), None, True,
                                name, name))
        return blocks
    if role.kind in ("q", "k", "v"):
        n = h if role.kind == "q" else kv
        _check_size(name, "output rows", out_features, n * d,
                    f"{n} {'query' if role.kind == 'q' else 'key/value'} heads x head_dim {d}")
        return [_head_block(name, role.kind, i, (i * d, (i + 1) * d), full_in, has_bias)
                for i in range(n)]
    _check_size(name, "output rows", out_features, 3 * h * d, f"3 x {h} heads x head_dim {d}")
    if role.kind == "qkv-interleaved":
        order = [(i, j) for i in range(h) for j in range(3)]
        start = {(i, j): (3 * i + j) * d for i, j in order}
    elif role.kind == "qkv-split":
        order = [(i, j) for j in range(3) for i in range(h)]
        start = {(i, j): (j * h + i) * d for i, j in order}
    else:
        raise ValueError(f"unknown attention role {role.kind!r} for module {name!r}")
    return [_head_block(name, "qkv"[j], i, (start[i, j], start[i, j] + d), full_in, has_bias)
            for i, j in order]


def module_blocks(model: nn.Module, modules: Sequence[tuple[str, int, int, bool]],
                  split: str) -> dict[str, list[Block]]:
    """``{module: blocks}`` for the hooked ``modules`` ``(name, out_features, in_features,
    has_bias)``; ``split`` is ``module`` or ``head`` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    roles: Mapping[str, Role] = attention_roles(model) if split == "head" else {}
    if split == "head":
        model_type = getattr(_text_config(model), "model_type", "")
        for name, *_ in modules:
            leaf = name.rsplit(".", 1)[-1]
            if name not in roles and leaf in _FUSED_NAMES:
                known = ", ".join(f"{k} ({v})" for k, v in _FUSED.items())
                raise ValueError(
                    f"gradients.split: head does not know how the fused projection {name!r} of a "
                    f"{model_type or 'this'} model orders its heads (known fused layouts: {known}); "
                    "exclude it (gradients.exclude) or use split: module")
        if not any(name in roles for name, *_ in modules):
            raise ValueError("gradients.split: head found no attention projection among the selected "
                             f"modules ({[m[0] for m in modules][:6]}...); recognized: q_proj/k_proj/"
                             "v_proj/o_proj, GPT-NeoX query_key_value/dense, GPT-2 c_attn/c_proj")
    return {name: split_module(name, out, inp, bias, roles.get(name))
            for name, out, inp, bias in modules}


def block_labels(entry: Mapping) -> tuple[str, int | None, int | None, str | None]:
    """``(module, layer, head, kind)`` of a store layout entry (a whole module: head, kind None)."""
    module = entry.get("module", entry["name"])
    return module, layer_index(module), entry.get("head"), entry.get("kind")
