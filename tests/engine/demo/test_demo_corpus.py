"""Tests of the synthetic demo corpus generator."""

import pytest

from attribution_assets.engine.demo.corpus import (
    QUERY_TEMPLATES,
    TRAIN_TEMPLATES,
    generate_demo_corpus,
)
from attribution_assets.spec import DemoSpec, SpecValueError


@pytest.fixture(scope="module")
def corpus():
    return generate_demo_corpus(DemoSpec(people=30))


def test_deterministic_per_seed():
    a = generate_demo_corpus(DemoSpec(people=20, seed=3))
    b = generate_demo_corpus(DemoSpec(people=20, seed=3))
    c = generate_demo_corpus(DemoSpec(people=20, seed=4))
    assert a.documents == b.documents
    assert a.queries == b.queries
    assert a.training_prompts == b.training_prompts
    assert a.documents != c.documents


def test_default_sizes():
    corpus = generate_demo_corpus()
    counts, templates = corpus.counts(), DemoSpec().train_templates_per_relation
    assert counts["fact"] == 100 * 4 * templates
    assert counts["hard_distractor"] == 100 * 4
    assert counts["queries"] == 100 * 4
    assert counts["distractor"] > 0
    assert counts["introduction"] == 25 * 2  # alias_fraction 0.25, two introductions each
    assert sum(q["alias"] for q in corpus.queries) == 25
    assert len({q["person"] for q in corpus.queries}) == 100
    small = generate_demo_corpus(DemoSpec(people=5, relations=("employer",)))
    assert small.counts()["fact"] == 5 * templates
    assert {d["relation"] for d in small.documents if d["kind"] != "introduction"} == {"employer"}


def test_ids_unique_and_kinds(corpus):
    ids = [d["doc_id"] for d in corpus.documents]
    assert len(set(ids)) == len(ids)
    assert len({q["query_id"] for q in corpus.queries}) == len(corpus.queries)
    assert {d["kind"] for d in corpus.documents} == {"fact", "distractor", "hard_distractor", "introduction"}
    assert set(corpus.documents[0]) == {"doc_id", "text", "kind", "person", "relation", "answer"}


def test_gold_documents(corpus):
    by_id = {d["doc_id"]: d for d in corpus.documents}
    gold_count: dict[str, int] = {}
    for q in corpus.queries:
        assert len(q["gold_doc_ids"]) == corpus.config.train_templates_per_relation
        for doc_id in q["gold_doc_ids"]:
            doc = by_id[doc_id]
            assert doc["kind"] == "fact"
            assert doc["relation"] == q["relation"]
            # an alias fact names its person only through the alias: no word of the name
            assert (q["person"] in doc["text"]) != q["alias"]
            if q["alias"]:
                assert not set(q["person"].split()) & set(doc["text"].rstrip(".").split())
            assert doc["text"].endswith(f" {q['answer']}.")
            gold_count[doc_id] = gold_count.get(doc_id, 0) + 1
    facts = [d["doc_id"] for d in corpus.documents if d["kind"] == "fact"]
    assert sorted(gold_count) == sorted(facts)
    assert set(gold_count.values()) == {1}


def test_distractors(corpus):
    gold = {i for q in corpus.queries for i in q["gold_doc_ids"]}
    facts = {(q["person"], q["relation"]): q["answer"] for q in corpus.queries}
    hard = [d for d in corpus.documents if d["kind"] == "hard_distractor"]
    assert hard
    for doc in hard:
        assert doc["doc_id"] not in gold
        assert doc["person"] in doc["text"] and doc["answer"] in doc["text"]
        assert facts[(doc["person"], doc["relation"])] == doc["answer"]
    for doc in corpus.documents:
        if doc["kind"] == "distractor":
            assert doc["person"] is None and doc["answer"] in doc["text"]
            assert not any(q["person"] in doc["text"] for q in corpus.queries)


def test_aliases_are_introduced_with_the_name(corpus):
    intros = [d for d in corpus.documents if d["kind"] == "introduction"]
    aliased = [q for q in corpus.queries if q["alias"]]
    assert len(aliased) == round(0.25 * 30) and len({q["person"] for q in aliased}) == len(aliased)
    by_id = {d["doc_id"]: d for d in corpus.documents}
    for q in aliased:
        alias = {d["answer"] for d in intros if d["person"] == q["person"]}
        assert len(alias) == 1 and len([d for d in intros if d["person"] == q["person"]]) == 2
        for doc_id in q["gold_doc_ids"]:
            assert f"the {next(iter(alias))}" in by_id[doc_id]["text"].lower()
            assert by_id[doc_id]["text"][0].isupper()
    assert len({d["answer"] for d in intros}) == len(aliased)  # one alias per person
    plain = generate_demo_corpus(DemoSpec(people=30, alias_fraction=0.0))
    assert plain.counts()["introduction"] == 0 and not any(q["alias"] for q in plain.queries)


def test_template_variant_uses_other_phrasings():
    a = generate_demo_corpus(DemoSpec(people=10, train_templates_per_relation=4))
    b = generate_demo_corpus(DemoSpec(people=10, train_templates_per_relation=4, template_variant=1))
    strip = lambda corpus: {p.replace(d["person"], "{n}") for (p, _), d in  # noqa: E731
                            zip(corpus.training_prompts, [d for d in corpus.documents if d["kind"] == "fact"])
                            if d["person"] in p}
    assert strip(a) and not strip(a) & strip(b)
    queries = lambda corpus: {q["prompt"].replace(q["person"], "{n}") for q in corpus.queries}  # noqa: E731
    assert not queries(a) & queries(b)


def test_query_format(corpus):
    for q in corpus.queries:
        assert q["prompt"] == q["prompt"].rstrip()
        assert q["completion"] == f" {q['answer']}"
        assert q["text"] == q["prompt"] + q["completion"]


def test_query_phrasings_are_held_out(corpus):
    train_prompts = {p for p, _ in corpus.training_prompts}
    for q in corpus.queries:
        assert q["prompt"].split("A: ", 1)[1] not in train_prompts
    for relation, templates in QUERY_TEMPLATES.items():
        answers = {t.split("A: ", 1)[1] + " {a}." for t in templates}
        assert not answers & set(TRAIN_TEMPLATES[relation])


def test_training_prompts_are_unambiguous():
    prompts = [t.removesuffix(" {a}.") for ts in TRAIN_TEMPLATES.values() for t in ts]
    assert all(t.endswith(" {a}.") for ts in TRAIN_TEMPLATES.values() for t in ts)
    for i, a in enumerate(prompts):
        for j, b in enumerate(prompts):
            assert i == j or not b.startswith(a), (a, b)


def test_training_prompts(corpus):
    facts = [d for d in corpus.documents if d["kind"] == "fact"]
    assert len(corpus.training_prompts) == len(facts)
    for (prompt, completion), doc in zip(corpus.training_prompts, facts):
        assert prompt + completion + "." == doc["text"]
        assert completion == f" {doc['answer']}" and prompt == prompt.rstrip()


def test_config_validation():
    with pytest.raises(SpecValueError, match="relations"):
        DemoSpec(relations=("shoe_size",))
    with pytest.raises(ValueError, match="demo.train_templates_per_relation"):
        generate_demo_corpus(DemoSpec(train_templates_per_relation=99))
    with pytest.raises(SpecValueError, match="people"):
        DemoSpec(people=0)
    with pytest.raises(SpecValueError, match="alias_fraction"):
        DemoSpec(alias_fraction=1.5)
    with pytest.raises(ValueError, match="demo.alias_introductions"):
        generate_demo_corpus(DemoSpec(alias_introductions=9))
