"""A careless user: bad flags, bad files, interrupts and reruns end in one line and lose nothing (issue 18)."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import bench
import checkpoint
import demo
import prepare
from configs import (
    DPOConfig,
    LoRAConfig,
    ModelConfig,
    SFTConfig,
    TrainConfig,
    exit_on_bad_input,
    parse_args,
    parse_train_args,
)
from dataset import PreferenceDataset, SFTDataset, read_jsonl
from model import GPT
from tests.helpers import (
    NAMES,
    TINY_MODEL,
    crash_during_step,
    make_chats,
    make_checkpoint,
    make_trainer,
    pretrain_config,
    sample_text,
    write_data_dir,
    write_jsonl,
)
from tokenizer import Tokenizer
from trainers import DPOTrainer, PretrainTrainer, SFTTrainer, check_out_dir, run_stage

DROPOUT = {"dropout": 0.1}  # so that resuming must restore the RNG too


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("config, args, message", [
    (TrainConfig, ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (TrainConfig, ["--batch_size", "-1"], "--batch_size must be >= 1, got -1"),
    (TrainConfig, ["--grad_accum", "0"], "--grad_accum must be >= 1, got 0"),
    (TrainConfig, ["--max_steps", "-5"], r"--max_steps must be >= 0 \(0 = the budget of --max_tokens, --epochs or "
                                         r"the plan\), got -5"),
    (TrainConfig, ["--max_tokens", "-1"], r"--max_tokens must be >= 0 \(0 = off\), got -1"),
    (TrainConfig, ["--seq_len", "-1"], r"--seq_len must be >= 0 \(0 = the model's max_seq_len\), got -1"),
    (TrainConfig, ["--dtype", "float8"], "--dtype must be one of auto, float32, bfloat16, float16, got float8"),
    (TrainConfig, ["--device", "gpu"], "--device must be auto, cpu, mps, cuda or cuda:N, got gpu"),
    (TrainConfig, ["--preset", "nope"], "--preset must be auto or one of tiny, .*, got nope"),
    (TrainConfig, ["--resume", "--overwrite"], "--resume continues .* and --overwrite replaces it: give one"),
    (TrainConfig, ["--resume", "--preset", "tiny"], "--preset tiny does not apply to --resume or --init_from"),
    (TrainConfig, ["--init_from", "x", "--preset", "tiny"], "--preset tiny does not apply to --resume or --init_from"),
    (SFTConfig, ["--preset", "tiny"], r"--preset tiny does not apply to fine-tuning: the model is the checkpoint's"),
    (SFTConfig, ["--eval_samples", "-1"], "--eval_samples must be >= 0"),
    (LoRAConfig, ["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
    (DPOConfig, ["--lora_dropout", "1"], "--lora_dropout must be >= 0 and < 1, got 1.0"),
    (DPOConfig, ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
])
def test_training_flags_are_checked_where_declared_in_one_format(config, args, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        parse_train_args(config, args)


@pytest.mark.parametrize("config, args, message", [
    (demo.DemoConfig, ["--dtype", "float8"], "--dtype must be one of auto, float32, bfloat16, float16, got float8"),
    (demo.DemoConfig, ["--compile", "yes"], "--compile must be auto, true or false, got yes"),
    (bench.BenchConfig, ["--preset", "nope"], "--preset must be one of tiny, .*, got nope"),
    (bench.BenchConfig, ["--parts", "pretrain,nope"], "--parts must be comma-separated names of pretrain, "),
    (prepare.PrepareConfig, ["--val_fraction", "0"], r"--val_fraction must be > 0 and < 1 \(training needs a "
                                                     r"validation split\), got 0.0"),
])
def test_the_other_scripts_check_their_flags_the_same_way(config, args, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        parse_args(config, args)


def test_a_bad_flag_is_one_line_without_a_traceback(capsys):
    result = subprocess.run([sys.executable, "train_pretrain.py", "--batch_size", "0"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1 and result.stderr.splitlines() == ["error: --batch_size must be >= 1, got 0"]
    with pytest.raises(SystemExit) as exit_status:  # a value argparse cannot read: its message, without its usage
        parse_train_args(TrainConfig, ["--batch_size", "abc"])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --batch_size: invalid int value: 'abc' (--help lists the flags)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(data_dir, tmp_path, tokenizer):
    message = r"^error: --device cuda: no CUDA GPU is available to this torch .*; use --device cpu \(or auto\)$"
    with pytest.raises(SystemExit, match=message):
        run_stage(PretrainTrainer, pretrain_config(data_dir, tmp_path / "out", device="cuda"), TINY_MODEL)
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    with pytest.raises(SystemExit, match=message):
        demo.main(["--checkpoint", str(ckpt), "--device", "cuda", "--output_dir", str(tmp_path / "demo")])


def test_out_of_gpu_memory_is_one_line_and_a_bug_keeps_its_traceback(data_dir, tmp_path):
    class OutOfMemory(PretrainTrainer):
        def next_batch(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")

    with pytest.raises(SystemExit, match=r"^error: CUDA out of memory. Tried to allocate 2.00 GiB. Lower --batch_size "
                                         r"\(raising --grad_accum keeps the global batch\), --seq_len, or use "
                                         r"--grad_checkpoint$"):
        run_stage(OutOfMemory, pretrain_config(data_dir, tmp_path / "a"), TINY_MODEL)

    class Buggy(PretrainTrainer):
        def next_batch(self):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # not turned into one line: a bug shows its traceback
        run_stage(Buggy, pretrain_config(data_dir, tmp_path / "b"), TINY_MODEL)


def test_seq_len_beyond_the_models_context_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^--seq_len 64 is longer than the model's context \(max_seq_len 32\)$"):
        make_trainer(data_dir, tmp_path / "out", seq_len=64)


def test_an_unwritable_output_directory_is_said_before_any_work(data_dir, tmp_path, tokenizer):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^--out_dir .*a_file/out: cannot write there \(Not a directory\)$"):
        make_trainer(data_dir, blocker / "out")
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    with pytest.raises(SystemExit, match=r"^error: --output_dir .*a_file/demo: cannot write there"):
        demo.main(["--checkpoint", str(ckpt), "--prompt", "hi", "--output_dir", str(blocker / "demo")])
    with pytest.raises(SystemExit, match=r"^error: --out_dir .*a_file/data: cannot write there"):
        prepare.main(["--source", str(write_jsonl(tmp_path / "d.jsonl", [{"text": "Tom has a kite."}])),
                      "--out_dir", str(blocker / "data")])
    with pytest.raises(ValueError, match=r"^--out .*a_file: cannot write there"):
        bench.main(bench.BenchConfig(preset="tiny", out=str(blocker / "bench.json")))


# ----------------------------------------------------------------------------- checkpoints are never lost
def test_a_fresh_run_never_replaces_a_checkpoint_unasked(data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    make_trainer(data_dir, ckpt, max_steps=8).train()
    weights = (ckpt / checkpoint.WEIGHTS).read_bytes()
    for train in ({}, {"max_steps": 3}):  # e.g. a smoke test into the default out_dir
        with pytest.raises(ValueError, match=r"ckpt already holds a pretrain checkpoint \(step 8\): pass --resume to "
                                             r"continue it, --overwrite to replace it, or another --out_dir$"):
            make_trainer(data_dir, ckpt, **train)
    assert (ckpt / checkpoint.WEIGHTS).read_bytes() == weights
    with pytest.raises(ValueError, match="already holds a pretrain checkpoint"):
        check_out_dir(ckpt, "lora", resume=False, overwrite=False)  # train_lora.py --export_merged DIR

    make_trainer(data_dir, ckpt, max_steps=4, overwrite=True).train()
    assert checkpoint.load_run_info(ckpt)["step"] == 4
    records = metrics(ckpt)  # only the new run's
    assert [(r["split"], r["step"]) for r in records] == [("val", 0), ("train", 4), ("val", 4)]


def test_resume_needs_a_checkpoint_of_its_stage_with_steps_left(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--resume: .*none holds no checkpoint to continue"):
        make_trainer(data_dir, tmp_path / "none", resume=True)
    make_trainer(data_dir, tmp_path / "ckpt", max_steps=8).train()
    with pytest.raises(ValueError, match=r"^--resume: .*ckpt is at step 8 already, and --max_steps is 8: raise"):
        make_trainer(data_dir, tmp_path / "ckpt", max_steps=8, resume=True)
    with pytest.raises(ValueError, match=r"^--resume: .*ckpt holds a checkpoint of the pretrain stage, not sft$"):
        check_out_dir(tmp_path / "ckpt", "sft", resume=True, overwrite=False)


def test_metrics_after_a_resume_are_those_of_one_uninterrupted_run(data_dir, tmp_path):
    whole = make_trainer(data_dir, tmp_path / "whole", DROPOUT, log_interval=1)
    whole.train()
    crashing = make_trainer(data_dir, tmp_path / "resumed", DROPOUT, log_interval=1)
    crash_during_step(crashing, 11, RuntimeError("simulated crash"))  # steps 9-11 logged after the step-8 save
    with pytest.raises(RuntimeError):
        crashing.train()
    make_trainer(data_dir, tmp_path / "resumed", DROPOUT, log_interval=1, resume=True).train()
    expected, got = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in expected]
    for a, b in zip(expected, got):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), abs=1e-6)


def test_resume_and_init_from_refuse_data_of_another_tokenizer(data_dir, tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    make_trainer(data_dir, ckpt, max_steps=8).train()
    # prepare.py run again into the data directory with another --vocab_size, then --resume
    other = write_data_dir(tmp_path / "other", Tokenizer.train(sample_text(), vocab_size=280))
    message = (r"other was tokenised by another tokenizer \(bpe\d+\) than the one .*ckpt was trained with "
               r"\(bpe\d+\): the model would read its ids as other text. .*python prepare.py --tokenizer .*ckpt")
    with pytest.raises(ValueError, match=message):
        make_trainer(other, ckpt, resume=True, max_steps=16)
    with pytest.raises(ValueError, match=message):
        make_trainer(other, tmp_path / "new", init_from=str(ckpt))
    same = write_data_dir(tmp_path / "same", Tokenizer.from_pretrained(ckpt))  # the same tokenizer elsewhere: fine
    assert make_trainer(same, tmp_path / "new", init_from=str(ckpt)).tokenizer.fingerprint() == tokenizer.fingerprint()


SIGTERM_AT_STEP_5 = """
import os, signal, sys
from tests.helpers import TINY_MODEL, pretrain_config
from trainers import PretrainTrainer, run_stage

