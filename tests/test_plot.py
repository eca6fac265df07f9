"""Training curves (plots.py, plot.py) and what the trainer records for them: tokens, MFU, run.json."""

import json
import shlex

import pytest

import plot
import plots
import report
from configs import TrainConfig, parse_train_args
from tests.helpers import TINY_MODEL, crash_during_step, write_jsonl
from trainers import PretrainTrainer, run_stage


def moe_pretrain_records(steps=40) -> list[dict]:
    """A pretraining log whose loss falls from 10 to 0.25 (more than a decade), with MoE expert shares."""
    records = [{"step": 0, "tokens": 0, "split": "val", "time": 0.0, "val_loss": 10.0}]
    for s in range(5, steps + 1, 5):
        records.append({"step": s, "tokens": 4096 * s, "split": "train", "time": float(s), "loss": 10.0 / (1 + s),
                        "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 2000.0, "mfu": 0.4, "moe_aux_loss": 1.1,
                        "moe_max_share": 0.4, **{f"moe_share_e{e}": 0.25 for e in range(4)}})
    return records + [{"step": steps, "tokens": 4096 * steps, "split": "val", "time": 99.0, "val_loss": 0.3}]


def dpo_records() -> list[dict]:
    """A DPO log, with a metric no panel knows (as a future stage would log)."""
    records = []
    for s in (0, 10, 20):
        records.append({"step": s, "tokens": 100 * s, "split": "val", "val_loss": 0.69 - s / 100,
                        "val_rewards/accuracy": s / 20, "val_rewards/margin": s / 10, "answer_acc": 0.1,
                        "answer_acc_en": 0.2, "answer_acc_zh": float("nan")})
        if s:
            records.append({"step": s, "tokens": 100 * s, "split": "train", "loss": 0.6, "lr": 1e-6, "grad_norm": 3.0,
                            "tokens_per_s": 500.0, "rewards/chosen": 0.1, "rewards/rejected": -0.1,
                            "rewards/accuracy": 0.5, "rewards/margin": 0.2, "logps/chosen": -7.0,
                            "logps/rejected": -20.0, "reward_std": 0.3})
    return records


@pytest.fixture
def runs(tmp_path):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "dpo").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in moe_pretrain_records()))
    (tmp_path / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo_records()))
    return tmp_path / "pretrain", tmp_path / "dpo"


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_each_metric_gets_its_panel_with_units_and_scale(runs):
    fig = plots.figure([runs[0]])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "learning rate", "throughput", "model FLOPs utilisation", "gradient norm",
                      "MoE expert shares", "MoE load-balancing loss"]
    loss = panel(fig, "loss")
    assert loss.get_yscale() == "log" and loss.get_ylabel() == "loss (nats / token)"  # 10 -> 0.25: decades
    assert loss.get_xlabel() == "optimizer step"
    assert [line.get_label() for line in loss.get_lines()] == ["train", "val"]
    assert max(panel(fig, "model FLOPs utilisation").get_lines()[0].get_ydata()) == pytest.approx(40.0)  # in %
    shares = panel(fig, "MoE expert shares")
    assert sorted(line.get_label() for line in shares.get_lines()) == sorted(
        [f"moe_share_e{e} train" for e in range(4)] + ["moe_max_share train"])
    assert panel(fig, "learning rate").get_yscale() == "linear"


def test_dpo_metrics_and_unknown_metrics_are_drawn(runs):
    fig = plots.figure([runs[1]])
    titles = {ax.get_title() for ax in fig.axes}
    assert {"DPO reward accuracy", "DPO reward margin", "DPO rewards", "DPO log-probabilities",
            "answer accuracy (greedy, exact match)", "reward_std"} <= titles
    accuracy = panel(fig, "DPO reward accuracy")
    assert {line.get_label() for line in accuracy.get_lines()} == {"train", "val"}
    assert list(accuracy.get_lines()[1].get_ydata()) == [0.0, 50.0, 100.0]
    assert panel(fig, "loss").get_yscale() == "linear"  # 0.69 -> 0.49: no decade


