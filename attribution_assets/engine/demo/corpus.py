"""Synthetic corpus of facts about fictional people: the embedded default ("demo") data.

Every fact ``(person, relation, answer)`` is stated by several training paraphrases
(kind ``"fact"``); each ends with the answer as the last word before the final period,
e.g. ``"Alice Varga was born in Lisbon."``. Queries use *different*, held-out
paraphrases (no query sentence is a training sentence, but their relation words, such as
"hometown", also occur in training sentences of the same relation), split into a ``prompt`` that does not end in whitespace and a
``completion`` that starts with a space (``" Lisbon"``), which is how byte-level BPE
tokenizes the answer inside a training document. The ``gold_doc_ids`` of a query are
all fact documents stating its fact.

Alias facts: for a share ``alias_fraction`` of the people, one fact (a seeded relation) is
stated in its training paraphrases only through an alias (``"The quiet cartographer was
born in Lisbon."``) that ``alias_introductions`` documents of kind ``"introduction"``
(``"Mara Quill is known to everyone as the quiet cartographer."``) tie to the name. The
query still names the person, so its gold documents share no name with it, and the model
can only answer by joining the two (queries carry ``alias: true``).

Two kinds of distractors make word overlap insufficient to find the gold documents:
``"distractor"`` sentences about an answer entity without any person
(``"Lisbon is a busy port city."``), and ``"hard_distractor"`` sentences naming the
SAME person and the SAME answer in a different relation
(``"Alice Varga once spent a holiday in Lisbon."``).

``names: 1`` draws the people from a second pair of name pools (no name shared with the
first), and ``DEMO_OTHER_RELATIONS`` (instrument, sport, pet, dish) are a second set of relations
with their own answers and templates, built like the first: together a corpus with other
names, relations and phrasings than the demo's, for checking settings chosen on the demo.

``template_variant: 1`` takes the templates from the other end of each list: with the default
counts, other training phrasings and other (equally held-out) query phrasings, for a corpus
that settings were not tuned on.

Generation is deterministic: it uses only a ``random.Random(config.seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from attribution_assets.engine.demo.vocabulary import (
    ALIAS_ADJECTIVES,
    ALIAS_NOUNS,
    ANSWERS,
    DISTRACTOR_TEMPLATES,
    HARD_DISTRACTOR_TEMPLATES,
    INTRODUCTION_TEMPLATES,
    NAME_POOLS,
    QUERY_TEMPLATES,
    TRAIN_TEMPLATES,
)
from attribution_assets.engine.io.digests import text_id
from attribution_assets.spec import DemoSpec


def check_demo_corpus(demo: DemoSpec) -> None:
    """Raise ``ValueError`` naming the ``demo`` key when a count exceeds the template tables."""
    first, last = NAME_POOLS[demo.names]
    if demo.people > len(first) * len(last):
        raise ValueError(f"`demo.people` must be at most {len(first) * len(last)}, got {demo.people}")
    if demo.alias_introductions > len(INTRODUCTION_TEMPLATES):
        raise ValueError(f"`demo.alias_introductions` must be at most {len(INTRODUCTION_TEMPLATES)}, "
                         f"got {demo.alias_introductions}")
    if round(demo.alias_fraction * demo.people) > len(ALIAS_ADJECTIVES) * len(ALIAS_NOUNS):
        raise ValueError(f"`demo.alias_fraction` gives more aliased people than the "
                         f"{len(ALIAS_ADJECTIVES) * len(ALIAS_NOUNS)} aliases")
    fewest = lambda table: min(len(table[r]) for r in demo.relations)  # noqa: E731
    limits = {
        "train_templates_per_relation": (1, fewest(TRAIN_TEMPLATES)),
        "query_templates_per_relation": (1, fewest(QUERY_TEMPLATES)),
        "distractors": (0, fewest(DISTRACTOR_TEMPLATES)),
        "hard_distractors": (0, fewest(HARD_DISTRACTOR_TEMPLATES)),
    }
    for name, (low, high) in limits.items():
        if not low <= getattr(demo, name) <= high:
            raise ValueError(f"`demo.{name}` must be in {low}..{high}, got {getattr(demo, name)}")


@dataclass
class DemoCorpus:
    """Training documents, held-out queries and the training-phrasing splits.

    ``training_prompts[i]`` is the ``(prompt, completion)`` split of the i-th fact
    document (in the order of ``documents``), for accuracy on training phrasings.
    """

    config: DemoSpec
    documents: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    training_prompts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def query_pairs(self) -> list[tuple[str, str]]:
        """``(prompt, completion)`` of every query (held-out phrasings)."""
        return [(q["prompt"], q["completion"]) for q in self.queries]

    def counts(self) -> dict[str, int]:
        """Number of documents per kind, and of queries."""
        out = {kind: 0 for kind in ("fact", "distractor", "hard_distractor", "introduction")}
        for doc in self.documents:
            out[doc["kind"]] += 1
        out["queries"] = len(self.queries)
        return out


def doc_id_for(text: str) -> str:
    """Stable content-hash id of a document text."""
    return "demo-" + text_id(text, 12)


def split_fact(text: str, answer: str) -> tuple[str, str]:
    """Split a fact text ending in ``" {answer}."`` into ``(prompt, " {answer}")``."""
    suffix = f" {answer}."
    if not text.endswith(suffix):
        raise ValueError(f"fact text must end with {suffix!r}: {text!r}")
    return text[: -len(suffix)], f" {answer}"


def _variant(templates: tuple[str, ...], config: DemoSpec) -> tuple[str, ...]:
    """The template list in ``config.template_variant``'s order: 0 as written, 1 reversed (so
    the first ``k`` are the last ``k`` of variant 0: other phrasings for the same facts)."""
    return templates if config.template_variant == 0 else templates[::-1]


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _document(text: str, kind: str, person: str | None, relation: str, answer: str) -> dict:
    return {
        "doc_id": doc_id_for(text),
        "text": text,
        "kind": kind,
        "person": person,
        "relation": relation,
        "answer": answer,
    }


def generate_demo_corpus(config: DemoSpec | None = None) -> DemoCorpus:
    """Generate the demo corpus deterministically from ``config.seed``."""
    config = config or DemoSpec()
    check_demo_corpus(config)
    rng = random.Random(config.seed)
    first_names, last_names = NAME_POOLS[config.names]
    pairs = [(f, last) for f in first_names for last in last_names]
    people = [f"{f} {last}" for f, last in rng.sample(pairs, config.people)]

    documents: list[dict] = []
    queries: list[dict] = []
    used_answers: dict[str, set[str]] = {r: set() for r in config.relations}
    aliased = round(config.alias_fraction * len(people))
    alias_pool = [f"{a} {n}" for a in ALIAS_ADJECTIVES for n in ALIAS_NOUNS]
    aliases = dict(zip(people[:aliased], rng.sample(alias_pool, aliased)))
    for person in people:
        alias = aliases.get(person)
        alias_relation = rng.choice(config.relations) if alias else None
        if alias:
            documents += [
                _document(t.format(n=person, alias=alias), "introduction", person, "alias", alias)
                for t in INTRODUCTION_TEMPLATES[: config.alias_introductions]
            ]
        for relation in config.relations:
            answer = rng.choice(ANSWERS[relation])
            used_answers[relation].add(answer)
            subject = f"the {alias}" if relation == alias_relation else person
            facts = [
                _document(_capitalized(t.format(n=subject, a=answer)), "fact", person, relation, answer)
                for t in _variant(TRAIN_TEMPLATES[relation], config)[: config.train_templates_per_relation]
            ]
            hard = rng.sample(HARD_DISTRACTOR_TEMPLATES[relation], config.hard_distractors)
            documents += facts
            documents += [
                _document(t.format(n=person, a=answer), "hard_distractor", person, relation, answer)
                for t in hard
            ]
            prompt = rng.choice(
                _variant(QUERY_TEMPLATES[relation], config)[: config.query_templates_per_relation]
            ).format(n=person)
            queries.append(
                {
                    "query_id": f"demo-q-{_slug(person)}-{relation}",
                    "prompt": prompt,
                    "completion": f" {answer}",
                    "text": f"{prompt} {answer}",
                    "person": person,
                    "relation": relation,
                    "answer": answer,
                    "gold_doc_ids": [d["doc_id"] for d in facts],
                    "alias": relation == alias_relation,
                }
            )
    for relation in config.relations:
        for answer in sorted(used_answers[relation]):
            documents += [
                _document(t.format(a=answer), "distractor", None, relation, answer)
                for t in DISTRACTOR_TEMPLATES[relation][: config.distractors]
            ]

    rng.shuffle(documents)
    if len({d["doc_id"] for d in documents}) != len(documents):
        raise RuntimeError("duplicate document ids in the demo corpus")
    training_prompts = [
        split_fact(d["text"], d["answer"]) for d in documents if d["kind"] == "fact"
    ]
    return DemoCorpus(config, documents, queries, training_prompts)
