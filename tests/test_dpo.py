"""DPO: the loss against trl's, log-probabilities over replies only, preference formats, and the trainer."""

import json
import math
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import lora
from configs import DPOConfig, ModelConfig
from dataset import DataError, PreferenceDataset, to_preference, tokenize_pair, truncate_pair
from evals import answer_accuracy
from loss import DPOLoss, sequence_logps
from model import GPT
from tests.helpers import TINY_MODEL, make_chats, make_checkpoint, write_jsonl
from trainers import DPOTrainer, Trainer


# ----------------------------------------------------------------------------- the loss
def trl_dpo(loss_type, beta, token_logps, completion_mask, ref_chosen, ref_rejected):
    """trl's DPOTrainer._compute_loss on given per-token log-probs, with a stub trainer and model."""
    from trl import DPOTrainer as TRLDPOTrainer

    rows, width = completion_mask.shape
    outputs = SimpleNamespace(log_probs=token_logps * completion_mask[:, 1:], entropy=torch.zeros(rows, width - 1),
                              mean_logits=torch.zeros(rows, width - 1),
                              is_top1=torch.zeros(rows, width - 1, dtype=torch.bool))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
        label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
        use_weighting=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x))
    inputs = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones(rows, width),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = TRLDPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl(loss_type, beta):
    gen = torch.Generator().manual_seed(0)
    pairs, width = 6, 12
    mask = (torch.rand(2 * pairs, width, generator=gen) < 0.6).float()
    mask[:, 0] = 0  # the first token is never predicted
    mask[:, 1] = 1  # every reply has a token
    token_logps = -torch.rand(2 * pairs, width - 1, generator=gen) * 3
    ref = -torch.rand(2 * pairs, generator=gen) * 20
    expected_loss, trl_metrics = trl_dpo(loss_type, beta, token_logps, mask, *ref.chunk(2))

    logps = (token_logps * mask[:, 1:]).sum(-1)
    lengths = mask.sum(-1)
    loss, chosen_rewards, rejected_rewards = DPOLoss(beta, loss_type)(*logps.chunk(2), *ref.chunk(2), *lengths.chunk(2))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-6)
    assert chosen_rewards.shape == rejected_rewards.shape == (pairs,)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], rel=1e-5, abs=1e-6)
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(trl_metrics["rewards/margins"],
                                                                             rel=1e-5, abs=1e-6)
    assert (chosen_rewards > rejected_rewards).float().mean().item() == trl_metrics["rewards/accuracies"]


def test_conservative_dpo_and_bad_options():
    # trl 1.16's sigmoid loss has no label smoothing, so conservative DPO is checked against its formula.
    c, r, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), torch.zeros(2)
    loss, _, _ = DPOLoss(beta=0.5, label_smoothing=0.2)(c, r, rc, rr)
    x = 0.5 * ((c - rc) - (r - rr))
    expected = (-(0.8 * torch.log(torch.sigmoid(x))) - 0.2 * torch.log(torch.sigmoid(-x))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert DPOLoss()(c, c, c, c)[0].item() == pytest.approx(math.log(2))  # policy = reference
    for kwargs in ({"loss_type": "kto"}, {"beta": 0}, {"label_smoothing": 0.5},
                   {"loss_type": "hinge", "label_smoothing": 0.1}):
        with pytest.raises(ValueError):
            DPOLoss(**kwargs)


def test_sequence_logps_counts_only_masked_tokens():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]])
    expected = [sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]].item() for t in range(7) if mask[b, t])
                for b in range(3)]
    got = sequence_logps(logits, labels, mask)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # Whatever the unmasked positions hold (even an out-of-range padding label) changes nothing.
    labels2, logits2 = labels.masked_fill(mask == 0, -100), logits.masked_fill((mask == 0).unsqueeze(-1), 50.0)
    assert torch.allclose(sequence_logps(logits2, labels2, mask), got)


