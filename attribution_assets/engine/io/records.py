"""A data set's records: local files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.txt``), a
directory of them, a ``Dataset.save_to_disk`` directory or a Hugging Face hub dataset, loaded with
``datasets`` (one split), checked before ``datasets`` reads them (empty files, encodings,
malformed JSON lines, missing columns) and located for messages (``<file>, line <n>``, 1-based).
Turning records into documents and tokens: ``engine.io.data``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from attribution_assets.engine.io.data import DataError
from attribution_assets.spec import DataSpec

FORMAT_BY_SUFFIX = {
    ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
}
TEXT_UNITS = {"line": "line", "paragraph": "paragraph", "file": "document"}  # -> datasets' sample_by



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
