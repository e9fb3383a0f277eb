"""Tests of the synthetic demo corpus generator."""

import re

import pytest

from attribution_assets.engine.demo.corpus import generate_demo_corpus
from attribution_assets.engine.demo.vocabulary import (
    ANSWERS,
    DISTRACTOR_TEMPLATES,
    FIRST_NAMES,
    HARD_DISTRACTOR_TEMPLATES,
    LAST_NAMES,
    OTHER_FIRST_NAMES,
    OTHER_LAST_NAMES,
    QUERY_TEMPLATES,
    TRAIN_TEMPLATES,
)
from attribution_assets.engine.io.digests import json_digest
from attribution_assets.spec import DEMO_OTHER_RELATIONS, DEMO_RELATIONS, DemoSpec, SpecValueError

OTHER = DemoSpec(people=30, seed=11, names=1, relations=DEMO_OTHER_RELATIONS)


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


def test_default_corpus_is_unchanged():
    """The default corpus (and so the demo's doc ids) as generated before the second vocabulary."""
    corpus = generate_demo_corpus()
    assert [d["doc_id"] for d in corpus.documents[:3]] == [
        "demo-1eacde5fac28", "demo-e7d3a99a6c5d", "demo-39ccc841eb2b"]
    assert json_digest([corpus.documents, corpus.queries, corpus.training_prompts]) == "066643ffed5f6eef"
    heldout = generate_demo_corpus(DemoSpec(seed=7, template_variant=1))
    assert json_digest([heldout.documents, heldout.queries, heldout.training_prompts]) == "d56a4e1b50630a00"


def test_second_vocabulary_is_disjoint():
    assert len(OTHER_FIRST_NAMES) == len(OTHER_LAST_NAMES) == 25
    first, other = set(FIRST_NAMES) | set(LAST_NAMES), set(OTHER_FIRST_NAMES) | set(OTHER_LAST_NAMES)
    assert len(other) == 50 and not first & other
    assert not set(DEMO_RELATIONS) & set(DEMO_OTHER_RELATIONS)
    answers = lambda relations: {a for r in relations for a in ANSWERS[r]}  # noqa: E731
    assert not answers(DEMO_RELATIONS) & answers(DEMO_OTHER_RELATIONS)
    for relation in DEMO_OTHER_RELATIONS:
        assert 12 <= len(ANSWERS[relation]) <= 20 and len(set(ANSWERS[relation])) == len(ANSWERS[relation])
        assert all(a.isalpha() for a in ANSWERS[relation])  # one word: the last before the period
        assert len(TRAIN_TEMPLATES[relation]) == 12 and len(QUERY_TEMPLATES[relation]) == 4
        assert len(HARD_DISTRACTOR_TEMPLATES[relation]) == len(DISTRACTOR_TEMPLATES[relation]) == 2
        # 4 training phrasings per relation carry a word of a held-out query's answer part
        words = lambda text: set(re.findall(r"[a-z]+", text.lower())) - {"n", "a", "s"}  # noqa: E731
        query_words = set().union(*(words(t.split("A: ", 1)[1]) for t in QUERY_TEMPLATES[relation]))
        plain = set().union(*map(words, TRAIN_TEMPLATES[relation][:8]))
        assert all(words(t) & (query_words - plain) for t in TRAIN_TEMPLATES[relation][8:]), relation


def test_other_vocabulary_corpus():
    corpus = generate_demo_corpus(OTHER)
    names = {q["person"] for q in corpus.queries}
    assert len(names) == 30
    assert all(n.split()[0] in OTHER_FIRST_NAMES and n.split()[1] in OTHER_LAST_NAMES for n in names)
    demo_names = set(FIRST_NAMES) | set(LAST_NAMES)
    assert not any(set(d["text"].replace(",", " ").split()) & demo_names for d in corpus.documents)
    assert {q["relation"] for q in corpus.queries} == set(DEMO_OTHER_RELATIONS)
    counts = corpus.counts()
    assert counts["fact"] == 30 * 4 * 12 and counts["queries"] == 30 * 4
    assert counts["introduction"] == round(0.25 * 30) * 2 and sum(q["alias"] for q in corpus.queries) == 8
    by_id = {d["doc_id"]: d for d in corpus.documents}
    assert len(by_id) == len(corpus.documents)
    train_prompts = {p for p, _ in corpus.training_prompts}
    for q in corpus.queries:
        assert q["answer"] in ANSWERS[q["relation"]] and q["completion"] == f" {q['answer']}"
        assert q["text"] == q["prompt"] + q["completion"] and q["prompt"] == q["prompt"].rstrip()
        assert q["prompt"].split("A: ", 1)[1] not in train_prompts
        assert len(q["gold_doc_ids"]) == 12
        for doc_id in q["gold_doc_ids"]:
            doc = by_id[doc_id]
            assert (doc["kind"], doc["relation"], doc["answer"]) == ("fact", q["relation"], q["answer"])
            assert doc["text"].endswith(f" {q['answer']}.")
            assert (q["person"] in doc["text"]) != q["alias"]
    facts = {(q["person"], q["relation"]): q["answer"] for q in corpus.queries}
    for doc in corpus.documents:
        if doc["kind"] == "hard_distractor":
            assert facts[(doc["person"], doc["relation"])] == doc["answer"] in doc["text"]
        if doc["kind"] == "distractor":
            assert doc["answer"] in doc["text"] and not any(n in doc["text"] for n in names)
    # mixing the two vocabularies works too
    mixed = generate_demo_corpus(DemoSpec(people=10, relations=("birthplace", "pet")))
    assert {q["relation"] for q in mixed.queries} == {"birthplace", "pet"}


def test_no_prompt_is_a_prefix_of_another_relations_prompt():
    """Over both vocabularies, training prompts and the queries' answer parts: a prompt that
    started another relation's prompt would have two answers for the same person."""
    prompts = [(r, t.removesuffix(" {a}.")) for r, ts in TRAIN_TEMPLATES.items() for t in ts]
    prompts += [(r, t.split("A: ", 1)[1]) for r, ts in QUERY_TEMPLATES.items() for t in ts]
    for i, (ra, a) in enumerate(prompts):
        for j, (rb, b) in enumerate(prompts):
            assert i == j or ra == rb or not b.startswith(a), (a, b)


def test_vocabulary_validation():
    with pytest.raises(SpecValueError, match=r"relations.*unknown relations \['pets'\].*'instrument'"):
        DemoSpec(relations=("sport", "pets"))
    with pytest.raises(SpecValueError, match="relations.*twice"):
        DemoSpec(relations=("sport", "sport"))
    for bad in (2, -1, "1", True):
        with pytest.raises(SpecValueError, match="names.*0 = the demo's name pools"):
            DemoSpec(names=bad)
    with pytest.raises(ValueError, match="demo.people"):
        generate_demo_corpus(DemoSpec(people=626, names=1))