# ----------------------------------------------------------------------------- data
USER, BOT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def test_every_preference_format(tmp_path):
    story = {"prompt": "Tom has a ball. What does Tom have?", "chosen": "A ball.", "rejected": "A cat.",
             "fact": "thing", "lang": "en"}
    assert to_preference(story, "f:1") == ([msg(USER, story["prompt"])], [msg(BOT, "A ball.")], [msg(BOT, "A cat.")])

    minimind = {"chosen": [msg(USER, "hi"), msg(BOT, "hello!")], "rejected": [msg(USER, "hi"), msg(BOT, "go away")]}
    assert to_preference(minimind, "f:2") == ([msg(USER, "hi")], [msg(BOT, "hello!")], [msg(BOT, "go away")])

    hh = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 3?\n\nHuman: Sure?\n\nAssistant: It is 4.",
          "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 3?\n\nHuman: Sure?\n\nAssistant: Yes, 3."}
    assert to_preference(hh, "f:3") == ([msg(USER, "What is 2+2?"), msg(BOT, "3?"), msg(USER, "Sure?")],
                                        [msg(BOT, "It is 4.")], [msg(BOT, "Yes, 3.")])

    dahoas = {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "response": " An apple.", "chosen": " An apple.",
              "rejected": " A rock."}
    assert to_preference(dahoas, "f:4") == ([msg(USER, "Name a fruit.")], [msg(BOT, "An apple.")],
                                            [msg(BOT, "A rock.")])


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "f:9: unknown preference format"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "f:9: field 'rejected' is not a string"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "f:9: rejected.* empty assistant turn"),
    ({"chosen": [msg(USER, "hi"), msg(BOT, "a")], "rejected": [msg(USER, "hi"), msg(BOT, "a")]}, "do not differ"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "f:9: 'chosen' and 'rejected' do not differ"),
    ({"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "a", "rejected": "a"}, "f:9: .* do not differ"),
    ({"chosen": [msg(USER, "hi"), msg(BOT, "a")], "rejected": [msg(USER, "yo"), msg(BOT, "b")]}, "share no prompt"),
    ({"chosen": [msg("robot", "x"), msg(BOT, "a")], "rejected": []}, "f:9: chosen\\[0\\] has unknown role"),
    ({"chosen": "Tom: hi", "rejected": "Tom: yo"}, "f:9: field 'chosen' is not in the"),
])
def test_malformed_pairs_name_file_line_and_field(record, message):
    with pytest.raises(DataError, match=message):
        to_preference(record, "f:9")


def test_bad_rows_stop_or_are_skipped_and_counted(tmp_path, tokenizer):
    good = {"prompt": "Tom has a ball.", "chosen": "A ball.", "rejected": "A cat."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": "x", "chosen": "y"}, good])
    with pytest.raises(DataError, match=r"p.jsonl:2: unknown preference format"):
        PreferenceDataset(str(path), tokenizer, 64)
    data = PreferenceDataset(str(path), tokenizer, 64, skip_bad_rows=True)
    assert (len(data), data.n_skipped) == (2, 1)
    # A line that is not JSON at all stops the same way, or is skipped and counted the same way.
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:2: not valid JSON"):
        PreferenceDataset(str(path), tokenizer, 64)
    data = PreferenceDataset(str(path), tokenizer, 64, skip_bad_rows=True)
    assert (len(data), data.n_skipped) == (2, 1)
    # A pair with no reply token within seq_len stops too (found when the cached pairs are read).
    path = write_jsonl(tmp_path / "r.jsonl", [good])
    with pytest.raises(DataError, match=r"r.jsonl:1: no reply token fits in 2 tokens; raise --seq_len"):
        PreferenceDataset(str(path), tokenizer, 2)


def test_pairs_stream_from_an_hf_dataset_as_from_the_file(tmp_path, tokenizer, hf_cache):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS[:5]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    streamed, local = (PreferenceDataset(source, tokenizer, 64, hf_data_files=str(path))
                       for source in ("hf:json", str(path)))
    assert len(streamed) == len(local) == 5
    for i in range(5):
        for (ids, mask), (local_ids, local_mask) in zip(streamed.pair(i), local.pair(i)):
            assert np.array_equal(ids, local_ids) and np.array_equal(mask, local_mask)


def test_masks_cover_only_the_reply_and_truncation_cuts_the_prompt_first(tokenizer):
    prompt = [msg(USER, "Tom has a red ball. " * 8 + "What does Tom have?")]
    chosen, rejected = [msg(BOT, "Tom has a ball.")], [msg(BOT, "A cat.")]
    pair = tokenize_pair(tokenizer, prompt, chosen, rejected)
    (c_ids, c_mask), (r_ids, r_mask), truncated = truncate_pair(*pair, 10_000)
    assert not truncated
    assert tokenizer.decode([t for t, m in zip(c_ids, c_mask) if m]) == "Tom has a ball.<|im_end|>"
    assert tokenizer.decode([t for t, m in zip(r_ids, r_mask) if m]) == "A cat.<|im_end|>"
    full = len(c_ids)

    (c_ids, c_mask), (r_ids, r_mask), truncated = truncate_pair(*pair, full - 20)
    assert truncated and len(c_ids) == full - 20
    assert tokenizer.decode([t for t, m in zip(c_ids, c_mask) if m]) == "Tom has a ball.<|im_end|>"  # reply whole
    assert tokenizer.decode(c_ids).endswith("What does Tom have?<|im_end|>\n<|im_start|>assistant\nTom has a ball."
                                            "<|im_end|>\n")  # the prompt lost its start, not its question
    assert np.array_equal(c_ids[:-len(tokenizer.apply_chat_template(chosen))],
                          r_ids[:-len(tokenizer.apply_chat_template(rejected))])

    (c_ids, c_mask), _, _ = truncate_pair(*pair, 6)  # not even the reply fits
    assert len(c_ids) == 6 and not tokenizer.decode(c_ids).startswith("What")


def test_padded_batch_log_probs_equal_each_sequence_alone(tmp_path, tokenizer):
    rows = [{"prompt": "Tom has a ball. What does Tom have?", "chosen": "A ball.", "rejected": "A red cat, I think."},
            {"prompt": "Mia has a kite.", "chosen": "Mia has a kite, a red kite.", "rejected": "No."}]
    data = PreferenceDataset(str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 64)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "max_seq_len": 64})).eval()
    batch = data.batch([0, 1])
    assert (batch["input_ids"] == tokenizer.pad_id).any()  # there is padding to leak
    with torch.no_grad():
        got = sequence_logps(model(batch["input_ids"]), batch["labels"], batch["loss_mask"])
        expected = []
        for ids, mask in [data.pair(0)[0], data.pair(1)[0], data.pair(0)[1], data.pair(1)[1]]:
            logps = torch.log_softmax(model(torch.from_numpy(ids[:-1])[None])[0], -1)
            expected.append(sum(logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]))
    assert got.tolist() == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- the trainer