class Terminated(PretrainTrainer):
    def next_batch(self):
        if self.step == 5:  # in the middle of step 5, what `kill` or a job scheduler sends
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch()

run_stage(Terminated, pretrain_config(sys.argv[1], sys.argv[2]), {**TINY_MODEL, "dropout": 0.1})
"""


def test_sigterm_saves_like_ctrl_c_and_resume_continues_exactly(data_dir, tmp_path):
    result = subprocess.run([sys.executable, "-c", SIGTERM_AT_STEP_5, str(data_dir), str(tmp_path / "ckpt")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + 15, result.stderr[-2000:]  # as a shell reports a process SIGTERM ended
    assert "SIGTERM: stopping after this step" in result.stdout and "Traceback" not in result.stderr
    assert checkpoint.load_train_state(tmp_path / "ckpt")["step"] == 6
    expected = make_trainer(data_dir, tmp_path / "whole", DROPOUT).train()["val_loss"]
    assert make_trainer(data_dir, tmp_path / "ckpt", DROPOUT, resume=True).train()["val_loss"] == pytest.approx(
        expected, abs=1e-6)


# ----------------------------------------------------------------------------- data files
def test_a_utf8_byte_order_mark_is_read(tmp_path, tokenizer):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "chats.jsonl").write_bytes(bom + (json.dumps(make_chats(1, 0)[0]) + "\n").encode())
    assert [record for _, record in read_jsonl(tmp_path / "chats.jsonl")] == make_chats(1, 0)
    (tmp_path / "docs.txt").write_bytes(bom + b"Tom has a kite.\n\nMia has a cat.\n")
    assert list(prepare.read_txt(tmp_path / "docs.txt")) == ["Tom has a kite.", "Mia has a cat.\n"]


def test_an_empty_or_all_malformed_chat_file_says_so(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no chats: it is empty$"):
        SFTDataset(str(tmp_path / "empty.jsonl"), tokenizer, 64)
    (tmp_path / "bad.jsonl").write_text("{}\n[]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: no chats: all 2 rows are malformed, the first: .*bad.jsonl:1"):
        SFTDataset(str(tmp_path / "bad.jsonl"), tokenizer, 64, skip_bad_rows=True)
    with pytest.raises(ValueError, match=r"empty.jsonl: no preferences: it is empty$"):
        PreferenceDataset(str(tmp_path / "empty.jsonl"), tokenizer, 64)


def test_chat_flags_naming_a_directory_or_an_empty_file_are_one_line(sft_dirs):
    common = ["--init_from", str(sft_dirs / "pretrain"), "--out_dir", str(sft_dirs / "sft"), "--device", "cpu",
              "--sft_val_data", "none"]
    for args, message in ((["--sft_data", str(sft_dirs)], f"{sft_dirs}: is a directory; expected a .jsonl file"),
                          (["--sft_data", str(sft_dirs / "nope.jsonl")], "nope.jsonl: missing")):
        cfg, overrides = parse_train_args(SFTConfig, common + args)
        with pytest.raises(SystemExit, match=f"^error: .*{message}$"):
            run_stage(SFTTrainer, cfg, overrides)
    (sft_dirs / "empty.jsonl").write_text("")
    cfg, _ = parse_train_args(SFTConfig, common + ["--sft_data", str(sft_dirs / "empty.jsonl"), "--show_mask"])
    with pytest.raises(ValueError, match="empty.jsonl: no chats"):
        SFTTrainer.show_mask(cfg)


def test_a_missing_dpo_val_file_is_said_before_the_pairs_are_tokenised(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    cfg = DPOConfig(init_from=str(tmp_path / "sft"), out_dir=str(tmp_path / "dpo"), device="cpu", seq_len=64,
                    train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "nope.jsonl"), eval_samples=0)
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: missing$"):
        DPOTrainer(cfg)
    assert not (tmp_path / ".cache").exists()  # the training pairs were not tokenised first


# ----------------------------------------------------------------------------- the demo
def test_a_long_piped_session_costs_each_turn_the_context_not_the_history(tmp_path, tokenizer, monkeypatch, capsys):
    """Before, every turn re-encoded the conversation from its oldest turn, again for each turn it tried to drop:
    the 400th turn encoded ~10^5 messages and this session took minutes."""
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")  # a 64-token context
    session = demo.Demo(demo.DemoConfig(checkpoint=str(ckpt), output_dir=str(tmp_path / "out"), temperature=0,
                                        max_new_tokens=2))
    encoded, per_turn = [0], []
    encode, turn = session.tokenizer.encode, session.turn

    def counting_encode(*args, **kwargs):
        encoded[0] += 1
        return encode(*args, **kwargs)

    def counting_turn(text):
        before = encoded[0]
        turn(text)
        per_turn.append(encoded[0] - before)
        return True

    monkeypatch.setattr(session.tokenizer, "encode", counting_encode)
    monkeypatch.setattr(session, "turn", counting_turn)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{NAMES[i % 4]} has a ball.\n" for i in range(400))))
    start = time.process_time()  # CPU time: on a shared machine the wall clock measures the other jobs too
    session.run()
    seconds = time.process_time() - start
    capsys.readouterr()
    assert len(per_turn) == 400 and max(per_turn[-100:]) <= max(per_turn[:10])  # no growth with the history
    assert seconds < 60, seconds  # ~5 s here; minutes before
    records = [json.loads(line) for line in next((tmp_path / "out").iterdir()).joinpath("turns.jsonl").open()]
    last = records[-1]
    assert last["prompt_tokens"] <= 62 and last["context_turns"] >= 1 and last["dropped_turns"] == 399 - last[
        "context_turns"]


def test_bytes_that_are_not_utf8_are_replaced_and_said(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    # Python passes a command-line byte that is not UTF-8 on as a lone surrogate, as here.
    demo.main(["--checkpoint", str(ckpt), "--prompt", "hi \udcff there", "--max_new_tokens", "2",
               "--output_dir", str(tmp_path / "a")])
    assert "[--prompt held bytes that are not UTF-8 text: each is replaced by \ufffd]" in capsys.readouterr().err
    (record,) = [json.loads(line) for line in next((tmp_path / "a").iterdir()).joinpath("turns.jsonl").open()]
    assert record["prompt"] == "hi \ufffd there"

    result = subprocess.run([sys.executable, "demo.py", "--checkpoint", str(ckpt), "--max_new_tokens", "2",
                             "--output_dir", str(tmp_path / "b")], input=b"caf\xe9 \xff\nexit\n",
                            capture_output=True, timeout=600)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode()[-2000:]
    assert b"the input held bytes that are not UTF-8 text" in result.stderr
    (record,) = [json.loads(line) for line in next((tmp_path / "b").iterdir()).joinpath("turns.jsonl").open()]
    assert record["prompt"] == "caf\ufffd \ufffd"


# ----------------------------------------------------------------------------- saving under faults
# What a save does to the file system, in order: every call of these is a point where a kill can land.
FILE_SYSTEM_STEPS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
                     (shutil, "copy2"), (checkpoint, "save_file"), (torch, "save"), (Path, "write_text"),
                     (Path, "write_bytes")]


def interrupted_at(k: int, after: bool, monkeypatch):
    """Patch the file-system steps so that step k (counting from 1) raises KeyboardInterrupt, before or after it
    runs; returns a function giving how many steps ran."""
    count = [0]

    def counted(original):
        def step(*args, **kwargs):
            count[0] += 1
            this = count[0]  # steps may nest (Path.mkdir calls os.mkdir): each counts on its own
            if this == k and not after:
                raise KeyboardInterrupt
            try:
                return original(*args, **kwargs)
            finally:
                if this == k:
                    raise KeyboardInterrupt  # noqa: B012 (after the step, whether it failed or not)
        return step

    for owner, name in FILE_SYSTEM_STEPS:
        monkeypatch.setattr(owner, name, counted(getattr(owner, name)))
    return lambda: count[0]


def tiny_model(tokenizer, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))


def saved_model(directory, models: dict[int, GPT]) -> int:
    """Which of `models` (by seed) the checkpoint in directory holds, loading it as any reader would."""
    loaded = GPT.from_pretrained(directory).state_dict()
    (seed,) = [s for s, m in models.items() if all(torch.equal(v, loaded[k]) for k, v in m.state_dict().items())]
    assert checkpoint.load_run_info(directory)["seed"] == checkpoint.load_train_state(directory)["seed"] == seed
    return seed


@pytest.mark.parametrize("after", [False, True])
def test_a_save_interrupted_at_any_step_keeps_a_whole_checkpoint_and_the_next_save_works(tmp_path, tokenizer,
                                                                                        monkeypatch, after):
    models = {seed: tiny_model(tokenizer, seed) for seed in range(4)}

    def save(directory, seed):
        checkpoint.save_checkpoint(directory, models[seed], tokenizer, {"seed": seed}, {"seed": seed})

    k = 0
    while True:
        k += 1
        root = tmp_path / f"{k}"
        save(root / "ckpt", 0)
        with monkeypatch.context() as patch:
            steps = interrupted_at(k, after, patch)
            try:
                save(root / "ckpt", 1)
            except KeyboardInterrupt:
                pass
            else:
                break  # k is past the last step: every step has been interrupted
            finally:
                ran = steps()
        assert saved_model(root / "ckpt", models) in (0, 1), (k, ran)
        save(root / "ckpt", 2)  # the next save is never blocked by what the interrupted one left
        assert saved_model(root / "ckpt", models) == 2
        assert sorted(p.name for p in root.iterdir()) == ["ckpt"], k  # nothing left beside it
    assert k > 20  # the whole sequence was walked (26 file-system steps in a save today)


@pytest.mark.parametrize("writer", ["torch", "safetensors", "json"])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_files(tmp_path, tokenizer, monkeypatch, writer):
    models = {seed: tiny_model(tokenizer, seed) for seed in range(2)}
    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt, models[0], tokenizer, {"seed": 0, "step": 7}, {"seed": 0})

    def fills_the_disk(error):
        def write(*args, **kwargs):  # half the file reaches the disk, then it is full
            Path(next(a for a in args if isinstance(a, (str, os.PathLike)))).write_bytes(b"half a file")
            raise error
        return write

    # How each writer reports a full disk (measured on a full tmpfs): torch.save a RuntimeError, safetensors its
    # own error type, Python an OSError with errno ENOSPC.
    if writer == "torch":
        monkeypatch.setattr(torch, "save", fills_the_disk(RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    elif writer == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", fills_the_disk(SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    else:
        monkeypatch.setattr(checkpoint, "write_json", fills_the_disk(OSError(
            errno.ENOSPC, "No space left on device")))
    if writer != "json":  # the disk is full: what the save looks at when the error does not say so itself
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    with pytest.raises(OSError, match=r"^cannot save to .*ckpt: no space left; the step-7 checkpoint is kept$"):
        checkpoint.save_checkpoint(ckpt, models[1], tokenizer, {"seed": 1, "step": 8}, {"seed": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial files
    assert saved_model(ckpt, models) == 0


def test_a_failed_save_that_is_not_a_full_disk_keeps_its_own_error(tmp_path, tokenizer, monkeypatch):
    model = tiny_model(tokenizer, 0)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"step": 1}, {"seed": 0})
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_training_ends_the_run_in_one_line(data_dir, tmp_path, monkeypatch):
    trainer = make_trainer(data_dir, tmp_path / "ckpt")  # saves at step 8, then at 16

    def full_at_the_second_save(obj, path, *args, **kwargs):
        if obj["step"] == 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    save = torch.save
    monkeypatch.setattr(torch, "save", full_at_the_second_save)
    with pytest.raises(SystemExit, match=r"^error: cannot save to .*ckpt: no space left; the step-8 checkpoint is "
                                         r"kept$"):
        with exit_on_bad_input():
            trainer.train()
    assert checkpoint.load_train_state(tmp_path / "ckpt")["step"] == 8
