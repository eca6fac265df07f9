"""Shared fixtures: a tiny prepared data set, made in a temp dir (no network, no generated files kept)."""

import json

import numpy as np
import pytest
import torch

import checkpoint
from configs import ModelConfig
from model import GPT
from tokenizer import Tokenizer


def crash_during_step(trainer, step: int, error: BaseException) -> None:
    """Make trainer raise `error` while drawing the first micro-batch of optimizer step `step` (0-based),
    as a crash or a Ctrl-C in the middle of training would (grad_accum 1)."""
    original, calls = trainer.next_batch, {"n": 0}

    def next_batch():
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise error
        return original()

    trainer.next_batch = next_batch


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


# ----------------------------------------------------------------------------- fine-tuning fixtures
SFT_MODEL = {**TINY_MODEL, "max_seq_len": 64}
NAMES, THINGS = ["Tom", "Mia", "Ben", "Lily"], ["ball", "cat", "kite", "cake"]


def make_chats(n: int, seed: int) -> list[dict]:
    """Learnable chats: the answer repeats the thing named in the question."""
    rng = np.random.default_rng(seed)
    chats = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        chats.append({"conversations": [{"role": "user", "content": f"{name} has a {thing}. What is it?"},
                                        {"role": "assistant", "content": f"The {thing}."}]})
    return chats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture
def sft_dirs(tmp_path, tokenizer, data_dir):
    """A random-init 'pretrain' checkpoint and train/val chat files."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **SFT_MODEL))
    checkpoint.save_checkpoint(tmp_path / "pretrain", model, tokenizer, {"stage": "pretrain", "step": 0})
    write_jsonl(tmp_path / "train.jsonl", make_chats(200, 0))
    write_jsonl(tmp_path / "val.jsonl", make_chats(24, 1))
    return tmp_path