# The preferred replies name a ball or a kite, the rejected ones a cat or a cake: learnable by a tiny model.
PAIRS = [(f"{name} has a {good} and a {bad}. What does {name} like?", f"{name} likes the {good}.",
          f"{name} likes the {bad}.") for name in ("Tom", "Mia", "Ben", "Lily") for good in ("ball", "kite")
         for bad in ("cat", "cake")]


@pytest.fixture
def dpo_setup(tmp_path, tokenizer):
    """A tiny starting checkpoint and train/val preference files."""
    make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(tmp_path / "train.jsonl", rows[:12])
    write_jsonl(tmp_path / "val.jsonl", rows[12:])
    return tmp_path


def make_dpo(root, model_overrides=None, **train):
    cfg = DPOConfig(**{**dict(init_from=str(root / "sft"), out_dir=str(root / "dpo"), data_dir=str(root),
                              train_file=str(root / "train.jsonl"), val_file=str(root / "val.jsonl"),
                              device="cpu", batch_size=4, seq_len=64,
                              max_steps=12, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_interval=6, eval_iters=1,
                              save_interval=6, beta=0.5, eval_samples=0), **train})
    return DPOTrainer(cfg, model_overrides)


def test_dpo_raises_reward_accuracy_and_keeps_the_reference_frozen(dpo_setup):
    trainer = make_dpo(dpo_setup, max_steps=20, eval_interval=20)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.evaluate()["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    trainer.train()
    records = [json.loads(line) for line in (dpo_setup / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 20  # logged every step
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected"):
        assert key in train[0] and f"val_{key}" in records[-1], key
    assert sum(r["loss"] for r in train[-5:]) / 5 < math.log(2) - 0.2
    assert sum(r["rewards/accuracy"] for r in train[-5:]) / 5 > 0.9
    assert records[-1]["val_rewards/accuracy"] > 0.9 and records[-1]["val_rewards/margin"] > 0  # unseen names
    # The reference never moved; the policy did.
    assert all(torch.equal(v, start[k]) for k, v in trainer.reference.state_dict().items())
    assert not all(torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_precomputed_reference_trains_the_same_without_a_reference_model(dpo_setup):
    held = make_dpo(dpo_setup, max_steps=4, out_dir=str(dpo_setup / "held"))
    held.train()
    pre = make_dpo(dpo_setup, max_steps=4, out_dir=str(dpo_setup / "pre"), precompute_ref=True)
    assert pre.reference is None
    pre.train()
    a, b = held.model.state_dict(), pre.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_rebuilds_the_reference_from_the_starting_checkpoint(dpo_setup):
    make_dpo(dpo_setup, max_steps=6).train()
    resumed = make_dpo(dpo_setup, max_steps=12, resume=True)
    start = GPT.from_pretrained(dpo_setup / "sft").state_dict()
    assert resumed.step == 6
    assert all(torch.equal(v, start[k]) for k, v in resumed.reference.state_dict().items())
    assert not all(torch.equal(v, start[k]) for k, v in resumed.model.state_dict().items())


def test_non_finite_loss_is_skipped_and_a_run_of_them_stops_with_the_checkpoint_kept(dpo_setup, capsys):
    trainer = make_dpo(dpo_setup)
    compute_loss, calls = trainer.compute_loss, {"n": 0}

    def nan_at_step_1_and_from_step_7(model, batch):
        loss, metrics = compute_loss(model, batch)
        if not model.training:  # evaluation
            return loss, metrics
        calls["n"] += 1
        if calls["n"] == 2:
            return loss + float("inf"), metrics  # an infinite loss whose gradients are finite
        return (loss * float("nan") if calls["n"] > 8 else loss), metrics

    trainer.compute_loss = nan_at_step_1_and_from_step_7
    with pytest.raises(FloatingPointError, match="10 non-finite steps in a row.*last good checkpoint"):
        trainer.train()
    assert "step 1: non-finite loss or gradient, step skipped (1 in a row)" in capsys.readouterr().out
    assert checkpoint.load_train_state(dpo_setup / "dpo")["step"] == 6
    assert not (dpo_setup / "dpo.tmp").exists()


def test_train_dpo_without_an_sft_checkpoint_says_to_run_sft_first(tmp_path):
    result = subprocess.run([sys.executable, str(__import__("pathlib").Path("train_dpo.py").resolve()),
                             "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: no sft checkpoint under checkpoint/: run `python "
                                                      "train_sft.py` first, or pass --init_from DIR")


# ----------------------------------------------------------------------------- --lora and the answer accuracy
def lora_dpo(root, **train):
    return make_dpo(root, **{**dict(lora=True, lora_r=4, lora_alpha=8, lr=1e-2, min_lr=1e-3), **train})


def base_name(name: str) -> str:
    """A wrapped layer's parameter name as the plain model has it."""
    return name.replace(".base.", ".")


def test_lora_reference_is_the_base_model_and_holds_no_copy(dpo_setup):
    # Model dropout on: the reference must still run in eval mode, as a frozen copy would.
    trainer = lora_dpo(dpo_setup, model_overrides={"dropout": 0.5}, lora_dropout=0.3)
    assert trainer.reference is None
    with torch.no_grad():
        for layer in lora.lora_layers(trainer.model):
            layer.lora_B.normal_(0, 0.2)
    base = GPT.from_pretrained(dpo_setup / "sft").eval()
    batch = trainer.val_data.batch([0, 1, 2])
    trainer.model.train()
    with torch.no_grad():
        expected = sequence_logps(base(batch["input_ids"]), batch["labels"], batch["loss_mask"])
        got = trainer._reference_logps(batch)
        trainer.model.eval()
        policy = sequence_logps(trainer.model(batch["input_ids"]), batch["labels"], batch["loss_mask"])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-2)  # the adapters do change the policy
    trainer.model.train()
    trainer._reference_logps(batch)
    assert trainer.model.training and all(layer.enabled for layer in lora.lora_layers(trainer.model))  # restored


def test_dpo_with_lora_trains_only_the_adapters_and_saves_loadable_adapters(dpo_setup):
    trainer = lora_dpo(dpo_setup, max_steps=20, eval_interval=20)
    start = GPT.from_pretrained(dpo_setup / "sft").state_dict()
    loss, _ = trainer.compute_loss(trainer.model, trainer.val_data.batch([0, 1, 2, 3]))
    loss.backward()
    for name, p in trainer.model.named_parameters():
        if ".lora_B" in name:  # (A's gradient is zero while B is: B starts at zero)
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif ".lora_A" not in name:
            assert p.grad is None and not p.requires_grad, name
    trainer.optimizer.zero_grad(set_to_none=True)

    results = trainer.train()
    assert results["val_rewards/accuracy"] > 0.9 and results["val_rewards/margin"] > 0
    state = trainer.model.state_dict()
    base = {base_name(k): v for k, v in state.items() if ".lora_" not in k}
    assert base.keys() == start.keys() and all(torch.equal(v, start[k]) for k, v in base.items())
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B" in k)

    out = dpo_setup / "dpo"
    assert not (out / checkpoint.WEIGHTS).exists()
    config = lora.read_adapter_config(out)
    assert config["base_checkpoint"] == str(dpo_setup / "sft") and config["r"] == 4
    model, _ = lora.load_lora_checkpoint(out)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    trainer.model.eval()
    assert torch.allclose(model(idx), trainer.model(idx), atol=1e-6)

    resumed = lora_dpo(dpo_setup, max_steps=24, resume=True, lora_r=8)
    assert resumed.step == 20 and resumed.reference is None and resumed.lora_settings["r"] == 4
    assert resumed.init_source == str(dpo_setup / "sft")
    assert all(torch.equal(v, state[k]) for k, v in resumed.model.state_dict().items())


def test_an_adapter_checkpoint_to_start_from_is_merged_or_refused_with_lora(dpo_setup, tokenizer):
    model = GPT.from_pretrained(dpo_setup / "sft")
    settings = dict(r=4, alpha=8, dropout=0.0, use_rslora=False, targets=["q_proj", "down_proj"])
    lora.apply_lora(model, **settings)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
    lora.save_lora_checkpoint(dpo_setup / "lora", model, tokenizer, dpo_setup / "sft", settings, {"stage": "lora"})

    trainer = make_dpo(dpo_setup, init_from=str(dpo_setup / "lora"))
    assert not lora.lora_layers(trainer.model)  # folded in: DPO trains all weights of SFT + LoRA
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    assert torch.allclose(trainer.model.eval()(idx), model.eval()(idx), atol=1e-5)
    assert trainer.evaluate()["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = merged start
    with pytest.raises(ValueError, match="holds LoRA adapters, and --lora needs a full checkpoint.*--export_merged"):
        lora_dpo(dpo_setup, init_from=str(dpo_setup / "lora"))


def test_evaluate_reports_the_answer_accuracy_before_and_after(dpo_setup, tokenizer):
    chats = make_chats(12, 3)
    write_jsonl(dpo_setup / "chats.jsonl", chats)
    trainer = make_dpo(dpo_setup, max_steps=2, eval_interval=10, eval_chats=str(dpo_setup / "chats.jsonl"),
                       eval_samples=5, max_new_tokens=8)
    assert len(trainer.answer_chats) == 5
    expected = answer_accuracy(trainer.model, tokenizer, [c["conversations"] for c in chats[:5]], 8)
    results = trainer.evaluate()
    assert {k: results[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    trainer.train()
    records = [json.loads(line) for line in (dpo_setup / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "answer_acc" in r] == [0, 2]  # before and after DPO
    assert "answer_acc" not in str(make_dpo(dpo_setup, overwrite=True).evaluate())  # eval_samples=0: off


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_autocast_is_entered_once_per_region_and_off_outside_it(dpo_setup, monkeypatch, precompute_ref):
    """Entering one autocast object again while it is active leaves autocast on after both exit (for backward
    and the optimizer step too): the reference's forward must run in compute_loss's region, not open its own."""
    depth, regions, steps = [0], [], []
    original = Trainer.autocast

    @contextmanager
    def counted(self):
        depth[0] += 1
        regions.append(depth[0])
        try:
            with original(self):
                yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(Trainer, "autocast", counted)
    trainer = make_dpo(dpo_setup, dtype="bfloat16", max_steps=2, eval_interval=1, eval_iters=1, eval_samples=2,
                       eval_chats=str(write_jsonl(dpo_setup / "chats.jsonl", make_chats(2, 0))),
                       precompute_ref=precompute_ref)
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(torch.is_autocast_enabled("cpu")) or step(*a, **k)
    trainer.train()
    assert len(regions) > 6 and set(regions) == {1}  # never nested
    assert steps == [False, False] and not torch.is_autocast_enabled("cpu")
