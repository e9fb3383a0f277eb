"""Corpus loading and tokenization (engine/data.py)."""

import copy
import json
import logging
import re

import polars as pl
import pytest

from attribution_assets.engine.io import data, records
from attribution_assets.spec import DataSpec
from tests.helpers import SENTENCES


def _texts(spec):
    return [r["text"] for r in records.load_records(spec)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt", "disk"])
def test_local_formats_load_same_texts(tmp_path, fmt):
    frame = pl.DataFrame({"text": SENTENCES})
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        frame.write_ndjson(path)
    elif fmt == "json":
        path.write_text(json.dumps([{"text": s} for s in SENTENCES]))
    elif fmt == "csv":
        frame.write_csv(path)
    elif fmt == "parquet":
        frame.write_parquet(path)
    elif fmt == "txt":
        path.write_text("\n".join(SENTENCES) + "\n")
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": SENTENCES}).save_to_disk(str(path))
    assert _texts(DataSpec(path=str(path), text_unit="line")) == SENTENCES


def test_directory_of_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one two"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three four"}) + "\n")
    assert _texts(DataSpec(path=str(tmp_path))) == ["one two", "three four"]


def test_doc_ids_stable_under_reordering_and_unique_for_duplicates():
    spec = DataSpec()
    rows = [{"text": s} for s in SENTENCES]
    ids = {d["text"]: d["doc_id"] for d in data.build_documents(rows, spec)}
    reordered = {d["text"]: d["doc_id"] for d in data.build_documents(rows[::-1], spec)}
    assert ids == reordered
    dup = data.build_documents([{"text": "same"}, {"text": "same"}], spec)
    assert dup[0]["doc_id"] != dup[1]["doc_id"] and dup[1]["doc_id"].startswith(dup[0]["doc_id"])


def test_text_mask_covers_every_token_but_first(tiny_tokenizer):
    docs = data.build_documents([{"text": SENTENCES[0]}], DataSpec())
    (row,), stats = data.tokenize_documents(docs, tiny_tokenizer, DataSpec(), add_eos=True)
    assert row.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert row.loss_mask == [0] + [1] * (len(row.input_ids) - 1)
    assert stats.rows == 1 and stats.tokens == len(row.input_ids)


def test_prompt_tokens_are_masked(tiny_tokenizer):
    spec = DataSpec(prompt_column="prompt", completion_column="completion")
    docs = data.build_documents([{"prompt": "Mara Quill was born in", "completion": " Lisbon"}], spec)
    (row,), _ = data.tokenize_documents(docs, tiny_tokenizer, spec, add_eos=False)
    n_prompt = len(tiny_tokenizer("Mara Quill was born in")["input_ids"])
    completion = tiny_tokenizer(" Lisbon", add_special_tokens=False)["input_ids"]
    assert row.input_ids[n_prompt:] == completion
    assert row.loss_mask == [0] * n_prompt + [1] * len(completion)


def test_conversation_loss_only_on_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    spec = DataSpec(conversation_column="messages")
    messages = [{"role": "user", "content": "Where was Mara born?"},
                {"role": "assistant", "content": " Lisbon."},
                {"role": "user", "content": "And Tomas?"},
                {"role": "assistant", "content": " Orbitex."}]
    docs = data.build_documents([{"messages": messages}], spec)
    (row,), _ = data.tokenize_documents(docs, tok, spec, add_eos=False)
    targets = tok.decode([t for t, m in zip(row.input_ids, row.loss_mask) if m])
    assert "Lisbon" in targets and "Orbitex" in targets
    assert "Where" not in targets and "Tomas" not in targets


def test_truncate_and_chunk(tiny_tokenizer):
    long_text = " ".join(SENTENCES)
    docs = data.build_documents([{"text": long_text}], DataSpec())
    n = len(tiny_tokenizer(long_text)["input_ids"]) + 1
    (row,), stats = data.tokenize_documents(docs, tiny_tokenizer, DataSpec(max_length=10))
    assert len(row.input_ids) == 10 and stats.truncated == 1
    rows, stats = data.tokenize_documents(docs, tiny_tokenizer, DataSpec(max_length=10, overflow="chunk"))
    assert [len(r.input_ids) for r in rows][:-1] == [10] * (len(rows) - 1)
    assert sum(len(r.input_ids) for r in rows) == n and stats.chunked == 1
    assert all(r.loss_mask[0] == 0 for r in rows)
    assert [r.doc_id for r in rows] == [f"{docs[0]['doc_id']}#{k}" for k in range(len(rows))]
    assert {r.source_id for r in rows} == {docs[0]["doc_id"]}


