"""torch.compile failing (no compiler, MPS, Windows, old torch; or a later recompile) falls back to eager."""

import pytest
import torch

from model import GPT
from tests.helpers import make_trainer

SHORT = dict(batch_size=2, seq_len=16, max_steps=4, warmup_steps=1, eval_interval=100, eval_iters=1, log_interval=1,
             grad_accum=2)
MESSAGE = "torch.compile failed (RuntimeError: InductorError: no working C++ compiler); training in eager mode"


class FailBackward(torch.autograd.Function):
    """Identity whose backward fails: a compiled graph whose backward fails to compile (it compiles lazily)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("InductorError: no working C++ compiler\nlong details")


def fake_compile(monkeypatch, fail_at_call: int, in_backward: bool = False):
    """torch.compile replaced by a module that runs the model, and fails at its fail_at_call-th call."""
    calls = {"n": 0}

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_at_call and not in_backward:
                raise RuntimeError("InductorError: no working C++ compiler\nlong details")
            out = self.model(*args, **kwargs)
            return FailBackward.apply(out) if calls["n"] == fail_at_call else out

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Compiled(model))


def final_weights(trainer):
    trainer.train()
    return GPT.from_pretrained(trainer.out_dir).state_dict()


@pytest.mark.parametrize("fail_at_call, in_backward", [(1, False), (6, False), (6, True)])
def test_failed_compile_falls_back_to_eager_and_trains_the_same(data_dir, tmp_path, monkeypatch, capsys,
                                                                fail_at_call, in_backward):
    """At the first call, or in a later step (a recompile): in the forward pass, or in the backward pass of the
    second micro-batch, after the first one's gradients were added (they must not count twice)."""
    expected = final_weights(make_trainer(data_dir, tmp_path / "eager", compile="false", **SHORT))
    fake_compile(monkeypatch, fail_at_call, in_backward)
    trainer = make_trainer(data_dir, tmp_path / "compiled", compile="true", **SHORT)
    got = final_weights(trainer)
    assert trainer.step == 4 and not trainer.run_step.is_compiled
    assert capsys.readouterr().out.count(MESSAGE) == 1
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


def test_errors_in_eager_mode_are_not_swallowed(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, compile="false", **SHORT)

    def broken_loss(model, batch):
        raise RuntimeError("a real bug")

    trainer.compute_loss = broken_loss
    with pytest.raises(RuntimeError, match="a real bug"):
        trainer.train()
