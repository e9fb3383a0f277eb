"""Does a model's per-example gradient depend on its batch mates? Find settings where it does not.

In exact arithmetic a document's gradient (loss summed over its own tokens) never depends
on the other documents of its batch or on right padding. In practice fused attention
kernels, reduced precision and TF32 matmuls pick different reduction orders for
different batch shapes, so gradients of one document differ between batches.

:func:`diagnose` builds ``n_docs`` documents of ``length`` tokens (random token ids, or
chunks of ``texts``), collects their projected gradients with the engine's collector in
three conditions: each document ALONE (batch of one, no padding), BATCHED with the other
equal-length documents, and PADDED (batched with a longer document, so every one of them
is right-padded), and reports the cosine of each document's batched/padded gradient with
its alone gradient. It escalates settings cumulatively, stopping at the first whose
minimum cosine reaches ``threshold``:

1. ``default``: the model as loaded with ``dtype``, its default attention;
2. ``math attention``: ``attn_implementation="sdpa"`` under
   ``sdpa_kernel(SDPBackend.MATH)`` (``"eager"`` where SDPA is unsupported);
3. ``float32``: also load in float32;
4. ``tf32 off``: also disable TF32 (``torch.set_float32_matmul_precision("highest")``,
   ``torch.backends.cudnn.allow_tf32 = False``; no effect on a CPU).

With a reduced-precision ``dtype`` (``bfloat16``, ``float16``) the report starts with one
more row, the precision error itself: the cosine of each document's gradient (alone) in
that dtype with its gradient in float32, same settings otherwise. Gradient products
accumulate in float32 either way; the difference comes from the forward and backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.io.models import load_model
from attribution_assets.spec import GradientSpec, ModelSpec

CONDITIONS = ("batched", "padded")


@dataclass(frozen=True)
class Setting:
    """One rung of the escalation ladder (see the module docstring)."""

    name: str
    dtype: str
    attn_implementation: str | None = None
    sdpa_math: bool = False
    tf32_off: bool = False

    def model_kwargs(self) -> dict:
        return {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}

    def describe(self) -> str:
        parts = [f"dtype={self.dtype}"]
        if self.attn_implementation:
            parts.append(f"model_kwargs={{attn_implementation: {self.attn_implementation}}}")
        if self.sdpa_math:
            parts.append("torch.nn.attention.sdpa_kernel(SDPBackend.MATH)")
        if self.tf32_off:
            parts.append("TF32 off (set_float32_matmul_precision('highest'), cudnn.allow_tf32=False)")
        return ", ".join(parts)


@dataclass
class DiagnoseReport:
    """``rows``: one dict per (setting, condition) with ``min``/``median`` cosine to alone."""

    model: str
    threshold: float
    n_docs: int
    length: int
    rows: list[dict] = field(default_factory=list)
    chosen: Setting | None = None


def ladder(dtype: str) -> list[Setting]:
    """The cumulative escalation ladder from ``dtype`` (rungs that change nothing are dropped)."""
    rungs = [Setting("default", dtype),
             Setting("math attention", dtype, "sdpa", True),
             Setting("float32", "float32", "sdpa", True),
             Setting("tf32 off", "float32", "sdpa", True, True)]
    out: list[Setting] = []
    for rung in rungs:
        if not out or dataclasses.replace(rung, name=out[-1].name) != out[-1]:
            out.append(rung)
    return out


@contextlib.contextmanager
def applied(setting: Setting) -> Iterator[None]:
    """Within the block: the SDPA math backend and/or TF32 off, as the setting asks."""
    with contextlib.ExitStack() as stack:
        if setting.sdpa_math:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if setting.tf32_off:
            precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.allow_tf32 = False
            stack.callback(torch.set_float32_matmul_precision, precision)
            stack.callback(setattr, torch.backends.cudnn, "allow_tf32", cudnn)
        yield


def _load(name_or_path: str, setting: Setting, device: str):
    def load(s: Setting):
        spec = ModelSpec(name_or_path=name_or_path, dtype=s.dtype, model_kwargs=s.model_kwargs())
        return load_model(spec, device)

    try:
        return load(setting), setting
    except ValueError:
        if setting.attn_implementation != "sdpa":
            raise
        setting = dataclasses.replace(setting, attn_implementation="eager", sdpa_math=False)
        return load(setting), setting


def make_documents(vocab_size: int, n_docs: int, length: int, seed: int = 0,
                   token_ids: Sequence[int] | None = None) -> list[list[int]]:
    """``n_docs`` token lists of ``length``: consecutive chunks of ``token_ids``, else random ids."""
    if token_ids is not None:
        if len(token_ids) < n_docs * length:
            raise ValueError(f"need {n_docs * length} tokens of text, got {len(token_ids)}")
        return [list(token_ids[i * length:(i + 1) * length]) for i in range(n_docs)]
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(n_docs, length)).tolist()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a.astype(np.float64) * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-300)


def document_rows(model, docs: list[list[int]], budget: int = 1, projection_dim: int = 32,
                  seed: int = 0) -> np.ndarray:
    """``[len(docs), dims]`` projected gradients (loss on every token but the first) in
    batches of ``budget`` tokens (1: each document alone)."""
    gradients = GradientSpec(projection_dim=projection_dim, seed=seed, max_tokens_per_batch=budget)
    return GradientCollector(model, gradients).collect([(d, [0] + [1] * (len(d) - 1)) for d in docs])[0]


def gradient_agreement(model, docs: list[list[int]], pad_length: int, projection_dim: int = 32,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Per condition, ``[n_docs]`` cosines of each document's gradient with its alone gradient.

    Loss on every token but the first; projected with ``projection_dim`` (0 = full gradient).
    The padded batch adds one random document of ``pad_length`` tokens.
    """
    n, length = len(docs), len(docs[0])
    filler = np.random.default_rng(seed + 1).integers(0, model.config.vocab_size, pad_length).tolist()
    alone = document_rows(model, docs, 1, projection_dim, seed)
    batched = document_rows(model, docs, n * length, projection_dim, seed)
    padded = document_rows(model, docs + [filler], (n + 1) * pad_length, projection_dim, seed)[:n]
    return {"batched": _cosines(alone, batched), "padded": _cosines(alone, padded)}