def test_chunking_long_documents_does_not_warn_about_the_model_length(tiny_tokenizer):
    long_text = " ".join(SENTENCES)
    docs = data.build_documents([{"text": long_text}], DataSpec())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        for overflow in ("chunk", "truncate"):
            tokenizer = copy.deepcopy(tiny_tokenizer)
            tokenizer.model_max_length = 10
            data.tokenize_documents(docs, tokenizer, DataSpec(max_length=10, overflow=overflow))
            assert not records, records[0].getMessage()
        tokenizer(long_text)  # the warning this test would catch
    finally:
        logger.removeHandler(handler)
    assert "Token indices sequence length is longer" in records[0].getMessage()


def test_chunks_keep_their_source_id_on_disk(tmp_path, tiny_tokenizer):
    docs = data.build_documents([{"text": " ".join(SENTENCES)}, {"text": "short one"}], DataSpec())
    rows, _ = data.tokenize_documents(docs, tiny_tokenizer, DataSpec(max_length=10, overflow="chunk"))
    data.write_tokenized(tmp_path / "t.parquet", rows)
    back = data.read_tokenized(tmp_path / "t.parquet")
    assert [(r.doc_id, r.source_id) for r in back] == [(r.doc_id, r.source_id) for r in rows]
    assert back[-1].source_id == back[-1].doc_id == docs[1]["doc_id"]


@pytest.mark.parametrize("name, body, encoding, message", [
    ("empty.jsonl", b"", "utf-8", r"empty.jsonl is empty"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "utf-8", r"bad.jsonl, line 2, column \d+: malformed JSON"),
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', "utf-8", r"latin.jsonl, line 1: bytes .* not valid utf-8.*`encoding:`"),
    ("latin.csv", b"text\ncaf\xe9\n", "utf-8", r"latin.csv, line 2: bytes"),
])
def test_bad_files_name_file_line_and_fix(tmp_path, name, body, encoding, message):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(data.DataError, match=message):
        records.load_records(DataSpec(path=str(tmp_path / name), encoding=encoding))


