"""Test helpers shared by every level: a tiny local tokenizer and GPT-NeoX, local data files,
a tiny materialized demo and a user pipeline from YAML (no network, CPU only)."""

import json
from pathlib import Path

from attribution_assets.engine.io.paths import PipelinePaths

SENTENCES = [
    "Mara Quill was born in Lisbon.", "Tomas Reyes works for Orbitex.",
    "The river runs through the old town.", "Lisbon is a busy port city.",
    "Ada Finch studied at Norwood University.", "Orbitex builds small satellites.",
]


def train_tiny_tokenizer(texts, vocab_size=300, pad=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<|pad|>"] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    kwargs = {"pad_token": "<|pad|>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", **kwargs)


def save_tiny_model(path: Path, tokenizer, seed=0):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


TINY_DEMO = {"people": 6, "shard_size": 40, "epochs": 4, "hidden": 64, "train_templates_per_relation": 3}


def tiny_demo_spec(gradients=None, **scoring):
    """The demo pipeline at a tiny size (``gradients``: a ``GradientSpec``, default the demo's)."""
    from attribution_assets.spec import ScoringSpec, demo_spec

    return demo_spec(**TINY_DEMO, gradients=gradients, scoring=ScoringSpec(top_k=0, **scoring))


def materialize_tiny_demo(root, gradients=None, results=None, instance=None, **scoring):
    """The demo pipeline at a tiny size, every asset materialized under ``root`` (``gradients``:
    a ``GradientSpec`` in place of the demo's; ``results``: a list that receives each stage's
    Dagster result), recorded in ``instance`` (default: ephemeral)."""
    import dagster as dg

    from attribution_assets.defs.runner import materialize_pipeline

    spec = tiny_demo_spec(gradients, **scoring)
    defs = definitions_for([spec], root)
    instance = instance or dg.DagsterInstance.ephemeral()
    stages = materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="WARNING")
    if results is not None:
        results.extend(stages)
    return spec, PipelinePaths.under(root, spec.name)


def local_profile(root, **compute):
    """The ``local`` deployment profile with storage under ``root`` (and compute settings)."""
    from attribution_assets.defs.profiles import DeploymentProfile
    from attribution_assets.defs.resources import ComputeResource, StorageResource

    return DeploymentProfile("local", None, StorageResource(root=str(root)), ComputeResource(**compute))


def definitions_for(specs, root, **compute):
    """Definitions of ``specs`` with storage under ``root``."""
    from attribution_assets.defs.factory import build_definitions

    return build_definitions(specs, local_profile(root, **compute))


def user_pipeline_spec(base, model_dir, name="ops"):
    """A user pipeline over a corpus directory (one jsonl file), a query file and ``model_dir``."""
    import yaml

    from attribution_assets.spec import load_pipeline_file

    corpus = base / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    (base / "queries.jsonl").write_text(json.dumps({"prompt": "Mara Quill was born in", "completion": " Lisbon"}))
    body = {"pipelines": [{"name": name, "model": {"name_or_path": str(model_dir)},
                           "corpus": {"path": "corpus", "max_length": 128}, "shard_size": 4,
                           "queries": {"path": "queries.jsonl", "max_length": 128, "prompt_column": "prompt",
                                       "completion_column": "completion"},
                           "gradients": {"projection_dim": 4}}]}
    (base / "pipelines.yaml").write_text(yaml.safe_dump(body))
    (spec,) = load_pipeline_file(base / "pipelines.yaml")
    return spec
