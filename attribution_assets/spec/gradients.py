"""Per-example gradient collection: :class:`GradientSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from attribution_assets.spec.checks import (
    _check_bool,
    _check_choice,
    _check_int,
    _check_str,
    _check_strings,
)

GRADIENT_NORMALIZERS = ("none", "adam", "adafactor")
GRADIENT_SPLITS = ("module", "head")
PER_TOKEN_MODES = ("none", "positional", "loss")


@dataclass(frozen=True)
class GradientSpec:
    """Per-example gradient collection (``engine.gradients``): the settings that make the rows.

    ``projection_dim``: per module, a ``p x p`` projected gradient (0 = the full ``O x I``
    gradient); ``include`` / ``exclude``: fnmatch globs over module names; ``normalizer``:
    ``adam`` / ``adafactor`` divide by the optimizer's second moments from
    ``optimizer_state`` (an ``optimizer.pt`` or a Trainer checkpoint directory);
    ``per_token``: ``none`` (one row per document), ``positional`` (row t = token t's share
    ``L g_t a_tᵀ Rᵀ`` of the document gradient, one backward pass) or ``loss`` (row t = the
    gradient of token t's loss alone, one backward pass per target position); YAML ``true``
    means ``loss`` and ``false`` means ``none``. Either way a document's rows sum to its
    document row. ``dtype``: of the stored rows; ``max_tokens_per_batch``: the batch budget
    (speed and memory only, never the rows); ``split``: ``module`` (one block per module) or
    ``head`` (attention projections split into one block per head: q/k/v by output rows, the
    output projection by input columns; see ``engine.gradients.heads``), each block ``p x p``
    when projected.
    """

    projection_dim: int = 32
    projection_kind: str = "rademacher"
    seed: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("*lm_head*", "*embed_out*")
    include_bias: bool = False
    per_token: str = "none"
    dtype: str = "float32"
    normalizer: str = "none"
    optimizer_state: str | None = None
    max_tokens_per_batch: int = 4096
    split: str = "module"

    def __post_init__(self):
        _check_int(self, "projection_dim", 0, note=" (0 = no projection)")
        _check_choice(self, "projection_kind", ("rademacher", "gaussian"))
        _check_int(self, "seed", 0)
        _check_strings(self, "include")
        _check_strings(self, "exclude", allow_empty=True)
        _check_bool(self, "include_bias")
        if self.per_token is True or self.per_token is False:  # YAML booleans (the old setting)
            object.__setattr__(self, "per_token", "loss" if self.per_token else "none")
        _check_choice(self, "per_token", PER_TOKEN_MODES)
        _check_choice(self, "dtype", ("float32", "float16"))
        _check_choice(self, "normalizer", GRADIENT_NORMALIZERS)
        _check_str(self, "optimizer_state")
        _check_int(self, "max_tokens_per_batch", 1)
        _check_choice(self, "split", GRADIENT_SPLITS)

    @property
    def token_rows(self) -> bool:
        """Whether rows are per token (``per_token`` is ``positional`` or ``loss``)."""
        return self.per_token != "none"
