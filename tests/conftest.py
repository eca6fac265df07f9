"""Shared fixtures: a tiny prepared data set, made in a temp dir (no network, no generated files kept)."""

import pytest

from tests.helpers import make_chats, make_checkpoint, sample_text, write_data_dir, write_jsonl
from tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(sample_text(), vocab_size=320)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer):
    """A directory laid out as prepare.py writes it: train.bin, val.bin, meta.json, the tokenizer."""
    return write_data_dir(tmp_path_factory.mktemp("data"), tokenizer)


@pytest.fixture
def sft_dirs(tmp_path, tokenizer, data_dir):
    """A random-init 'pretrain' checkpoint and train/val chat files."""
    make_checkpoint(tmp_path / "pretrain", tokenizer, "pretrain")
    write_jsonl(tmp_path / "train.jsonl", make_chats(200, 0))
    write_jsonl(tmp_path / "val.jsonl", make_chats(24, 1))
    return tmp_path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the `datasets` library's cache (lock files even when streaming) inside the test's temp dir."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