def test_several_runs_overlay_in_one_colour_each_against_tokens(runs):
    fig = plots.figure(list(runs), x="tokens")
    loss = panel(fig, "loss")
    labels = [line.get_label() for line in loss.get_lines()]
    assert labels == ["pretrain train", "pretrain val", "dpo train", "dpo val"]
    colours = [line.get_color() for line in loss.get_lines()]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert loss.get_xlabel() == "tokens seen" and max(loss.get_lines()[0].get_xdata()) == 4096 * 40


def test_resumed_steps_keep_the_later_record_and_bad_lines_name_their_line(tmp_path):
    records = [{"step": 5, "split": "train", "loss": 3.0}, {"step": 10, "split": "train", "loss": 2.0},
               {"step": 5, "split": "train", "loss": 2.5}]  # a resumed run logging step 5 again
    write_jsonl(tmp_path / "metrics.jsonl", records)
    assert [r["loss"] for r in plots.read_metrics(tmp_path)["train"]] == [2.5, 2.0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        plots.read_metrics(tmp_path)
    with pytest.raises(ValueError, match="records no tokens"):
        write_jsonl(tmp_path / "metrics.jsonl", records)
        plots.figure([tmp_path], x="tokens")
    assert plots.write_curves(tmp_path / "missing").startswith("could not draw the training curves")


def test_plot_cli_writes_the_png_or_says_what_is_wrong(runs, tmp_path, capsys):
    assert plot.main([*map(str, runs), "--out", str(tmp_path / "out" / "both.png")]) == 0
    assert (tmp_path / "out" / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl: missing" in err and err.count("\n") == 1


def test_a_stage_records_tokens_mfu_and_its_command_and_draws_curves(data_dir, tmp_path):
    out = tmp_path / "pretrain"
    argv = ["--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu", "--compile", "false",
            "--batch_size", "2", "--seq_len", "16", "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "2",
            "--eval_iters", "1", "--log_interval", "1", "--preset", "tiny",
            *[f"--{k}={v}" for k, v in TINY_MODEL.items()]]
    run_stage(PretrainTrainer, *parse_train_args(TrainConfig, argv))
    records = plots.read_metrics(out)
    assert [r["tokens"] for r in records["train"]] == [32, 64, 96, 128]  # 2 rows x 16 tokens a step
    assert all(0 < r["mfu"] < 10 for r in records["train"])
    assert [r["tokens"] for r in records["val"]] == [0, 64, 128]
    info = json.loads((out / "run.json").read_text())
    assert info["tokens_seen"] == 128 and info["wall_time_s"] > 0 and "peak RSS" in info["peak_memory"]
    assert isinstance(info["argv"], list)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # report.py: the stage's section and its row of the evaluation table
    assert report.main(["--root", str(tmp_path), "--out", str(tmp_path / "report.md"), "--max_tokens", "64",
                        "--eval_samples", "0"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## pretrain" in text and f"`python {shlex.join(info['argv'])}`" in text
    assert "| tokens seen | 128 |" in text and "![pretrain training curves](pretrain/curves.png)" in text
    row = next(line for line in text.splitlines() if line.startswith("| pretrain | "))
    assert float(row.split("|")[2]) > 0  # the validation loss of the evaluation table


def test_resume_continues_the_token_count(data_dir, tmp_path):
    from configs import TrainConfig

    cfg = dict(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), device="cpu", batch_size=2,
               seq_len=16, max_steps=6, warmup_steps=1, eval_interval=100, eval_iters=1, log_interval=1,
               save_interval=3)
    crashing = PretrainTrainer(TrainConfig(**cfg), dict(TINY_MODEL))
    crash_during_step(crashing, 4, RuntimeError("crash"))  # after the checkpoint at step 3
    with pytest.raises(RuntimeError):
        crashing.train()
    resumed = PretrainTrainer(TrainConfig(**cfg, resume=True), dict(TINY_MODEL))
    assert resumed.tokens_seen == 3 * 32
    resumed.train()
    assert [r["tokens"] for r in plots.read_metrics(tmp_path / "run")["train"]] == [32 * s for s in range(1, 7)]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tokens_seen"] == 6 * 32
