"""Fixtures shared by every level (helpers in ``tests/helpers.py``); offline, quiet Hugging Face."""

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

from tests.helpers import SENTENCES, materialize_tiny_demo, save_tiny_model, train_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny matmuls only add contention on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer(SENTENCES * 3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(path, tiny_tokenizer)
    return path


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``(spec, PipelinePaths)`` of a fully materialized tiny demo (stored mode), shared."""
    return materialize_tiny_demo(tmp_path_factory.mktemp("tiny-demo"))




def pytest_collection_modifyitems(config, items):
    """Files with a ``slow`` test run first (stable order otherwise): pytest-xdist's ``loadfile``
    hands files out in collection order, so the longest start first and the short ones fill the
    gaps, instead of one long file running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
