"""The demo pipeline's tokenizer and model, built from its corpus table into its storage."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from attribution_assets.engine.demo.corpus import generate_demo_corpus
from attribution_assets.engine.demo.model import train_demo_model, train_demo_tokenizer
from attribution_assets.engine.io.atomic import atomic_dir, write_text_atomic
from attribution_assets.engine.io.corpus import read_documents, read_queries
from attribution_assets.engine.io.digests import model_fingerprint
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec


def build_demo_tokenizer(spec: PipelineSpec, paths: PipelinePaths):
    """Train the demo's byte-level BPE tokenizer on the corpus and save it (atomically)."""
    texts = [d["text"] for d in read_documents(paths.documents)]
    tokenizer = train_demo_tokenizer(texts, spec.demo.vocab_size, spec.demo.max_position_embeddings)
    with atomic_dir(paths.tokenizer) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def build_demo_model(spec: PipelineSpec, paths: PipelinePaths,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo model on every corpus document (recording train-time document rows
    with the pipeline's ``gradients`` settings when ``demo.record_epochs`` >= 1); report fact accuracy on
    both phrasings and write the model record (``model.json``: source, fingerprint, size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    documents = read_documents(paths.documents)
    texts = [d["text"] for d in documents]
    corpus = generate_demo_corpus(spec.demo)
    held_out = [(json.loads(q["content"])["prompt"], json.loads(q["content"])["completion"])
                for q in read_queries(paths.queries)]
    metrics = train_demo_model(tokenizer, texts, spec.demo, paths.model, log=log,
                               eval_pairs={"train_phrasing": corpus.training_prompts,
                                           "held_out_phrasing": held_out},
                               record=dataclasses.replace(spec.gradients, per_token="none"),
                               doc_ids=[d["doc_id"] for d in documents])
    model = AutoModelForCausalLM.from_pretrained(paths.model)
    record = {"source": str(paths.model), "fingerprint": model_fingerprint(model),
              "parameters": int(sum(p.numel() for p in model.parameters())),
              "architecture": type(model).__name__}
    write_text_atomic(paths.model_record, json.dumps(record, indent=2))
    return {**metrics, **record}
