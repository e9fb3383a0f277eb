"""Documents from a data set's records (``engine.io.records`` loads them) and their token sequences.

Conventions
-----------
* Plain-text files (``.txt``) are split into documents by ``text_unit``: ``paragraph``
  (the default: blank-line separated), ``line`` or ``file``.
* A *document* has a stable ``doc_id``: the value of ``id_column`` when given, else
  ``sha1(content)[:16]`` (with ``~N`` appended to the N-th repeat of identical
  content), so re-sharding or reordering never changes an id.
* A tokenized document has ``input_ids`` [T] and ``loss_mask`` [T] (int8), where
  ``loss_mask[t] == 1`` means token ``t`` is a target predicted from tokens ``< t``;
  ``loss_mask[0]`` is always 0. A chunked document becomes rows ``{doc_id}#{k}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attribution_assets.engine.io import advantages
from attribution_assets.engine.io.digests import text_id
from attribution_assets.spec import DataSpec


class DataError(ValueError):
    """Bad input data; the message names the problem and the fix."""


@dataclass
class TokenizedDoc:
    """One token sequence; ``source_id`` is the document it came from (a chunk ``{id}#{k}`` of a
    long document has ``source_id == id``; otherwise ``source_id == doc_id``)."""

    doc_id: str
    input_ids: list[int]
    loss_mask: list[int]
    text: str
    source_id: str = ""
    advantage: float | None = None  # GRPO / Dr. GRPO (engine.io.advantages); None without

    def __post_init__(self) -> None:
        self.source_id = self.source_id or self.doc_id

    @property
    def targets(self) -> int:
        return int(sum(self.loss_mask))


@dataclass
class TokenizeStats:
    documents: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    chunked: int = 0
    skipped_empty: int = 0
    skipped_short: int = 0
    lengths: list[int] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)  # the first skipped documents' ids

    def skip(self, doc_id: str, empty: bool) -> None:
        """Count one skipped document (or chunk): empty, else shorter than 2 tokens / no target."""
        if empty:
            self.skipped_empty += 1
        else:
            self.skipped_short += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(doc_id)

    def as_metadata(self) -> dict[str, Any]:
        lengths = sorted(self.lengths) or [0]
        return {
            "documents": self.documents, "rows": self.rows, "tokens": self.tokens,
            "target_tokens": self.target_tokens, "truncated": self.truncated,
            "chunked": self.chunked, "skipped_empty": self.skipped_empty,
            "skipped_short": self.skipped_short,
            "skipped_examples": ", ".join(self.skipped_examples) or "none", "length_min_tokens": lengths[0],
            "length_median_tokens": lengths[len(lengths) // 2], "length_max_tokens": lengths[-1],
            "length_mean_tokens": round(sum(lengths) / len(lengths), 2),
        }


def content_of(record: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """The fields that define a document's tokens, in a JSON-able form."""
    if spec.mode == "text":
        return {"text": record[spec.text_column] or ""}
    if spec.mode == "prompt_completion":
        return {"prompt": record[spec.prompt_column or "prompt"] or "",
                "completion": record[spec.completion_column or "completion"] or ""}
    return {"messages": list(record[spec.conversation_column] or [])}


def display_text(content: dict[str, Any]) -> str:
    if "text" in content:
        return content["text"]
    if "prompt" in content:
        return content["prompt"] + content["completion"]
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in content["messages"])


def text_columns(spec: DataSpec) -> list[str]:
    """The column(s) that hold a row's text under ``spec``'s mode."""
    if spec.mode == "text":
        return [spec.text_column]
    if spec.mode == "prompt_completion":
        return [spec.prompt_column or "prompt", spec.completion_column or "completion"]
    return [spec.conversation_column]