def test_encoding_setting_reads_latin1(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert records.load_records(DataSpec(path=str(tmp_path / "latin.jsonl"), encoding="latin-1"))[0]["text"] == "café"


@pytest.mark.parametrize("unit, expected", [
    ("paragraph", ["One a.\nOne b.", "Two."]), ("line", ["One a.", "One b.", "Two."]),
    ("file", ["One a.\nOne b.\n\nTwo."]),
])
def test_text_unit_of_txt_files(tmp_path, unit, expected):
    (tmp_path / "book.txt").write_text("One a.\nOne b.\n\nTwo.\n")
    rows = records.load_records(DataSpec(path=str(tmp_path / "book.txt"), text_unit=unit))
    assert [r["text"].strip() for r in rows if r["text"].strip()] == expected


def test_empty_and_short_documents_are_skipped_and_counted(tiny_tokenizer):
    docs = data.build_documents([{"text": ""}, {"text": "   "}, {"text": SENTENCES[1]}], DataSpec())
    rows, stats = data.tokenize_documents(docs, tiny_tokenizer, DataSpec(), add_eos=False)
    assert len(rows) == 1 and stats.skipped_empty == 2
    assert stats.skipped_examples == [docs[0]["doc_id"], docs[1]["doc_id"]]
    assert stats.as_metadata()["skipped_examples"] == f"{docs[0]['doc_id']}, {docs[1]['doc_id']}"
    spec = DataSpec(prompt_column="prompt", completion_column="completion")
    docs = data.build_documents([{"prompt": "Hello there", "completion": ""}], spec)
    rows, stats = data.tokenize_documents(docs, tiny_tokenizer, spec, add_eos=False)
    assert rows == [] and stats.skipped_short == 1


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_row_without_its_text_is_refused_with_file_line_and_its_columns(tmp_path):
    """The row is the 3rd record but on line 4 (a blank line before it); other rows have no `body`."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "one"}) + "\n\n" + json.dumps({"id": "b", "text": "two"}) + "\n"
                    + json.dumps({"id": "c", "body": "three"}) + "\n")
    spec = DataSpec(path=str(path), id_column="id")
    with pytest.raises(data.DataError) as caught:
        data.build_documents(records.load_records(spec), spec, records.RowLocator(spec))
    assert str(caught.value).startswith(f"{path}, line 4: no value in column(s) ['text']; the row has ['id', 'body']")
    assert "missing_text: skip" in str(caught.value)
    skip = DataSpec(path=str(path), id_column="id", missing_text="skip")
    skipped: list[str] = []
    docs = data.build_documents(records.load_records(skip), skip, records.RowLocator(skip), skipped)
    assert [d["doc_id"] for d in docs] == ["a", "b"] and skipped == [f"{path}, line 4"]


def test_file_problems_name_the_file_and_the_1_based_line(tmp_path):
    """Duplicate ids across two files of a folder (jsonl) and within a csv (header on line 1, a
    quoted field over two lines), NaN rewards: one format, `<file>, line <n>`."""
    (tmp_path / "docs").mkdir()
    first = _jsonl(tmp_path / "docs" / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    second = _jsonl(tmp_path / "docs" / "b.jsonl", [{"id": "z", "text": "three"}, {"id": "x", "text": "four"}])
    spec = DataSpec(path=str(tmp_path / "docs"), id_column="id")
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(second))}, line 2: duplicate id 'x' in column "
                                             rf"'id', first at {re.escape(str(first))}, line 1; ids must be unique"):
        data.build_documents(records.load_records(spec), spec, records.RowLocator(spec))
    csv = tmp_path / "t.csv"
    csv.write_text('id,text\nx,"one\nline two"\ny,three\nx,four\n')
    spec = DataSpec(path=str(csv), id_column="id")
    where = re.escape(str(csv))
    with pytest.raises(data.DataError, match=rf"^{where}, line 5: duplicate id 'x' .* first at {where}, line 2;"):
        data.build_documents(records.load_records(spec), spec, records.RowLocator(spec))
    rewards = _jsonl(tmp_path / "r.jsonl", [{"text": "one", "reward": 1.0}, {"text": "two", "reward": None}])
    spec = DataSpec(path=str(rewards), reward_column="reward", advantage_weighting="grpo", nan_rewards="error")
    docs = data.build_documents(records.load_records(spec), spec, records.RowLocator(spec))
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(rewards))}, line 2: no finite value in column"):
        data.drop_nan_advantages(docs, spec, records.RowLocator(spec))


def test_shards_cover_every_document_exactly_once():
    ids = [f"d{i}" for i in range(2503)]
    shards = data.assign_shards(ids, 1000)
    assert len(shards) == 2503
    assert sorted(set(shards)) == ["shard-00000", "shard-00001", "shard-00002"]
    assert shards.count("shard-00002") == 503


def test_new_documents_never_change_existing_shards():
    old = data.assign_shards([f"d{i}" for i in range(5)], 2)
    previous = dict(zip([f"d{i}" for i in range(5)], old))
    ids = ["n0"] + [f"d{i}" for i in range(5)] + ["n1", "n2"]
    new = data.assign_shards(ids, 2, previous)
    assert new[1:6] == old
    assert [new[0], new[6], new[7]] == ["shard-00003", "shard-00003", "shard-00004"]


def test_tokenized_parquet_round_trip(tmp_path, tiny_tokenizer):
    docs = data.build_documents([{"text": s} for s in SENTENCES], DataSpec())
    rows, _ = data.tokenize_documents(docs, tiny_tokenizer, DataSpec())
    data.write_tokenized(tmp_path / "t.parquet", rows)
    assert data.read_tokenized(tmp_path / "t.parquet") == rows


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("data.xml", "<a/>", "Unknown file format"),
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "", "empty"),
    ("wrong.jsonl", '{"body": "x y"}\n', "text_column"),
])
def test_bad_input_errors_name_problem_and_fix(tmp_path, name, content, expected):
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    with pytest.raises(data.DataError, match=expected):
        records.load_records(DataSpec(path=str(path)))
