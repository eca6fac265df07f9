"""torch.compile failing on the first step (no compiler, MPS, Windows, old torch) falls back to eager."""

import pytest
import torch

from configs import TrainConfig
from tests.conftest import TINY_MODEL
from trainers import PretrainTrainer


def make_trainer(data_dir, tmp_path, compile):
    cfg = TrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path), preset="tiny", device="cpu", batch_size=2,
                      seq_len=16, max_steps=2, warmup_steps=1, eval_interval=100, eval_iters=1, log_interval=1,
                      compile=compile)
    return PretrainTrainer(cfg, TINY_MODEL)


def test_failed_compile_falls_back_to_eager_with_a_message(data_dir, tmp_path, monkeypatch, capsys):
    class Compiled(torch.nn.Module):  # like torch.compile's module: the failure comes on the first call
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler\nlong details")

    def broken_compile(model, **kwargs):
        return Compiled(model)

    monkeypatch.setattr(torch, "compile", broken_compile)
    trainer = make_trainer(data_dir, tmp_path, compile="true")
    trainer.train()
    assert trainer.step == 2 and not trainer.compiled
    assert "torch.compile failed (RuntimeError: InductorError: no working C++ compiler); training in eager mode" \
        in capsys.readouterr().out


def test_errors_in_eager_mode_are_not_swallowed(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, compile="false")

    def broken_loss(model, batch):
        raise RuntimeError("a real bug")

    trainer.compute_loss = broken_loss
    with pytest.raises(RuntimeError, match="a real bug"):
        trainer.train()
