"""Shared fixtures: a tiny tokenizer and a tiny random checkpoint directory, built once per test session."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from the hub in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import checkpoint  # noqa: E402
import modern_llm  # noqa: E402
import prepare_data  # noqa: E402

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "def add(a, b):\n    return a + b\n",
    "Héllo wörld, ünïcödé and emoji 🎉 and 日本語 text.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return prepare_data.train_tokenizer(SAMPLE_TEXT, vocab_size=400)


def make_checkpoint(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A tiny random model saved with our code, tokenizer included: a complete checkpoint directory."""
    torch.manual_seed(seed)
    cfg = modern_llm.model_preset("tiny", vocab_size=len(tokenizer), **overrides)
    model = modern_llm.LLM(cfg)
    ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    return checkpoint.save_checkpoint(model, path, extra=tokenizer.save_pretrained, token_ids=ids)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module that trains: two threads fighting other processes for two cores run far
    slower. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
