"""The training loop, checkpoints and resume, on a tiny model and data set."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import plan
from configs import ModelConfig, TrainConfig, parse_train_args
from model import GPT
from tests.helpers import TINY_MODEL, crash_during_step, during_step, make_trainer
from trainers import Stopped

DROPOUT = {"dropout": 0.1}  # so that resuming must restore the RNG too


def test_pretraining_lowers_the_loss(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path / "ckpt", DROPOUT, max_steps=60, eval_interval=30)
    first = trainer.evaluate()["val_loss"]
    final = trainer.train()["val_loss"]
    assert final < first - 1.5, (first, final)
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {r["split"] for r in records}
    # Each train record: 4 steps of 4 x 32 tokens since the record before (its time stamp), give or take the
    # writing of the records themselves.
    train = [r for r in records if r["split"] == "train"]
    for before, r in zip(train, train[1:]):
        assert r["tokens_per_s"] == pytest.approx(4 * 4 * 32 / (r["time"] - before["time"]), rel=0.2)


def test_interrupted_run_resumes_to_the_same_loss(data_dir, tmp_path):
    whole = make_trainer(data_dir, tmp_path / "whole", DROPOUT)
    expected = whole.train()["val_loss"]

    crashing = make_trainer(data_dir, tmp_path / "resumed", DROPOUT)
    crash_during_step(crashing, 11, RuntimeError("simulated crash"))  # after the checkpoint at step 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    assert checkpoint.load_train_state(tmp_path / "resumed")["step"] == 8

    resumed = make_trainer(data_dir, tmp_path / "resumed", DROPOUT, resume=True)
    assert resumed.step == 8
    got = resumed.train()["val_loss"]
    assert got == pytest.approx(expected, abs=1e-6)
    a = GPT.from_pretrained(tmp_path / "whole").state_dict()
    b = GPT.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(data_dir, tmp_path):
    expected = make_trainer(data_dir, tmp_path / "whole", DROPOUT).train()["val_loss"]
    trainer = make_trainer(data_dir, tmp_path / "ckpt", DROPOUT)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    during_step(trainer, 5, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C in the middle of step 5
    with pytest.raises(Stopped, match="SIGINT"):
        trainer.train()
    assert checkpoint.load_train_state(tmp_path / "ckpt")["step"] == 6  # step 5 was finished, then saved
    assert signal.getsignal(signal.SIGINT) is before  # put back after training
    resumed = make_trainer(data_dir, tmp_path / "ckpt", DROPOUT, resume=True)
    assert resumed.train()["val_loss"] == pytest.approx(expected, abs=1e-6)


def test_a_second_ctrl_c_stops_at_once_without_saving(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path / "ckpt", DROPOUT)

    def press_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    during_step(trainer, 10, press_twice)  # after the checkpoint of step 8
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer.train()
    assert not isinstance(stopped.value, Stopped)
    assert checkpoint.load_train_state(tmp_path / "ckpt")["step"] == 8


def test_crash_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, tokenizer):
    out = tmp_path / "ckpt"
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    checkpoint.save_checkpoint(out, model, tokenizer, {"step": 1})
    before = (out / checkpoint.WEIGHTS).read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(out, model, tokenizer, {"step": 2})
    assert (out / checkpoint.WEIGHTS).read_bytes() == before
    assert checkpoint.load_run_info(out)["step"] == 1

    # A crash between the two renames leaves only `<dir>.old`; loading puts it back.
    out.rename(tmp_path / "ckpt.old")
    assert checkpoint.load_run_info(out)["step"] == 1


def test_a_best_checkpoint_inside_survives_a_crash_anywhere_in_a_save(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "ckpt"
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    checkpoint.save_checkpoint(out, model, tokenizer, {"step": 1})
    checkpoint.save_checkpoint(out / "best", model, tokenizer, {"step": 1})
    rename = os.replace
    # The latest's save renames best/ into the new directory, the old directory away, the new one in; best's own
    # save renames the old best away and the new one in. A crash before each of them:
    for directory, crash_at in [(out, 0), (out, 1), (out, 2), (out / "best", 0), (out / "best", 1)]:
        calls = []

        def crashing_rename(src, dst, calls=calls, crash_at=crash_at):
            if os.path.isdir(src):  # (files are written by a rename too)
                calls.append(dst)
                if len(calls) > crash_at:
                    raise OSError("crash")
            rename(src, dst)

        monkeypatch.setattr(os, "replace", crashing_rename)
        with pytest.raises(OSError, match="crash"):
            checkpoint.save_checkpoint(directory, model, tokenizer, {"step": 2})
        monkeypatch.setattr(os, "replace", rename)
        best = checkpoint.best_checkpoint(out)  # the next run's look for the best model puts everything back
        assert best == out / "best" and checkpoint.load_run_info(best)["step"] == 1, (directory, crash_at)
        assert checkpoint.load_run_info(out)["step"] == 1 and len(calls) == crash_at + 1
    checkpoint.save_checkpoint(out, model, tokenizer, {"step": 3})  # and the next save keeps it
    assert checkpoint.load_run_info(out / "best")["step"] == 1 and checkpoint.load_run_info(out)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (out / "best" / checkpoint.WEIGHTS).exists()


def test_the_run_keeps_its_best_model_across_saves_and_a_resume(data_dir, tmp_path):
    val_losses = {4: 3.0, 8: 2.0, 12: 2.5, 16: 2.2}  # as if the validation loss rose after step 8
    weights = {}

    def make(**train):
        trainer = make_trainer(data_dir, tmp_path / "ckpt", DROPOUT, eval_interval=4, **train)
        mean_loss = trainer.mean_loss

        def scripted(split):
            result = mean_loss(split)
            if split == "val" and trainer.step in val_losses:
                weights[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                result["loss"] = val_losses[trainer.step]
            return result

        trainer.mean_loss = scripted
        return trainer

    crashing = make()
    crash_during_step(crashing, 11, RuntimeError("simulated crash"))  # after the best (step 8) and a save
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    make(resume=True).train()  # must remember that step 8's 2.0 is the best: 2.5 and 2.2 are not
    info = checkpoint.load_run_info(tmp_path / "ckpt" / "best")
    assert info["step"] == 8 and info["metrics"]["val_loss"] == 2.0 and "train_loss" in info["metrics"]
    assert checkpoint.load_run_info(tmp_path / "ckpt")["step"] == 16
    best = GPT.from_pretrained(checkpoint.best_checkpoint(tmp_path / "ckpt")).state_dict()
    assert all(torch.equal(best[k], weights[8][k]) for k in best)


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path, tokenizer):
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL)).eval()
    checkpoint.save_checkpoint(tmp_path / "c", model, tokenizer, {"step": 0})
    loaded = GPT.from_pretrained(tmp_path / "c").eval()
    idx = torch.randint(0, tokenizer.vocab_size, (1, 10))
    assert torch.equal(model(idx), loaded(idx))

    other = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "dim": 64}))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match the model: shape mismatch"):
        checkpoint.load_weights(other, tmp_path / "c")
    deeper = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"missing: layers\.2\."):
        checkpoint.load_weights(deeper, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        GPT.from_pretrained(tmp_path / "nothing")


def test_cli_overrides_every_field_and_help_lists_them():
    cfg, model_overrides = parse_train_args(TrainConfig, ["--lr", "3e-4", "--compile", "false", "--resume",
                                                          "--n_layers", "4", "--tie_embeddings", "false"])
    assert cfg.lr == 3e-4 and cfg.compile == "false" and cfg.resume is True
    assert model_overrides == {"n_layers": 4, "tie_embeddings": False}
    out = subprocess.run([sys.executable, "train_pretrain.py", "--help"], capture_output=True, text=True, check=True)
    for name in list(TrainConfig.__dataclass_fields__) + list(ModelConfig.__dataclass_fields__):
        assert f"--{name}" in out.stdout, name


def test_missing_data_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "train_pretrain.py", "--data_dir", str(tmp_path / "none"),
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


class OverflowAboveScale(torch.autograd.Function):
    """Identity on the loss whose gradient overflows (inf) while the fp16 loss scale is above 2**4."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.overflow = scale > 2**4
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf") if ctx.overflow else grad, None


