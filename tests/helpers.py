"""Helpers shared by the tests (fixtures are in conftest.py): small model shapes, data and trainer builders."""

import json
import os
import socket
import subprocess
import sys

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


def write_data_dir(directory, tokenizer):
    """A directory laid out as prepare.py writes it (train.bin, val.bin, meta.json, the tokenizer), of sample_text."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("val", 1)):
        ids = []
        for doc in sample_text(600 if split == "train" else 100, seed):
            ids += tokenizer.encode(doc) + [tokenizer.eot_id]
        np.array(ids, dtype=np.uint16).tofile(directory / f"{split}.bin")
    (directory / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tokenizer.vocab_size}))
    tokenizer.save_pretrained(directory)
    return directory


def pretrain_config(data_dir, out_dir, **train) -> TrainConfig:
    """The tiny model's pretraining run on the data_dir fixture: 16 steps of 4 x 32 tokens by default."""
    return TrainConfig(**{**dict(data_dir=str(data_dir), out_dir=str(out_dir), device="cpu",
                                 batch_size=4, seq_len=32, max_steps=16, warmup_steps=2, lr=3e-3,
                                 eval_interval=8, eval_iters=2, log_interval=4, save_interval=8), **train})


def make_trainer(data_dir, out_dir, model: dict | None = None, **train) -> PretrainTrainer:
    """A trainer of pretrain_config's run (model: overrides of TINY_MODEL)."""
    return PretrainTrainer(pretrain_config(data_dir, out_dir, **train), {**TINY_MODEL, **(model or {})})


def during_step(trainer, step: int, action) -> None:
    """Call action() when trainer draws the first micro-batch of optimizer step `step` (0-based, grad_accum 1):
    e.g. to crash, or to send a signal, in the middle of training."""
    original, calls = trainer.next_batch, {"n": 0}

    def next_batch():
        calls["n"] += 1
        if calls["n"] == step + 1:
            action()
        return original()

    trainer.next_batch = next_batch


def crash_during_step(trainer, step: int, error: BaseException) -> None:
    """Make trainer raise `error` during optimizer step `step`, as a crash would."""

    def crash():
        raise error

    during_step(trainer, step, crash)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a training script under torchrun with n CPU processes (gloo); it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
