"""Fact-tracing fixtures for the side-by-side with Bergson (``compare_trackstar.py``, issue #30).

A fixture is one seed of the demo's corpus generator in its held-out form (``template_variant:
1``: other training and query phrasings than the demo's), a small number of people with few
training phrasings per fact (about 1,000 documents and 240 queries at the defaults), a GPT-NeoX
trained on it from that seed's init and data order, and the tokens both tools see:

- ``docs.jsonl`` (``doc_id``, ``text``): the training documents, scored by both tools;
- ``queries.jsonl`` (``query_id``, ``prompt``, ``completion``, ``text``, ``gold_doc_ids``);
- ``model/``: ``save_pretrained`` model and tokenizer (the byte-level BPE adds no special
  tokens, so Bergson's ``tokenizer(text)`` and ours give the same ids; ours appends EOS to
  training documents, as the pipeline's corpus does).

Built with the engine alone (no Dagster): ``generate_demo_corpus`` and ``train_demo_model``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from attribution_assets.spec import DemoSpec

FIXTURE = {"people": 60, "train_templates_per_relation": 3, "template_variant": 1, "epochs": 16}


def fixture_spec(seed: int, **overrides) -> DemoSpec:
    """The fixture's :class:`DemoSpec` for ``seed`` (``FIXTURE`` settings, then ``overrides``)."""
    return DemoSpec(seed=seed, record_epochs=0, **{**FIXTURE, **overrides})


def build_fixture(root: Path, seed: int, log=print, **overrides) -> Path:
    """Build (or reuse) the fixture of ``seed`` under ``root/seed-<seed>``; returns that folder."""
    from attribution_assets.engine.demo.corpus import generate_demo_corpus
    from attribution_assets.engine.demo.model import train_demo_model, train_demo_tokenizer
    from attribution_assets.engine.io.atomic import write_text_atomic

    spec = fixture_spec(seed, **overrides)
    folder = Path(root) / f"seed-{seed}"
    settings = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if (folder / "fixture.json").is_file() and (folder / "fixture.json").read_text() == settings:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    corpus = generate_demo_corpus(spec)
    texts = [d["text"] for d in corpus.documents]
    tokenizer = train_demo_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
    metrics = train_demo_model(tokenizer, texts, spec, folder / "model", log=lambda _: None,
                               eval_pairs={"held_out_phrasing": corpus.query_pairs})
    log(f"seed {seed}: {len(texts)} documents, {len(corpus.queries)} queries, held-out accuracy "
        f"{metrics['held_out_phrasing_accuracy']:.3f}, trained in {metrics['train_seconds']:.0f} s")
    docs = [{"doc_id": d["doc_id"], "text": d["text"]} for d in corpus.documents]
    queries = [{k: q[k] for k in ("query_id", "prompt", "completion", "text", "gold_doc_ids")}
               for q in corpus.queries]
    write_text_atomic(folder / "docs.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    write_text_atomic(folder / "queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    write_text_atomic(folder / "fixture.json", settings)
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tokenized(folder: Path):
    """``(docs, queries_completion, queries_full, gold)``: ``(input_ids, loss_mask)`` pairs as the
    pipeline tokenizes them (documents: text + EOS, loss on every token but the first; queries:
    prompt/completion with loss on the completion, or the full text with loss on every token but
    the first) and ``gold[i]``: the document indices of query ``i``'s gold documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "model")
    docs, queries = read_jsonl(folder / "docs.jsonl"), read_jsonl(folder / "queries.jsonl")
    index = {d["doc_id"]: i for i, d in enumerate(docs)}

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=True)["input_ids"]

    doc_pairs = []
    for d in docs:
        x = ids(d["text"]) + [tok.eos_token_id]
        doc_pairs.append((x, [0] + [1] * (len(x) - 1)))
    completion, full = [], []
    for q in queries:
        p, c = ids(q["prompt"]), tok(q["completion"], add_special_tokens=False)["input_ids"]
        completion.append((p + c, [0] * len(p) + [1] * len(c)))
        x = ids(q["text"])
        full.append((x, [0] + [1] * (len(x) - 1)))
    gold = [[index[g] for g in q["gold_doc_ids"]] for q in queries]
    return doc_pairs, completion, full, gold