def test_grad_scaler_calibration_is_not_counted_as_divergence(data_dir, tmp_path):
    """fp16's GradScaler starts at 2**16 and halves on overflowing gradients: 12 such skipped steps here, more than
    the 10 non-finite steps that stop a run, which must not stop it. A non-finite loss still counts."""
    expected = make_trainer(data_dir, tmp_path / "plain", max_steps=4)
    expected.sampler.position = 12  # the batches of the skipped steps are drawn and dropped
    expected.train()
    trainer = make_trainer(data_dir, tmp_path / "scaled", max_steps=4)
    trainer.scaler = torch.amp.GradScaler("cpu")  # as with --dtype float16, on float32 arithmetic
    compute_loss = trainer.compute_loss

    def overflowing(model, batch):
        loss, metrics = compute_loss(model, batch)
        return OverflowAboveScale.apply(loss, trainer.scaler.get_scale()), metrics

    trainer.compute_loss = overflowing
    trainer.train()
    assert trainer.step == 4 and trainer.scaler.get_scale() == 2**4
    a, b = expected.model.state_dict(), trainer.model.state_dict()  # scaling by powers of 2 is exact
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    nan_loss = make_trainer(data_dir, tmp_path / "nan", max_steps=4)
    nan_loss.scaler = torch.amp.GradScaler("cpu")
    nan_loss.compute_loss = lambda model, batch: (compute_loss(model, batch)[0] * float("nan"), {})
    with pytest.raises(FloatingPointError, match="10 non-finite steps in a row"):
        nan_loss.train()


def test_the_budget_sets_the_steps_from_tokens_or_the_device_plan(data_dir, tmp_path, monkeypatch):
    """--max_tokens gives max_tokens / (batch_size * seq_len) steps; --max_steps alone is kept; with no budget at
    all the device's plan (plan.py) gives it."""
    assert make_trainer(data_dir, tmp_path / "a", max_steps=0, max_tokens=4 * 32 * 10 + 1).cfg.max_steps == 11
    monkeypatch.setitem(plan.PLANS, "cpu", plan.Plan("tiny", {"pretrain": {"max_tokens": 4 * 32 * 7}}, "test"))
    assert make_trainer(data_dir, tmp_path / "b", max_steps=0).cfg.max_steps == 7
    assert make_trainer(data_dir, tmp_path / "c", max_steps=3).cfg.max_steps == 3
