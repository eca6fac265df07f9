"""SFT data and training: the loss mask on every chat format, padding and packing, resumable sampling,
bad rows, the masked loss, answer accuracy, and a short fine-tuning run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import dataset as dataset_module
from configs import ModelConfig, SFTConfig, parse_train_args
from dataset import (
    DataError,
    RowSampler,
    SFTDataset,
    format_mask,
    load_chats,
    shift_chat,
    to_messages,
    token_weights,
)
from evals import answer_accuracy, greedy_replies
from loss import lm_loss
from model import GPT
from storyworld import write_default_dataset
from tests.helpers import SFT_MODEL, crash_during_step, make_chats, make_checkpoint, write_jsonl
from tests.hf_models import make_model_dir
from tokenizer import IM_END
from trainers import SFTTrainer


def sft_config(d, **kw) -> SFTConfig:
    return SFTConfig(**{**dict(data_dir=str(d), out_dir=str(d / "sft"), init_from=str(d / "pretrain"),
                               sft_data=str(d / "train.jsonl"), sft_val_data=str(d / "val.jsonl"), device="cpu",
                               batch_size=8, max_steps=12, warmup_steps=2, lr=3e-3, eval_iters=2, log_interval=4,
                               save_interval=6, eval_samples=8, max_new_tokens=8), **kw})


# ----------------------------------------------------------------------------- the mask
MULTI_TURN = {"conversations": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tom has a ball."}, {"role": "assistant", "content": "Yes, a red ball."},
    {"role": "user", "content": "And Mia?"}, {"role": "assistant", "content": "Mia has a kite."}]}


@pytest.mark.parametrize("record", [
    MULTI_TURN,
    {"messages": MULTI_TURN["conversations"]},
    {"prompt": "Tom has a cat?", "response": "Tom has a cat."},
    {"prompt": "Tom has a cat?", "output": "Tom has a cat."},
    {"instruction": "Say it.", "input": "Mia has a cake.", "output": "Mia has a cake."},
    {"text": "问：Ben has a kite?\n答：Ben has a kite.\n问：Lily?\n答：Lily has a ball."},
])
def test_mask_covers_exactly_the_assistant_turns(record, tokenizer):
    messages = to_messages(record, "x.jsonl:1")
    ids, mask = tokenizer.apply_chat_template(messages, return_assistant_mask=True)
    input_ids, labels, loss_mask = shift_chat(ids, mask, max_len=1000)
    assert np.array_equal(input_ids, ids[:-1]) and np.array_equal(labels, ids[1:])  # shifted exactly once
    trained = [int(t) for t, m in zip(labels, loss_mask) if m]
    untrained = [int(t) for t, m in zip(labels, loss_mask) if not m]
    # Reference, from the messages alone: every assistant content followed by its <|im_end|>.
    assert tokenizer.decode(trained) == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
    n_turns = sum(m["role"] == "assistant" for m in messages)
    assert untrained.count(tokenizer.im_end_id) == len(messages) - n_turns  # other roles' ends are not trained
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in tokenizer.decode(untrained)


def test_truncation_keeps_the_mask_aligned(tokenizer, tmp_path):
    ids, mask = tokenizer.apply_chat_template(to_messages(MULTI_TURN, "x:1"), return_assistant_mask=True)
    full = shift_chat(ids, mask, max_len=1000)
    for max_len in (5, 20, len(ids) - 3):
        cut = shift_chat(ids, mask, max_len)
        assert all(len(a) == max_len for a in cut)
        assert all(np.array_equal(a, b[:max_len]) for a, b in zip(cut, full))
    path = write_jsonl(tmp_path / "chats.jsonl", [MULTI_TURN] * 2)
    dataset = SFTDataset(str(path), tokenizer, seq_len=len(ids) - 3)
    assert dataset.n_truncated == 2 and len(dataset) == 2
    assert all(np.array_equal(a, b) for a, b in zip(dataset.example(1), shift_chat(ids, mask, len(ids) - 3)))
    path = write_jsonl(tmp_path / "mixed.jsonl", [MULTI_TURN, MULTI_TURN, {"prompt": "a", "output": "b"}])
    assert len(SFTDataset(str(path), tokenizer, seq_len=len(ids) - 3, drop_long=True)) == 1
    with pytest.raises(ValueError, match="no chat has an assistant token"):
        SFTDataset(str(path), tokenizer, seq_len=5)  # the cut leaves no reply


def test_show_mask_marks_the_trained_tokens(tokenizer, sft_dirs):
    messages = to_messages(MULTI_TURN, "x:1")
    ids, mask = tokenizer.apply_chat_template(messages, return_assistant_mask=True)
    text = format_mask(tokenizer, *shift_chat(ids, mask, 1000))
    assert f"⟦Yes, a red ball.{IM_END}⟧" in text and f"⟦Mia has a kite.{IM_END}⟧" in text
    assert text.count("⟦") == 2 and text.replace("⟦", "").replace("⟧", "") == tokenizer.decode(ids)
    out = subprocess.run([sys.executable, "train_sft.py", "--show_mask", "--init_from", str(sft_dirs / "pretrain"),
                          "--sft_data", str(sft_dirs / "train.jsonl")], capture_output=True, text=True, check=True)
    thing = make_chats(1, 0)[0]["conversations"][1]["content"]
    assert f"⟦{thing}{IM_END}⟧" in out.stdout


def test_show_mask_gives_a_base_model_chatml_as_training_does(sft_dirs, tmp_path):
    """A Hugging Face base model (no chat template) is shown in the ChatML that SFT trains it in, not refused."""
    make_model_dir("gpt2", tmp_path / "gpt2")
    cfg = SFTConfig(init_from=str(tmp_path / "gpt2"), sft_data=str(sft_dirs / "train.jsonl"), device="cpu")
    text = SFTTrainer.show_mask(cfg)
    thing = make_chats(1, 0)[0]["conversations"][1]["content"]
    assert "<|im_start|>user" in text and f"⟦{thing}{IM_END}⟧" in text


# ----------------------------------------------------------------------------- loss, padding, packing
def test_loss_counts_only_masked_positions():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 1]])
    picked = -F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert lm_loss(logits, targets, loss_mask).item() == pytest.approx(picked[loss_mask == 1].mean().item(), rel=1e-6)
    noisy = logits + 100 * torch.randn_like(logits) * (loss_mask == 0)[..., None]
    other_targets = torch.where(loss_mask == 1, targets, (targets + 1) % 11)
    assert lm_loss(noisy, other_targets, loss_mask).item() == pytest.approx(lm_loss(logits, targets, loss_mask).item())


def test_weights_of_one_give_the_unweighted_loss(tokenizer, tmp_path):
    """The 0/1 mask as float weights is today's loss: cross entropy's mean over the masked-in targets."""
    torch.manual_seed(0)
    for shape in ((2, 7, 11), (8, 64, tokenizer.vocab_size)):
        logits, targets = 3 * torch.randn(shape), torch.randint(0, shape[-1], shape[:2])
        mask = (torch.rand(shape[:2]) > 0.4).long()
        unweighted = F.cross_entropy(logits.view(-1, shape[-1]), targets.masked_fill(mask == 0, -100).view(-1))
        torch.testing.assert_close(lm_loss(logits, targets, mask.float()), unweighted, rtol=1e-7, atol=0)
    path = write_jsonl(tmp_path / "chats.jsonl", make_chats(8, 0))
    batch = SFTDataset(str(path), tokenizer, 64).batch(range(8))
    assert batch["loss_mask"].dtype == torch.float32 and set(batch["loss_mask"].unique().tolist()) == {0.0, 1.0}


def test_think_weight_weighs_only_the_reasoning_tags(tokenizer, tmp_path):
    reply = "<think>Tom has a ball.</think>The ball."
    chats = [{"conversations": [{"role": "user", "content": "<think> Tom has a ball. What is it?"},
                                {"role": "assistant", "content": reply}]}] * 2
    path = write_jsonl(tmp_path / "reasoning.jsonl", chats)
    plain, weighted = (SFTDataset(str(path), tokenizer, 64, think_weight=w).batch([0, 1]) for w in (1.0, 10.0))
    think_tags = torch.isin(plain["labels"], torch.tensor(tokenizer.think_ids)) & (plain["loss_mask"] > 0)
    assert think_tags.sum() == 4  # <think> and </think> of each reply; the user's <think> is plain text
    assert torch.equal(weighted["loss_mask"], torch.where(think_tags, 10.0, plain["loss_mask"]))
    torch.manual_seed(0)
    logits = torch.randn(*plain["labels"].shape, tokenizer.vocab_size)
    # MiniMind's reasoning loss: the per-token losses times the weights, over the number of trained tokens.
    token_losses = F.cross_entropy(logits.transpose(1, 2), plain["labels"], reduction="none")
    minimind = (token_losses * weighted["loss_mask"]).sum() / (plain["loss_mask"] > 0).sum()
    torch.testing.assert_close(lm_loss(logits, weighted["labels"], weighted["loss_mask"]), minimind)
    ids, mask = tokenizer.apply_chat_template(to_messages(chats[0], "x:1"), return_assistant_mask=True)
    x, y, m = shift_chat(ids, mask, 1000)
    text = format_mask(tokenizer, x, y, token_weights(y, m, tokenizer.think_ids, 10.0))
    assert text.endswith("⟦<think>⟧×10⟦Tom has a ball.⟧⟦</think>⟧×10⟦The ball.<|im_end|>⟧\n")


def examples_loss(model, dataset, indices) -> float:
    """Reference: each chat alone, no padding; the mean over all trained tokens."""
    total, count = 0.0, 0
    for i in indices:
        x, y, m = (torch.from_numpy(a)[None] for a in dataset.example(i))
        n = int(m.sum())
        total += lm_loss(model(x), y, m).item() * n
        count += n
    return total / count


def test_padded_and_packed_batches_give_the_loss_of_separate_chats(tokenizer, tmp_path):
    dataset = SFTDataset(str(write_jsonl(tmp_path / "c.jsonl", make_chats(12, 3) + [MULTI_TURN])), tokenizer, 128)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**SFT_MODEL, "max_seq_len": 128})).eval()
    padded = dataset.batch([0, 12, 3])
    longest = max(len(dataset.example(i)[0]) for i in (0, 12, 3))
    assert padded["input_ids"].shape[1] == 16 * -(-longest // 16)  # rounded up to a multiple of 16
    assert (padded["loss_mask"][padded["input_ids"] == tokenizer.pad_id] == 0).all()
    loss = lm_loss(model(padded["input_ids"]), padded["labels"], padded["loss_mask"]).item()
    assert loss == pytest.approx(examples_loss(model, dataset, [0, 12, 3]), rel=1e-5)

    sampler = dataset.sampler(seed=0)
    packed = dataset.packed_batch(sampler, batch_size=2)
    stream, taken, rows, used = RowSampler(len(dataset), seed=0).next(len(dataset)), 0, 0, 0
    for i in stream:  # greedy packing into 2 rows, from the chats' lengths alone
        n = len(dataset.example(i)[0])
        if used + n > 128:
            rows, used = rows + 1, 0
            if rows == 2:
                break
        used, taken = used + n, taken + 1
    assert sampler.position == taken > 2  # the chats that fitted in 2 rows, several to a row
    order = stream[:taken]  # the chats it took, in order
    segment_ids, k = packed["segment_ids"], 0
    for row in range(2):  # whole chats in sampler order, each its own segment, then padding
        used = 0
        for seg in segment_ids[row].unique().tolist():
            if seg == 0:
                continue
            x = torch.from_numpy(dataset.example(order[k])[0])
            assert torch.equal(packed["input_ids"][row][segment_ids[row] == seg], x)
            used, k = used + len(x), k + 1
        following = order[k] if k < len(order) else sampler.peek()
        assert used + len(dataset.example(following)[0]) > 128  # the next chat did not fit
        assert (packed["loss_mask"][row][used:] == 0).all() and (segment_ids[row][used:] == 0).all()
    assert k == len(order)
    logits = model(packed["input_ids"], segment_ids=segment_ids)
    loss = lm_loss(logits, packed["labels"], packed["loss_mask"]).item()
    assert loss == pytest.approx(examples_loss(model, dataset, order), rel=1e-5)


def test_row_sampler_permutes_each_epoch_and_resumes_exactly():
    sampler = RowSampler(10, seed=3)
    first, second = sampler.next(10), sampler.next(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    resumed = RowSampler(10, seed=3)
    resumed.load_state_dict({"position": 7})
    assert resumed.next(8) == (first + second)[7:15]
    ranks = [RowSampler(10, seed=3, rank=r, world=2).next(5) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


# ----------------------------------------------------------------------------- reading chats
def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
    good = make_chats(3, 0)
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), "{broken", json.dumps(good[1]),
                               json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": ""}]}),
                               json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
                               json.dumps({"prompt": "hi"}), json.dumps(good[2])]) + "\n")
    with pytest.raises(DataError, match=r"chats.jsonl:2: not valid JSON"):
        load_chats(str(path))
    chats, skipped = load_chats(str(path), skip_bad_rows=True)
    assert skipped == 4 and chats == [to_messages(g, "") for g in good]
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"chats.jsonl:2: no field 'output'"):
        load_chats(str(path))


def test_hub_path_reads_the_same_chats_offline(tmp_path, tokenizer, hf_cache):
    """minimind's sft_mini_512.jsonl has this shape; `hf:json` + a local file runs the datasets path offline
    (streamed, as a hub dataset would be)."""
    rows = make_chats(5, 0) + [{"conversations": MULTI_TURN["conversations"]}]
    path = write_jsonl(tmp_path / "sft_mini_512.jsonl", rows)
    assert load_chats("hf:json", hf_data_files=str(path)) == load_chats(str(path))
    streamed, local = (SFTDataset(source, tokenizer, 64, hf_data_files=str(path)) for source in ("hf:json", str(path)))
    assert len(streamed) == len(local) == 6
    assert all(np.array_equal(a, b) for i in range(6) for a, b in zip(streamed.example(i), local.example(i)))
    assert (tmp_path / "hf_cache" / "nanollm").is_dir() and (tmp_path / ".cache").is_dir()


# ----------------------------------------------------------------------------- the token cache
def test_chats_are_tokenised_once_into_a_cache_that_follows_the_file(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "chats.jsonl", make_chats(20, 0))
    first = SFTDataset(str(path), tokenizer, 64)
    assert len(list((tmp_path / ".cache").iterdir())) == 1
    assert not list(tmp_path.glob(".cache/*.tmp*"))  # built under a temporary name, then renamed

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(dataset_module, "encode_chat", no_tokenising)
    again = SFTDataset(str(path), tokenizer, 32)  # another seq_len: the same cache
    assert all(np.array_equal(a[:32], b) for a, b in zip(first.example(3), again.example(3)))
    monkeypatch.undo()
    write_jsonl(path, make_chats(20, 1))  # an edited file gets a fresh cache
    edited = SFTDataset(str(path), tokenizer, 64)
    assert len(list((tmp_path / ".cache").iterdir())) == 2
    ids, mask = tokenizer.apply_chat_template(to_messages(make_chats(20, 1)[3], ""), return_assistant_mask=True)
    assert all(np.array_equal(a, b) for a, b in zip(edited.example(3), shift_chat(ids, mask, 64)))
    # The dataset holds the per-row arrays (memory-mapped) and open files, not the rows.
    assert all(isinstance(getattr(edited.rows, name), np.memmap) for name in ("offsets", "first_trained", "lines"))


def test_a_cache_built_skipping_bad_rows_still_stops_without_the_flag(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(make_chats(1, 0)[0]) + "\n{broken\n" + json.dumps(make_chats(1, 1)[0]) + "\n")
    assert SFTDataset(str(path), tokenizer, 64, skip_bad_rows=True).n_skipped == 1
    with pytest.raises(DataError, match=r"chats.jsonl:2: not valid JSON"):
        SFTDataset(str(path), tokenizer, 64)


# ----------------------------------------------------------------------------- evaluation and training
def test_batched_greedy_replies_match_one_by_one_generation(tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **SFT_MODEL)).eval()
    prompts = [[{"role": "user", "content": c["conversations"][0]["content"][:n]}]
               for c, n in zip(make_chats(5, 2), (8, 30, 15, 22, 3))]  # different lengths: left padding
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, reply in zip(prompts, replies):
        idx = torch.tensor([tokenizer.apply_chat_template(prompt, add_generation_prompt=True)])
        out = model.generate(idx, 6, temperature=0, eos_id=[tokenizer.im_end_id, tokenizer.eot_id])[0, idx.shape[1]:]
        out = out.tolist()
        cut = next((i for i, t in enumerate(out) if t in (tokenizer.im_end_id, tokenizer.eot_id)), len(out))
        assert reply == tokenizer.decode(out[:cut])
    # Chats whose expected answer is the model's own reply count as right, the others as wrong.
    records = [[*p, {"role": "assistant", "content": (r + " ") if i % 2 == 0 else "很好。"}]
               for i, (p, r) in enumerate(zip(prompts, replies))]
    assert answer_accuracy(model, tokenizer, records, max_new_tokens=6) == {
        "answer_acc": pytest.approx(3 / 5), "answer_acc_en": 1.0, "answer_acc_zh": 0.0}


def test_sft_learns_the_replies_and_resumes_exactly(sft_dirs):
    trainer = SFTTrainer(sft_config(sft_dirs, max_steps=40, lr=1e-2, save_interval=100), {})
    before = trainer.evaluate()
    after = trainer.train()
    assert after["val_loss"] < before["val_loss"] - 1.0, (before, after)
    assert after["answer_acc"] > before["answer_acc"], (before, after)
    assert after["train_loss"] < before["train_loss"] - 1.0, (before, after)
    best = checkpoint.load_run_info(sft_dirs / "sft" / "best")  # the one evaluation after step 0: the last
    assert best["step"] == 40 and best["metrics"] == pytest.approx(after, nan_ok=True)
    assert checkpoint.load_run_info(sft_dirs / "sft")["init_from"] == str(sft_dirs / "pretrain")

    def packed_run(out, **kw):  # packed batches: the sampler position is not a multiple of batch_size
        return SFTTrainer(sft_config(sft_dirs, out_dir=str(sft_dirs / out), pack=True, eval_samples=0, **kw), {})

    whole = packed_run("whole").train()
    crashing = packed_run("resumed")
    crash_during_step(crashing, 9, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = packed_run("resumed", resume=True)
    assert resumed.step == 6
    assert resumed.train()["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)


def test_best_is_by_answer_accuracy_then_loss_and_the_next_stage_starts_from_it(sft_dirs, tokenizer, monkeypatch,
                                                                               capsys):
    monkeypatch.chdir(sft_dirs)
    make_checkpoint(sft_dirs / "checkpoint" / "pretrain", tokenizer, "pretrain")  # the last model of the run
    best = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **SFT_MODEL))  # another one: its best
    checkpoint.save_checkpoint(sft_dirs / "checkpoint" / "pretrain" / "best", best, tokenizer,
                               {"stage": "pretrain", "step": 7, "metrics": {"val_loss": 1.5}})
    trainer = SFTTrainer(sft_config(sft_dirs, init_from=""), {})
    assert trainer.init_source == "checkpoint/pretrain/best"
    assert ("starting from checkpoint/pretrain/best (step 7: val_loss 1.5000), the default (--init_from picks "
            "another)") in capsys.readouterr().out
    assert all(torch.equal(v, best.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    score = trainer.score
    assert score({"answer_acc": 0.5, "val_loss": 2.0}) > score({"answer_acc": 0.4, "val_loss": 1.0})
    assert score({"answer_acc": 0.5, "val_loss": 1.0}) > score({"answer_acc": 0.5, "val_loss": 2.0})
    assert score({"val_loss": 1.0}) > score({"val_loss": 2.0})


def test_missing_pretrain_checkpoint_is_a_clear_error(sft_dirs, monkeypatch):
    monkeypatch.chdir(sft_dirs)
    with pytest.raises(FileNotFoundError, match=r"no pretrain checkpoint under checkpoint/: run `python "
                                                r"train_pretrain.py` first"):
        SFTTrainer(sft_config(sft_dirs, init_from=""), {})


def test_reasoning_flag_trains_on_the_reasoning_chats_of_the_data_dir(tmp_path, tokenizer):
    # train_sft.py --reasoning with no data flags: the StoryWorld reasoning chats prepared in --data_dir
    make_checkpoint(tmp_path / "pretrain", tokenizer, "pretrain", max_seq_len=1024)  # a lesson: ~600 tokens
    cfg, overrides = parse_train_args(SFTConfig, [
        "--reasoning", "--data_dir", str(tmp_path), "--init_from", str(tmp_path / "pretrain"), "--out_dir",
        str(tmp_path / "sft"), "--device", "cpu", "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1",
        "--eval_iters", "1", "--eval_samples", "2", "--max_new_tokens", "4"])
    with pytest.raises(FileNotFoundError, match=r"sft_reasoning_train.jsonl: missing \(prepare.py writes"):
        SFTTrainer(cfg, overrides)  # data prepared before the reasoning chats
    write_default_dataset(tmp_path, seed=0, n_stories=0, n_lessons=0, n_chats=8, n_pairs=0, n_val=4)
    trainer = SFTTrainer(cfg, overrides)
    assert all(chat[-1]["content"].startswith("<think>") for chat in trainer.answer_chats)
    batch = trainer.train_data.batch([0, 1])
    trained = batch["labels"][batch["loss_mask"] > 0]
    n_replies = sum(m["role"] == "assistant" for c in load_chats(str(tmp_path / "sft_reasoning_train.jsonl"))[0][:2]
                    for m in c)
    assert torch.isin(trained, torch.tensor(tokenizer.think_ids)).sum() == 2 * n_replies
    results = trainer.train()
    assert trainer.step == 2 and np.isfinite(results["val_loss"]) and 0 <= results["answer_acc"] <= 1


def test_epochs_set_the_steps_and_each_epoch_sees_every_chat_once(sft_dirs):
    trainer = SFTTrainer(sft_config(sft_dirs, epochs=1.5, batch_size=10, eval_samples=0, log_interval=10), {})
    assert trainer.cfg.max_steps == 30  # 1.5 x 200 chats / 10 per step
    trainer.train()
    assert trainer.sampler.position == 300
    drawn = RowSampler(200, seed=trainer.cfg.seed).next(300)
    assert sorted(drawn[:200]) == list(range(200)) and len(set(drawn[200:])) == 100


MEMORY_PROBE = """
import sys
from dataset import SFTDataset
from devices import peak_rss_bytes
from tokenizer import Tokenizer

