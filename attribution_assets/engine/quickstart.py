"""A first try on the user's own data (``attribution init`` / ``attribution run``): a small local
model and tokenizer made from the corpus, a pipeline entry whose lengths come from the model and
the data, and that entry saved into a pipelines YAML file the user can keep and edit.

Lengths: ``corpus.max_length`` is the longest document of the first :data:`SAMPLE_DOCUMENTS`
(in the model's tokens, EOS included), at most the model's positions (longer documents are
truncated, and counted as such); ``queries.max_length`` is the longest query, and a query longer
than the model's positions is refused with its file, line and both numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from attribution_assets.engine.io import data, records
from attribution_assets.engine.io.atomic import atomic_dir, write_text_atomic
from attribution_assets.spec import NAME_RE, DataSpec, ModelSpec, position_limit

SAMPLE_DOCUMENTS = 2000
#: The model ``attribution init`` makes: a 2-layer GPT-NeoX (random weights) for a first try.
INIT_HIDDEN, INIT_LAYERS, INIT_HEADS = 64, 2, 4


class QuickstartError(ValueError):
    """A problem with the data or model of a first run; the message names the fix."""


def _texts(spec: DataSpec) -> list[str]:
    """The display text of every row that has one."""
    return [data.display_text(data.content_of(record, spec)) for record in records.load_records(spec)
            if all(record.get(c) is not None for c in data.text_columns(spec))]


def init_model(corpus: DataSpec, out: Path, vocab_size: int = 1024, seed: int = 0,
               queries: DataSpec | None = None) -> dict[str, Any]:
    """Train a byte-level BPE tokenizer on ``corpus`` (the demo's recipe) and save it with a
    randomly initialized small GPT-NeoX into ``out`` (atomically). Its positions cover the longest
    document and query (rounded up to a multiple of 64, 64..2048). Returns what was made."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from attribution_assets.engine.demo.model import train_demo_tokenizer

    texts = _texts(corpus)
    if not any(t.strip() for t in texts):
        raise QuickstartError(f"{corpus.path} holds no text to train a tokenizer on.")
    tokenizer = train_demo_tokenizer(texts, vocab_size, model_max_length=2048)
    measured = texts + (_texts(queries) if queries is not None else [])
    longest = max(len(ids) + 1 for ids in tokenizer(measured, add_special_tokens=False)["input_ids"])
    positions = min(2048, max(64, -(-longest // 64) * 64))
    tokenizer.model_max_length = positions
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=INIT_HIDDEN, num_hidden_layers=INIT_LAYERS,
                           num_attention_heads=INIT_HEADS, intermediate_size=4 * INIT_HIDDEN,
                           max_position_embeddings=positions, hidden_dropout=0.0, attention_dropout=0.0,
                           tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPTNeoXForCausalLM(config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"path": str(out), "documents": len(texts), "vocab_size": len(tokenizer), "positions": positions,
            "longest_text_tokens": longest, "parameters": sum(p.numel() for p in model.parameters())}


def model_positions(model: ModelSpec) -> int | None:
    """The longest sequence ``model`` takes (its config's positions), None if it says none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                        trust_remote_code=model.trust_remote_code)
    return position_limit(config.to_dict())


def longest(spec: DataSpec, tokenizer, add_eos: bool, limit: int | None = None) -> tuple[int, int]:
    """``(tokens, row)`` of the longest of the first ``limit`` rows of ``spec``, as tokenized
    for the pipeline (EOS where ``add_eos``)."""
    best = (0, 0)
    rows = records.load_records(spec)
    for row in range(len(rows) if limit is None else min(limit, len(rows))):
        record = rows[row]
        if any(record.get(c) is None for c in data.text_columns(spec)):
            continue
        ids, _ = data.tokenize_content(data.content_of(record, spec), tokenizer, spec, add_eos)
        best = max(best, (len(ids), row))
    return best


@dataclass(frozen=True)
class Lengths:
    """``max_length`` of the corpus and of the queries, and what they came from."""

    corpus: int
    queries: int
    positions: int | None
    longest_document: int
    pad_token: str | None  # ``eos`` when the tokenizer has no pad token (``model.pad_token``)


def default_lengths(model: ModelSpec, corpus: DataSpec, queries: DataSpec) -> Lengths:
    """Lengths from the model and the data (module docstring); raises :class:`QuickstartError`
    naming the query longer than the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision,
                                              trust_remote_code=model.trust_remote_code)
    positions = model_positions(model)
    doc_tokens, _ = longest(corpus, tokenizer, add_eos=True, limit=SAMPLE_DOCUMENTS)
    query_tokens, row = longest(queries, tokenizer, add_eos=False)
    if positions is not None and query_tokens > positions:
        raise QuickstartError(f"{records.RowLocator(queries)(row)}: this query is {query_tokens} tokens long, but the "
                              f"model takes at most {positions} positions; shorten it or use a model with "
                              "longer positions.")
    cap = positions or 512
    return Lengths(corpus=max(2, min(cap, doc_tokens)), queries=max(2, min(cap, query_tokens)),
                   positions=positions, longest_document=doc_tokens,
                   pad_token="eos" if tokenizer.pad_token is None and tokenizer.eos_token is not None else None)


def pipeline_name(corpus_path: str) -> str:
    """A valid pipeline name from the corpus path (``my-data.jsonl`` -> ``my_data``)."""
    stem = re.sub(r"\W+", "_", Path(corpus_path.rstrip("/")).stem).strip("_") or "mine"
    name = stem if stem[0].isalpha() else f"p_{stem}"
    return f"{name}_data" if name == "demo" else name


def pipeline_entry(name: str, model: ModelSpec, corpus: DataSpec, queries: DataSpec,
                   **sections: Any) -> dict[str, Any]:
    """The pipelines-YAML mapping of a pipeline: only the settings that differ from the defaults,
    so the user sees what was chosen (``sections``: e.g. ``shard_size``, ``gradients``)."""
    if not NAME_RE.match(name) or name == "demo":
        raise QuickstartError(f"Pipeline name {name!r} must be letters, digits and underscores, starting with a "
                              "letter, and not `demo`; pass --name.")

    def changed(value, default) -> dict[str, Any]:
        return {k: v for k, v in vars(value).items() if v != getattr(default, k)}

    entry = {"name": name, "model": changed(model, ModelSpec()), "corpus": changed(corpus, DataSpec()),
             "queries": changed(queries, DataSpec())}
    return {**entry, **{k: v for k, v in sections.items() if v is not None}}


def save_pipeline_entry(path: Path, entry: dict[str, Any]) -> str:
    """Add ``entry`` to the pipelines YAML at ``path`` (made if missing), replacing a pipeline of
    the same name; written atomically. Returns ``added`` or ``replaced``. (Comments in an
    existing file are not kept: PyYAML reads data only.)"""
    raw: dict[str, Any] = {"pipelines": []}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {"pipelines": []}
        if not isinstance(raw, dict) or not isinstance(raw.get("pipelines"), list):
            raise QuickstartError(f"{path}: expected a top-level `pipelines:` list; fix it or pass --pipelines "
                                  "with another file.")
    names = [p.get("name") if isinstance(p, dict) else None for p in raw["pipelines"]]
    if entry["name"] in names:
        raw["pipelines"][names.index(entry["name"])] = entry
        how = "replaced"
    else:
        raw["pipelines"].append(entry)
        how = "added"
    write_text_atomic(path, yaml.safe_dump(raw, sort_keys=False))
    return how


def entry_yaml(entry: dict[str, Any]) -> str:
    return yaml.safe_dump({"pipelines": [entry]}, sort_keys=False)
