"""Helpers shared by the tests (fixtures are in conftest.py): small model shapes, data and trainer builders."""

import json

import numpy as np
import torch

import checkpoint
from configs import ModelConfig, TrainConfig
from model import GPT
from trainers import PretrainTrainer

# A small model so a training test runs in about a second on 2 CPU cores.
TINY_MODEL = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)
SFT_MODEL = {**TINY_MODEL, "max_seq_len": 64}
# A model with its own vocabulary for the model and generation tests (no tokenizer needed).
SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
NAMES, THINGS = ["Tom", "Mia", "Ben", "Lily"], ["ball", "cat", "kite", "cake"]


def sample_text(n: int = 400, seed: int = 0) -> list[str]:
    """Simple repetitive sentences: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(NAMES)} has a {rng.choice(THINGS)}. The {rng.choice(THINGS)} is red." for _ in range(n)]


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


def make_checkpoint(directory, tokenizer, stage: str, max_seq_len: int = 64):
    """A randomly initialised tiny checkpoint (seed 0), as if `stage` had written it at step 0."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "max_seq_len": max_seq_len}))
    checkpoint.save_checkpoint(directory, model, tokenizer, {"stage": stage, "step": 0})
    return directory


def make_trainer(data_dir, out_dir, model: dict | None = None, **train) -> PretrainTrainer:
    """A pretraining run of the tiny model on the data_dir fixture: 16 steps of 4 x 32 tokens by default."""
    cfg = TrainConfig(**{**dict(data_dir=str(data_dir), out_dir=str(out_dir), preset="tiny", device="cpu",
                                batch_size=4, seq_len=32, max_steps=16, warmup_steps=2, lr=3e-3,
                                eval_interval=8, eval_iters=2, log_interval=4, save_interval=8), **train})
    return PretrainTrainer(cfg, {**TINY_MODEL, **(model or {})})


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