source, tokenizer_dir, hold = sys.argv[1:]
tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
baseline = peak_rss_bytes()
data = SFTDataset(source, tokenizer, 256)  # tokenises the file into its cache, if not done yet
sampler = data.sampler(seed=0)
for _ in range(50):
    data.batch(sampler.next(16))
held = [data.rows.row(i) for i in range(len(data))] if hold == "hold" else []  # the control: every row in memory
print(peak_rss_bytes() - baseline, data.rows.meta["tokens"])
"""


def test_memory_grows_with_the_batch_not_with_the_file(tmp_path, data_dir):
    """Tokenising and training on a 10x larger chat file takes no more memory: rows are streamed into the cache
    and read back a batch at a time. Each run is a fresh process, its peak RSS counted after the imports; a
    control run that keeps every row in memory shows that the measurement sees it."""
    story = " ".join(chat["conversations"][0]["content"] for chat in make_chats(40, 5))  # ~1 KB

    def peak_growth(n: int, hold: str = "") -> tuple[int, int]:
        path = tmp_path / f"chats{n}.jsonl"
        if not path.exists():
            write_jsonl(path, [{"conversations": [{"role": "user", "content": f"Story {i}?"},
                                                  {"role": "assistant", "content": story}]} for i in range(n)])
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(data_dir), hold],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        growth, tokens = map(int, out.stdout.split())
        return growth, tokens

    (small, _), (large, tokens) = peak_growth(150), peak_growth(1500)
    control, _ = peak_growth(1500, "hold")
    assert control - large > 0.5 * 16 * tokens, (control, large, tokens)  # ids and mask, 8 bytes each, of ~0.9M
    assert large - small < 2 * 2**20, (small, large)
