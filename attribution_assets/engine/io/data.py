"""Load documents with Hugging Face ``datasets`` and turn them into token sequences.

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
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attribution_assets.engine.io import advantages
from attribution_assets.engine.io.digests import text_id
from attribution_assets.spec import DataSpec

FORMAT_BY_SUFFIX = {
    ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
}
TEXT_UNITS = {"line": "line", "paragraph": "paragraph", "file": "document"}  # -> datasets' sample_by


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


def _detect_format(path: Path, fmt: str) -> tuple[str, dict[str, Any]]:
    """Return (datasets builder or 'disk', load kwargs) for a local path."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return "disk", {}
        files = sorted(p for p in path.iterdir() if p.suffix in FORMAT_BY_SUFFIX)
        if not files:
            raise DataError(
                f"Directory {path} holds no data files ({', '.join(FORMAT_BY_SUFFIX)}) and is not a "
                "Dataset.save_to_disk directory. Point `path` at a data file or such a directory.")
        suffixes = {p.suffix for p in files}
        if len({FORMAT_BY_SUFFIX[s] for s in suffixes}) > 1:
            raise DataError(f"Directory {path} mixes file formats {sorted(suffixes)}; keep one format per directory.")
        builder = FORMAT_BY_SUFFIX[files[0].suffix]
        return builder, {"data_files": [str(p) for p in files]}
    if fmt != "auto":
        builder = {"jsonl": "json", "txt": "text"}.get(fmt, fmt)
        return builder, {"data_files": [str(path)]}
    builder = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"Unknown file format {path.suffix!r} for {path}. Supported: "
            f"{', '.join(FORMAT_BY_SUFFIX)}; or set `format:` to one of jsonl, json, csv, parquet, txt.")
    return builder, {"data_files": [str(path)]}


def _builder_kwargs(builder: str, spec: DataSpec) -> dict[str, Any]:
    """Reader options: the text encoding, and for plain text the unit of a document."""
    if builder == "text":
        return {"encoding": spec.encoding, "sample_by": TEXT_UNITS[spec.text_unit]}
    return {"encoding": spec.encoding} if builder in ("json", "csv") else {}


def _check_file(path: Path, builder: str, spec: DataSpec) -> None:
    """Refuse an empty file, bytes that are not ``spec.encoding`` and malformed JSON lines before
    ``datasets`` turns them into an unhelpful error; messages name the file, the line and the fix."""
    if builder not in ("json", "csv", "text"):
        return
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; add documents or remove the file from the corpus.")
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode(spec.encoding)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}, line {number}: bytes {line[exc.start:exc.end]!r} are not valid {spec.encoding} "
                f"({exc.reason}). Set `encoding:` in the data section to the file's encoding "
                f"(e.g. latin-1, cp1252) or re-encode the file as UTF-8.") from None
        if builder == "json" and path.suffix == ".jsonl" and text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}, column {exc.colno}: malformed JSON ({exc.msg}). "
                                "Each line of a .jsonl file must be one JSON object.") from None


def looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).suffix != ""


def load_records(spec: DataSpec):
    """Load ``spec.path`` as a ``datasets.Dataset`` (one split)."""
    import datasets

    if not spec.path:
        raise DataError("No data path given; set `path:` to a file, a directory or a hub dataset name.")
    path = Path(os.path.expanduser(spec.path))
    if spec.format == "hub" or (not path.exists() and not looks_local(spec.path)):
        try:
            ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise DataError(
                f"Could not load {spec.path!r} as a local path or a Hugging Face hub dataset "
                f"(subset={spec.subset!r}, split={spec.split!r}): {type(exc).__name__}: {exc}. "
                "Check the path exists, or the dataset name, subset and split, and network access.") from None
    elif not path.exists():
        raise DataError(f"Data path {path} does not exist. Fix `path:` in the pipeline spec.")
    else:
        builder, kwargs = _detect_format(path, spec.format)
        try:
            if builder == "disk":
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if spec.split not in ds:
                        raise DataError(f"{path} has splits {sorted(ds)}, not {spec.split!r}; set `split:`.")
                    ds = ds[spec.split]
            else:
                for file in kwargs["data_files"]:
                    _check_file(Path(file), builder, spec)
                ds = datasets.load_dataset(builder, split="train", **kwargs, **_builder_kwargs(builder, spec))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - library errors get a clear context
            raise DataError(f"Could not read {path} as {builder}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise DataError(f"Dataset {spec.path} is empty (0 rows); point `path:` at data with documents.")
    needed = [c for c in (spec.id_column, spec.gold_column, spec.reward_column, spec.advantage_column,
                          spec.group_column) if c]
    if spec.mode == "text":
        needed.append(spec.text_column)
    elif spec.mode == "prompt_completion":
        needed += [spec.prompt_column or "prompt", spec.completion_column or "completion"]
    else:
        needed.append(spec.conversation_column)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"Column(s) {missing} not found in {spec.path}; available columns: {ds.column_names}. "
            "Set `text_column` (or `prompt_column`/`completion_column`, `conversation_column`, "
            "`id_column`) to the right names.")
    return ds


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


class RowLocator:
    """Where row ``i`` of the dataset that :func:`load_records` made of ``spec`` came from, in the
    one form every file message uses: ``<file>, line <n>`` (1-based; jsonl, csv) or ``<file>,
    row <n>`` (parquet, a json array, a text file, a saved or hub dataset). Files are read on
    the first call only (an error path), never while documents load."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self._files: list[tuple[Path, str, list[int] | int]] | None = None  # file, unit, lines or rows

    def _index(self) -> list[tuple[Path, str, list[int] | int]]:
        if self._files is None:
            self._files = []
            path = Path(os.path.expanduser(self.spec.path or ""))
            if self.spec.path and self.spec.format != "hub" and path.exists():
                builder, kwargs = _detect_format(path, self.spec.format)
                for file in kwargs.get("data_files", []):
                    self._files.append((Path(file), *_record_positions(Path(file), builder, self.spec)))
        return self._files

    def __call__(self, row: int) -> str:
        offset = 0
        for file, unit, positions in self._index():
            count = positions if isinstance(positions, int) else len(positions)
            if row < offset + count:
                local = row - offset
                return f"{file}, {unit} {local + 1 if isinstance(positions, int) else positions[local]}"
            offset += count
        return f"{self.spec.path}, row {row + 1}"


def _record_positions(file: Path, builder: str, spec: DataSpec) -> tuple[str, list[int] | int]:
    """``("line", [1-based line of each record])`` for JSON lines and CSV, else ``("row", count)``."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return "row", pq.ParquetFile(file).metadata.num_rows
    if builder not in ("json", "csv"):
        return "row", 0  # text: rows counted over the whole path
    text = file.read_text(encoding=spec.encoding, errors="replace")
    if builder == "json":
        if text.lstrip().startswith("["):
            return "row", len(json.loads(text))
        return "line", [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    import csv
    import io

    reader, starts, previous = csv.reader(io.StringIO(text)), [], 0
    for record in reader:
        if record:  # blank lines are skipped, as the CSV reader of `datasets` does
            starts.append(previous + 1)
        previous = reader.line_num
    return "line", starts[1:]  # the header is not a record


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
    place in the files (:class:`RowLocator`; default ``row <n>``, 1-based)."""
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
