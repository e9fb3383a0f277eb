"""The embedded synthetic demo's corpus generator and model: :class:`DemoSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from attribution_assets.spec.checks import (
    SpecValueError,
    _check_float,
    _check_int,
    _check_strings,
)

DEMO_RELATIONS = ("birthplace", "employer", "university", "birth_year")
DEMO_OTHER_RELATIONS = ("instrument", "sport", "pet", "dish")  # a second vocabulary of relations


@dataclass(frozen=True)
class DemoSpec:
    """The embedded synthetic demo: its corpus generator and its GPT-NeoX (``engine.demo``).

    Corpus: ``people`` fictional people with one fact per relation, each stated in
    ``train_templates_per_relation`` phrasings; queries use ``query_templates_per_relation``
    held-out phrasings; ``distractors`` entity sentences per answer value and
    ``hard_distractors`` same-person/same-answer sentences per fact; for ``alias_fraction`` of
    the people one fact is stated only through an alias that ``alias_introductions`` documents
    tie to the name; ``template_variant`` 1 takes the phrasings from the other end of the
    template lists (a corpus to test settings on that they were not tuned on). ``relations``:
    any of ``DEMO_RELATIONS`` (the default) and ``DEMO_OTHER_RELATIONS`` (other relations, answers
    and phrasings). ``names``: 0 the demo's name pools, 1 a second, disjoint pair.
    Model: architecture, AdamW settings and epochs; ``seed`` seeds both the corpus and the model's init/data order.
    ``record_epochs``: during the last this many epochs the model's own training records
    train-time gradient rows (``engine.training.recorder.TrainTimeRecorder`` with the
    pipeline's ``gradients`` settings, normalized by the live AdamW state; one shard per epoch,
    in the model's directory), which ``scoring.train_rows: train_time`` scores with and the
    ``train_time_fact_tracing`` asset evaluates; 0 = off. The trained model is the same either way.
    """

    people: int = 100
    seed: int = 0
    relations: tuple[str, ...] = DEMO_RELATIONS
    train_templates_per_relation: int = 12
    query_templates_per_relation: int = 2
    distractors: int = 1
    hard_distractors: int = 1
    alias_fraction: float = 0.25
    alias_introductions: int = 2
    template_variant: int = 0
    names: int = 0
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    max_position_embeddings: int = 64
    vocab_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    batch_size: int = 32
    epochs: int = 12
    log_every: int = 100
    record_epochs: int = 0

    def __post_init__(self):
        _check_strings(self, "relations")
        unknown = sorted(set(self.relations) - set(DEMO_RELATIONS + DEMO_OTHER_RELATIONS))
        if unknown:
            raise SpecValueError("relations", f"has unknown relations {unknown}; choose from "
                                              f"{list(DEMO_RELATIONS + DEMO_OTHER_RELATIONS)}.")
        if len(set(self.relations)) != len(self.relations):
            raise SpecValueError("relations", f"lists a relation twice: {list(self.relations)}.")
        for key in ("people", "layers", "hidden", "heads", "intermediate", "max_position_embeddings",
                    "batch_size", "epochs", "log_every", "train_templates_per_relation",
                    "query_templates_per_relation"):
            _check_int(self, key, 1)
        for key in ("seed", "warmup_steps", "distractors", "hard_distractors", "alias_introductions"):
            _check_int(self, key, 0)
        _check_float(self, "alias_fraction", 0.0, 1.0)
        _check_int(self, "template_variant", 0, 1)
        _check_int(self, "names", 0, 1, note=" (0 = the demo's name pools, 1 = the second pools)")
        _check_int(self, "vocab_size", 260, note=" (the byte alphabet plus special tokens)")
        _check_float(self, "lr", 0.0, low_open=True)
        _check_float(self, "weight_decay", 0.0)
        if self.hidden % self.heads:
            raise SpecValueError("heads", f"must divide hidden ({self.hidden}), got {self.heads}.")
        _check_int(self, "record_epochs", 0, note=" (0 = no train-time rows)")
        if self.record_epochs > self.epochs:
            raise SpecValueError("record_epochs", f"is {self.record_epochs}, more than the {self.epochs} "
                                                  "training epochs: set it to at most `epochs` (0 = off).")
