"""Ask one question: its top-k training documents through the Attributor (the code path of
``attribution query``) and each document's word shares (``tokens.explain_documents``) against
the same prepared query row, so the shares sum to the scores the Attributor returns.

A question is a ``(prompt, completion)`` pair (loss on the completion), a plain text, or the id
of one of the pipeline's queries (its own prompt and completion, its gold documents marked and
its first gold rank read from the score tables).
"""

from __future__ import annotations

import json

from attribution_assets.engine.explain.tokens import (
    Explanation,
    explain_documents,
    first_gold_rank,
    positional_collector,
    query_parts,
    shard_of,
)
from attribution_assets.engine.io.corpus import read_queries
from attribution_assets.engine.search.attributor import Attributor


def resolve_question(attributor: Attributor, prompt: str = "", completion: str = "",
                     query_id: str = "") -> tuple[str, str, str, list[str] | None]:
    """``(label, prompt, completion, gold doc ids or None)`` of a question given as a prompt (and
    completion) or as the id of a pipeline query; a clear error for neither, both, or an unknown id."""
    if bool(query_id.strip()) == bool(prompt.strip()):
        raise ValueError("Give either `prompt` (and optionally `completion`) or `query_id`; got "
                         f"{'both' if query_id.strip() else 'neither'}.")
    if not query_id:
        return "question", prompt, completion, None
    table = {q["doc_id"]: q for q in read_queries(attributor.paths.queries)}
    if query_id not in table:
        known = sorted(table)[:3]
        raise KeyError(f"Query {query_id!r} is not one of the pipeline's {len(table)} queries (e.g. {known}); "
                       "`SELECT query_id FROM queries` in the pipeline's DuckDB lists them.")
    query = table[query_id]
    prompt, completion = query_parts(json.loads(query["content"]))
    return query_id, prompt, completion, list(query["gold_doc_ids"]) if query.get("gold_doc_ids") else None


def ask(attributor: Attributor, k: int = 10, prompt: str = "", completion: str = "",
        query_id: str = "") -> Explanation:
    """The top ``k`` documents of one question (:func:`resolve_question`) with word shares."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    label, prompt, completion, gold = resolve_question(attributor, prompt, completion, query_id)
    question = (prompt, completion) if completion else prompt
    rows = attributor.query_rows([question])
    hits = attributor.top_k_rows(rows, k)[0]
    spec, paths = attributor.spec, attributor.paths
    shards = shard_of(paths, [h.doc_id for h in hits])
    ranked = [{"doc_id": h.doc_id, "shard": shards[h.doc_id], "score": h.score} for h in hits]
    documents = explain_documents(spec, paths, attributor.prepared(rows)[0], ranked, attributor.tokenizer,
                                  positional_collector(attributor.model, spec, paths), attributor.preconditioner,
                                  gold)
    return Explanation(spec.name, label, prompt + completion, spec.scoring.metric, gold, documents, prompt,
                       completion, first_gold_rank(paths, query_id, gold) if gold else None)
