"""torchrun DDP on 2 CPU processes (gloo) trains exactly like one process with the same global batch."""

import json

import numpy as np
import pytest
import torch

from checkpoint import load_run_info
from configs import TrainConfig
from dataset import WindowSampler
from model import GPT
from tests.helpers import TINY_MODEL, torchrun
from trainers import PretrainTrainer

# Float32 sums reduced in a different order (gloo's all-reduce vs one batch) differ in the last bits;
# 8 Adam steps keep that far below this.
TOLERANCE = 1e-4

# The constant learning rate after warmup (min_lr = lr) makes a 4-step run followed by a resumed 4 more
# follow the same schedule as one 8-step run.
TRAIN = dict(device="cpu", seq_len=32, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-3,
             eval_interval=4, eval_iters=2, log_interval=1, save_interval=100, compile="false")


def flags(**kwargs) -> list[str]:
    return [a for k, v in kwargs.items() for a in (f"--{k}", str(v))]


def losses(out_dir) -> dict[tuple[str, int], float]:
    """(split, step) -> loss, from metrics.jsonl (a later record of the same step wins)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["split"], r["step"])] = r["loss"] if r["split"] == "train" else r["val_loss"]
    return out


def test_sampler_ranks_split_the_global_batch():
    one = WindowSampler(10_000, 33, batch_size=8, seed=3)
    ranks = [WindowSampler(10_000, 33, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        assert np.array_equal(one.next(), np.concatenate([s.next() for s in ranks]))


def test_two_processes_match_one_and_resume(data_dir, tmp_path):
    model = {k: str(v) for k, v in TINY_MODEL.items()}
    single = PretrainTrainer(TrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "single"), batch_size=8,
                                         **TRAIN), TINY_MODEL)
    single.train()

    ddp_dir = tmp_path / "ddp"
    common = flags(data_dir=data_dir, out_dir=ddp_dir, batch_size=4, **{**TRAIN, "max_steps": 4}, **model)
    torchrun(2, "train_pretrain.py", *common)  # steps 1-4, checkpoint at step 4
    assert load_run_info(ddp_dir)["step"] == 4
    # steps 5-8 from that checkpoint
    resumed = torchrun(2, "train_pretrain.py", *common, "--max_steps", "8", "--resume")
    assert "resuming pretrain from step 4" in resumed.stdout

    expected, got = losses(tmp_path / "single"), losses(ddp_dir)
    assert set(got) == set(expected) and len(expected) == 8 + 3  # 8 train steps, evals at 0, 4, 8
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=TOLERANCE), key
    a = GPT.from_pretrained(tmp_path / "single").state_dict()
    b = GPT.from_pretrained(ddp_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=TOLERANCE) for k in a)