def build_documents(records: Iterable[dict[str, Any]], spec: DataSpec, locate: Callable[[int], str] | None = None,
                    skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{doc_id, content (JSON str), text, gold_doc_ids?}`` with stable ids.

    A row without a value in its text column(s) is refused (``missing_text: error``), or left out
    with its location appended to ``skipped`` (``missing_text: skip``). ``locate``: row -> its
    place in the files (``records.RowLocator``; default ``row <n>``, 1-based)."""
    locate = locate or (lambda row: f"row {row + 1}")
    docs, seen, values, groups = [], {}, [], []
    source = spec.reward_column or spec.advantage_column
    for row, record in enumerate(records):
        missing = [c for c in text_columns(spec) if record.get(c) is None]
        if missing:
            if spec.missing_text == "skip":
                if skipped is not None:
                    skipped.append(locate(row))
                continue
            present = [k for k, v in record.items() if v is not None]
            raise DataError(f"{locate(row)}: no value in column(s) {missing}; the row has {present}. Fix the "
                            "row or the column setting (`text_column`, `prompt_column`/`completion_column`, "
                            "`conversation_column`), or set `missing_text: skip` to leave such rows out "
                            "(they are counted and reported).")
        if source:  # GRPO / Dr. GRPO: NaN where the cell is missing or not a finite number
            values.append(float(record[source]) if advantages.finite(record[source]) else float("nan"))
            groups.append(str(record[spec.group_column]) if spec.group_column else "")
        content = content_of(record, spec)
        encoded = json.dumps(content, sort_keys=True, ensure_ascii=False)
        if spec.id_column:
            doc_id = str(record[spec.id_column])
            if doc_id in seen:
                raise DataError(f"{locate(row)}: duplicate id {doc_id!r} in column {spec.id_column!r}, first "
                                f"at {locate(seen[doc_id])}; ids must be unique, or drop `id_column` to use "
                                "content hashes.")
            seen[doc_id] = row
        else:
            base = text_id(encoded, 16)
            count = seen.get(base, 0)
            seen[base] = count + 1
            doc_id = base if count == 0 else f"{base}~{count}"
        doc = {"doc_id": doc_id, "source_row": row, "content": encoded, "text": display_text(content)}
        if spec.gold_column:
            gold = record[spec.gold_column]
            doc["gold_doc_ids"] = [str(g) for g in (gold if isinstance(gold, list) else [gold]) if g is not None]
        docs.append(doc)
    if source:
        adv = (advantages.group_advantages(values, groups, spec.advantage_weighting)
               if spec.reward_column else values)
        for doc, a in zip(docs, adv):
            doc["advantage"] = float(a)
    return docs


def drop_nan_advantages(docs: list[dict[str, Any]], spec: DataSpec,
                        locate: Callable[[int], str] | None = None) -> int:
    """Remove (in place) documents whose reward/advantage is missing or not finite and return how
    many (``nan_rewards: skip``), or raise naming them (``error``; ``locate`` as in
    :func:`build_documents`)."""
    locate = locate or (lambda row: f"row {row + 1}")
    bad = [i for i, d in enumerate(docs) if "advantage" in d and not np.isfinite(d["advantage"])]
    if bad and spec.nan_rewards == "error":
        column = spec.reward_column or spec.advantage_column
        raise DataError(f"{locate(docs[bad[0]]['source_row'])}: no finite value in column {column!r} "
                        f"({len(bad)} row(s) like it: {'; '.join(locate(docs[i]['source_row']) for i in bad[:5])}); "
                        "fix the data or set `nan_rewards: skip` to drop them.")
    for i in reversed(bad):
        del docs[i]
    return len(bad)


def _assistant_spans(messages: list[dict[str, Any]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and char spans of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("The tokenizer has no chat template, so `conversation_column` cannot be rendered; "
                        "use a chat model's tokenizer or set `tokenizer.chat_template`.")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError("The chat template does not render conversations prefix-stably, so assistant "
                            "turns cannot be located; use a `prompt_column`/`completion_column` layout instead.")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_content(content: dict[str, Any], tokenizer, spec: DataSpec, add_eos: bool) -> tuple[list[int], list[int]]:
    """Token ids and loss mask for one document, untruncated: callers truncate, chunk or refuse
    long ones, so the tokenizer's warning about sequences longer than the model is off."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if "text" in content:
        ids = tokenizer(content["text"], add_special_tokens=True, verbose=False)["input_ids"] + eos
        return ids, [0] + [1] * (len(ids) - 1) if ids else []
    if "prompt" in content:
        prompt = tokenizer(content["prompt"], add_special_tokens=True, verbose=False)["input_ids"]
        completion = tokenizer(content["completion"], add_special_tokens=False, verbose=False)["input_ids"]
        completion = completion + eos if completion else completion
        mask = [0] * len(prompt) + [1] * len(completion)
        if mask:
            mask[0] = 0
        return prompt + completion, mask
    text, spans = _assistant_spans(content["messages"], tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in enc["offset_mapping"]]
    if mask:
        mask[0] = 0
    return list(enc["input_ids"]), mask


def tokenize_documents(docs: Iterable[dict[str, Any]], tokenizer, spec: DataSpec,
                       add_eos: bool = True) -> tuple[list[TokenizedDoc], TokenizeStats]:
    """Tokenize rows from :func:`build_documents`; skip empty/short docs, truncate or chunk long ones."""
    out, stats = [], TokenizeStats()
    for doc in docs:
        stats.documents += 1
        content = json.loads(doc["content"])
        if not display_text(content).strip():
            stats.skip(doc["doc_id"], empty=True)
            continue
        ids, mask = tokenize_content(content, tokenizer, spec, add_eos)
        if len(ids) > spec.max_length and spec.overflow == "chunk":
            stats.chunked += 1
            pieces = []
            for k, start in enumerate(range(0, len(ids), spec.max_length)):
                piece_mask = list(mask[start:start + spec.max_length])
                piece_mask[0] = 0
                pieces.append((f"{doc['doc_id']}#{k}", ids[start:start + spec.max_length], piece_mask))
        else:
            if len(ids) > spec.max_length:
                stats.truncated += 1
                ids, mask = ids[: spec.max_length], mask[: spec.max_length]
            pieces = [(doc["doc_id"], ids, mask)]
        for doc_id, piece_ids, piece_mask in pieces:
            if len(piece_ids) < 2 or sum(piece_mask) == 0:
                stats.skip(doc_id, empty=False)
                continue
            text = doc["text"] if len(pieces) == 1 else tokenizer.decode(piece_ids)
            out.append(TokenizedDoc(doc_id, list(map(int, piece_ids)), list(map(int, piece_mask)), text,
                                    doc["doc_id"], doc.get("advantage")))
            stats.rows += 1
            stats.tokens += len(piece_ids)
            stats.target_tokens += sum(piece_mask)
            stats.lengths.append(len(piece_ids))
    return out, stats


def shard_key(index: int) -> str:
    return f"shard-{index:05d}"


def assign_shards(doc_ids: list[str], shard_size: int, previous: dict[str, str] | None = None) -> list[str]:
    """Shard key of each document, append-only: a document keeps the shard it had in
    ``previous`` (doc id -> shard); new documents fill new shards of ``shard_size``
    documents after the highest existing one, so new data never changes an old shard."""
    previous = previous or {}
    used = [int(s.rsplit("-", 1)[1]) for s in previous.values()]
    next_index = max(used) + 1 if used else 0
    shards, fresh = [], 0
    for doc_id in doc_ids:
        if doc_id in previous:
            shards.append(previous[doc_id])
        else:
            shards.append(shard_key(next_index + fresh // shard_size))
            fresh += 1
    return shards


def write_tokenized(path: Path, docs: list[TokenizedDoc], extra: dict[str, list] | None = None) -> None:
    """Write tokenized docs as Parquet (``doc_id, source_doc_id, text, input_ids, loss_mask, length``)."""
    import polars as pl

    from attribution_assets.engine.io.atomic import atomic_file

    frame = pl.DataFrame({
        "doc_id": [d.doc_id for d in docs],
        "source_doc_id": [d.source_id for d in docs],
        "text": [d.text for d in docs],
        "input_ids": pl.Series([d.input_ids for d in docs], dtype=pl.List(pl.Int32)),
        "loss_mask": pl.Series([d.loss_mask for d in docs], dtype=pl.List(pl.Int8)),
        "length": pl.Series([len(d.input_ids) for d in docs], dtype=pl.Int32),
        **({"advantage": pl.Series([d.advantage for d in docs], dtype=pl.Float64)}
           if any(d.advantage is not None for d in docs) else {}),
        **(extra or {}),
    }, schema_overrides={"doc_id": pl.String, "source_doc_id": pl.String, "text": pl.String})
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)


def read_tokenized(path: Path) -> list[TokenizedDoc]:
    import polars as pl

    frame = pl.read_parquet(path)
    if "source_doc_id" not in frame.columns:  # written before chunks recorded their source
        frame = frame.with_columns(source_doc_id=pl.col("doc_id"))
    if "advantage" not in frame.columns:
        frame = frame.with_columns(advantage=pl.lit(None, dtype=pl.Float64))
    return [TokenizedDoc(r["doc_id"], r["input_ids"], r["loss_mask"], r["text"], r["source_doc_id"],
                         r["advantage"])
            for r in frame.select("doc_id", "input_ids", "loss_mask", "text", "source_doc_id", "advantage")
            .iter_rows(named=True)]