def dtype_agreement(model, name_or_path: str, docs: list[list[int]], device: str = "cpu",
                    projection_dim: int = 32, seed: int = 0) -> np.ndarray:
    """``[n_docs]`` cosines of each document's gradient (alone) from ``model`` (loaded in a
    reduced precision) with its gradient from the float32 model at ``name_or_path``."""
    low = document_rows(model, docs, 1, projection_dim, seed)
    full, _ = _load(name_or_path, Setting("default", "float32"), device)
    return _cosines(low, document_rows(full, docs, 1, projection_dim, seed))


def diagnose(model_name_or_path: str, *, threshold: float = 0.999, n_docs: int = 8,
             length: int = 32, dtype: str = "float32", device: str = "cpu",
             projection_dim: int = 32, texts: Sequence[str] | None = None,
             seed: int = 0) -> DiagnoseReport:
    """Escalate settings until per-example gradients agree across batchings (see module doc).

    ``report.chosen`` is the first setting whose minimum cosine over both conditions is
    ``>= threshold`` (``None`` if none reaches it); ``report.rows`` has every rung tried.
    """
    report = DiagnoseReport(model_name_or_path, threshold, n_docs, length)
    token_ids = None
    if texts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        token_ids = [t for text in texts for t in tokenizer(text, verbose=False)["input_ids"]]  # cut below
    for rung in ladder(dtype):
        model, setting = _load(model_name_or_path, rung, device)
        limit = getattr(model.config, "max_position_embeddings", None) or 2 * length
        if length >= limit:
            raise ValueError(f"length {length} must be below the model's {limit} positions")
        docs = make_documents(model.config.vocab_size, n_docs, length, seed, token_ids)
        if dtype != "float32" and not report.rows:  # the precision error, on the first rung's model
            values = dtype_agreement(model, model_name_or_path, docs, device, projection_dim, seed)
            report.rows.append({"setting": "default", "condition": f"{dtype} vs float32",
                                "min": float(values.min()), "median": float(np.median(values)),
                                "settings": f"dtype={dtype} against dtype=float32"})
        with applied(setting):
            cosines = gradient_agreement(model, docs, min(2 * length, limit), projection_dim, seed)
        worst = 1.0
        for condition in CONDITIONS:
            values = cosines[condition]
            report.rows.append({"setting": setting.name, "condition": condition,
                                "min": float(values.min()), "median": float(np.median(values)),
                                "settings": setting.describe()})
            worst = min(worst, float(values.min()))
        del model
        if worst >= threshold:
            report.chosen = setting
            break
    return report


def format_report(report: DiagnoseReport) -> str:
    """A Markdown table of the cosines per rung and condition, then the settings to use."""
    lines = [f"Gradient agreement of {report.model}: {report.n_docs} documents of {report.length} "
             f"tokens, cosine of each document's gradient with its gradient alone "
             f"(threshold {report.threshold}); a `<dtype> vs float32` row compares each "
             f"document's gradient alone in that dtype with float32 (the precision error).", "",
             "| setting | condition | min cosine | median cosine | 1 - min |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['condition']} | {r['min']:.6f} | {r['median']:.6f} | "
              f"{1 - r['min']:.1e} |" for r in report.rows]
    lines.append("")
    if report.chosen is None:
        lines.append("No setting reached the threshold; gradients depend on batch composition. "
                     "Collect with `max_tokens_per_batch` at most one document's length.")
    else:
        lines.append(f"Use: {report.chosen.describe()} (setting {report.chosen.name!r}).")
    return "\n".join(lines) + "\n"
