"""Shared fixtures: a tiny prepared data set, made in a temp dir (no network, no generated files kept)."""

import json

import numpy as np
import pytest

from tokenizer import Tokenizer

# A small model so a training test runs in about a second on 2 CPU cores.
TINY_MODEL = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)


def sample_text(n: int = 400, seed: int = 0) -> list[str]:
    """Simple repetitive sentences: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    names, things = ["Tom", "Mia", "Ben", "Lily"], ["ball", "cat", "kite", "cake"]
    return [f"{rng.choice(names)} has a {rng.choice(things)}. The {rng.choice(things)} is red." for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(sample_text(), vocab_size=320)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer):
    """A directory laid out as prepare.py writes it: train.bin, val.bin, meta.json, the tokenizer."""
    d = tmp_path_factory.mktemp("data")
    for split, seed in (("train", 0), ("val", 1)):
        ids = []
        for doc in sample_text(600 if split == "train" else 100, seed):
            ids += tokenizer.encode(doc) + [tokenizer.eot_id]
        np.array(ids, dtype=np.uint16).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tokenizer.vocab_size}))
    tokenizer.save_pretrained(d)
    return d
