"""Asking one question (the Launchpad job's engine): the Attributor's top-k documents, each with
word shares that sum to its score, the gold documents marked and the first gold rank of the score
tables; clear errors for a malformed question."""

import numpy as np
import pytest

from attribution_assets.engine.explain.ask import ask
from attribution_assets.engine.io.corpus import read_queries
from attribution_assets.engine.scoring.database import first_gold_rank
from attribution_assets.engine.search.attributor import Attributor


@pytest.fixture(scope="module")
def attributor(tiny_demo):
    spec, paths = tiny_demo
    return Attributor(spec, paths, use_index=False)


def test_a_query_id_gets_the_attributors_top_k_with_word_shares(one_thread, tiny_demo, attributor):
    spec, paths = tiny_demo
    query = next(q for q in read_queries(paths.queries) if q["gold_doc_ids"])
    expl = ask(attributor, 4, query_id=query["doc_id"])
    assert expl.prompt and expl.answer and expl.prompt + expl.answer in (query["text"], query["text"] + " ")
    hits = attributor.search([(expl.prompt, expl.answer)], 4)[0]
    assert [d.doc_id for d in expl.documents] == [h.doc_id for h in hits]
    for doc, hit in zip(expl.documents, hits):
        assert doc.score == pytest.approx(hit.score, abs=1e-6)
        assert doc.recomputed == pytest.approx(hit.score, abs=1e-4)  # the shares sum to the score
        assert sum(c for _, c in doc.words()) == pytest.approx(doc.recomputed - sum(
            c for c, s in zip(doc.contributions, doc.special) if s), abs=1e-9)
        assert "<|endoftext|>" not in "".join(w for w, _ in doc.words())
        assert doc.gold == (doc.doc_id.split("#")[0] in set(query["gold_doc_ids"]))
    expected = first_gold_rank(paths.database, query["doc_id"])
    assert (expl.first_gold[0] if expl.first_gold else None) == expected


def test_a_new_prompt_has_no_gold_and_errors_name_the_fix(one_thread, attributor):
    expl = ask(attributor, 2, prompt="Mara Quill was born in", completion=" Lisbon")
    assert expl.gold_doc_ids is None and expl.first_gold is None and len(expl.documents) == 2
    assert np.isfinite([d.score for d in expl.documents]).all()
    with pytest.raises(ValueError, match="got both"):
        ask(attributor, 2, prompt="x y", query_id="demo-q-1")
    with pytest.raises(ValueError, match="got neither"):
        ask(attributor, 2)
    with pytest.raises(KeyError, match="is not one of the pipeline's"):
        ask(attributor, 2, query_id="nope")
