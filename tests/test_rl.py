"""The reward model, GRPO and PPO trainers: sampling, rewards, learning, bad input, checkpoints and exact resume."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from configs import GRPOConfig, ModelConfig, PPOConfig, RewardConfig
from dataset import PromptDataset
from model import GPT
from rl import (
    GRPOTrainer,
    PPOTrainer,
    RewardTrainer,
    completion_logps,
    load_reward_model,
    pack_groups,
    sample_completions,
)
from tests.helpers import TINY_MODEL, during_step, make_chats, make_checkpoint, torchrun, write_jsonl
from trainers import Stopped

# An answer is preferred to a refusal (a tiny model learns that in a few steps; which answer is right needs more).
PAIRS = [(f"{name} has a {thing}. What is it?", f"The {thing}.", refusal)
         for name in ("Tom", "Mia", "Ben", "Lily") for thing, refusal in (("ball", "I don't know."), ("kite", "No."),
                                                                         ("cat", "I can't tell."), ("cake", "No."))]


@pytest.fixture
def rl_setup(tmp_path, tokenizer):
    """A tiny random 'sft' checkpoint, prompt chats and preference pairs."""
    make_checkpoint(tmp_path / "sft", tokenizer, "sft")
    write_jsonl(tmp_path / "prompts.jsonl", make_chats(64, 0))
    write_jsonl(tmp_path / "val.jsonl", make_chats(8, 1))
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(tmp_path / "pairs.jsonl", rows[:12])
    write_jsonl(tmp_path / "pairs_val.jsonl", rows[12:])
    return tmp_path


COMMON = dict(device="cpu", warmup_steps=1, eval_interval=100, save_interval=100, log_interval=1, eval_samples=0,
              max_new_tokens=8, seq_len=0)


def make_rl(cls, root, **train):
    config = {GRPOTrainer: GRPOConfig, PPOTrainer: PPOConfig}[cls]
    cfg = config(**{**COMMON, **dict(init_from=str(root / "sft"), out_dir=str(root / cls.stage), data_dir=str(root),
                                     train_file=str(root / "prompts.jsonl"), eval_chats=str(root / "val.jsonl"),
                                     batch_size=2, num_generations=4, max_completion_length=8, max_steps=4,
                                     lr=1e-2, min_lr=1e-2), **train})
    return cls(cfg, {})


def make_reward(root, **train):
    cfg = RewardConfig(**{**COMMON, **dict(init_from=str(root / "sft"), out_dir=str(root / "reward"),
                                           data_dir=str(root), train_file=str(root / "pairs.jsonl"),
                                           val_file=str(root / "pairs_val.jsonl"), batch_size=4, max_steps=30,
                                           eval_interval=30, lr=1e-2, min_lr=1e-3), **train})
    return RewardTrainer(cfg, {})


def flags(**kwargs) -> list[str]:
    return [a for k, v in kwargs.items() for a in (f"--{k}", str(v))]


def train_records(directory) -> list[dict]:
    records = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


# ----------------------------------------------------------------------------- sampling
def test_completions_are_sampled_in_one_left_padded_batch_as_each_prompt_alone(tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "max_seq_len": 40})).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Tom has a ball.", "Mia has a red kite. What is it?")]
    stop = [tokenizer.im_end_id, tokenizer.eot_id]
    sample = sample_completions(model, prompts, 3, 6, stop, tokenizer.pad_id, temperature=0)
    assert sample["completion_ids"].shape[0] == 6 and sample["completion_mask"].shape[1] <= 6
    assert sample["prompt_mask"].sum(1).tolist() == [len(p) for p in prompts]  # left-padded to one width
    for row, prompt in enumerate(p for p in prompts for _ in range(3)):
        alone = model.generate(torch.tensor([prompt]), 6, temperature=0, eos_id=stop)[0, len(prompt):]
        n = int(sample["completion_mask"][row].sum())
        assert sample["completion_ids"][row, :n].tolist() == alone[:n].tolist()
        assert n == len(alone) or alone[n - 1].item() in stop  # the mask ends at the first stop token


def test_completion_logps_are_each_completion_scored_alone(tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY_MODEL, "max_seq_len": 40})).eval()
    model.add_value_head()
    torch.nn.init.normal_(model.value_head.weight)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Tom has a ball.", "Mia has a red kite. What is it?")]
    sample = sample_completions(model, prompts, 3, 6, [tokenizer.im_end_id], tokenizer.pad_id)
    # Each prompt once, its completions after it in the same row (pack_groups), against each completion alone.
    logps, values = completion_logps(model, {**pack_groups(sample), **sample}, with_values=True)
    ((logps + values) * sample["completion_mask"]).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for row, prompt in enumerate(p for p in prompts for _ in range(3)):
        n = int(sample["completion_mask"][row].sum())
        ids = torch.tensor([prompt + sample["completion_ids"][row, :n].tolist()])
        logits, alone = model(ids, with_values=True)
        expected = logits[0, len(prompt) - 1:-1].log_softmax(-1).gather(1, ids[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(logps[row, :n], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[row, :n], alone[0, len(prompt) - 1:-1], atol=1e-5, rtol=0)
        # The gradients reach the shared prompt's tokens as they do from each completion alone.
        (expected + alone[0, len(prompt) - 1:-1]).sum().backward()
    for shared, alone in zip(shared_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-4)


def test_prompt_data_keep_the_first_question_and_count_the_prompts_that_do_not_fit(tmp_path, tokenizer):
    chats = make_chats(5, 0)
    chats[2] = {"conversations": [{"role": "user", "content": "Tom has a ball. " * 40 + "What is it?"},
                                  {"role": "assistant", "content": "The ball."}]}
    path = write_jsonl(tmp_path / "p.jsonl", chats)
    data = PromptDataset(str(path), tokenizer, max_prompt_tokens=40)
    assert len(data) == 4 and data.n_too_long == 1
    ids, answer = data.prompt(0)
    first = chats[0]["conversations"]
    assert ids == tokenizer.apply_chat_template(first[:1], add_generation_prompt=True)
    assert answer == first[1]["content"]
    with pytest.raises(ValueError, match="no prompt fits in 5 tokens"):
        PromptDataset(str(path), tokenizer, max_prompt_tokens=5)


# ----------------------------------------------------------------------------- GRPO learns
def starts_with_a_letter_or_space(text: str) -> bool:
    return text[:1].isascii() and (text[:1].isalpha() or text[:1] == " ")


def reward_a_letter_or_space_first(trainer, tokenizer) -> torch.Tensor:
    """Make trainer reward a reply that starts with an ASCII letter or a space; returns the tokens that do (a mask
    over the vocabulary)."""
    trainer.reward = lambda reply, answer, ended: float(starts_with_a_letter_or_space(reply))
    return torch.tensor([starts_with_a_letter_or_space(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)])


def first_token_mass(trainer, rewarded: torch.Tensor) -> float:
    """The policy's probability that a reply starts with a rewarded token, averaged over the prompts."""
    prompts = [trainer.train_data.prompt(i)[0] for i in range(16)]
    with torch.no_grad():
        trainer.model.eval()
        probs = [trainer.model(torch.tensor([ids]))[0, -1].softmax(-1)[rewarded].sum().item() for ids in prompts]
    return sum(probs) / len(probs)


def test_grpo_raises_the_reward_of_a_rewarded_first_token(rl_setup, tokenizer):
    # One-token completions: the reward is the token's, and every gradient is about it.
    trainer = make_rl(GRPOTrainer, rl_setup, max_steps=10, batch_size=4, num_generations=8, max_completion_length=1)
    rewarded = reward_a_letter_or_space_first(trainer, tokenizer)
    before = first_token_mass(trainer, rewarded)
    trainer.train()
    after = first_token_mass(trainer, rewarded)
    assert 0.05 < before < 0.8
    assert after > before + 0.1
    records = train_records(rl_setup / "grpo")
    assert records[-1]["rollout/reward"] > records[0]["rollout/reward"]
    assert {"rollout/frac_reward_zero_std", "rollout/completion_length", "clip_ratio/region_mean"} <= set(records[0])


def test_grpo_with_kl_and_several_iterations_keeps_the_reference_frozen(rl_setup, tokenizer):
    trainer = make_rl(GRPOTrainer, rl_setup, beta=0.1, num_iterations=2, epsilon_high=0.28, loss_type="dr_grpo")
    reward_a_letter_or_space_first(trainer, tokenizer)
    start = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.train()
    records = train_records(rl_setup / "grpo")
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first step: policy = reference
    assert records[1]["kl"] > 0 and records[1]["clip_ratio/region_mean"] >= 0
    assert all(torch.equal(v, start[k]) for k, v in trainer.reference.state_dict().items())
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))


def check_exact_resume(cls, root):
    """A run of cls stopped by Ctrl-C at step 3 and resumed from its checkpoint ends with the weights and losses of an
    uninterrupted one."""
    def run(out, **kw):
        return make_rl(cls, root, out_dir=str(root / out), max_steps=5, num_iterations=2, **kw)

    whole = run("whole")
    whole.train()
    crashing = run("resumed")
    during_step(crashing, 2, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C in step 2: saved at step 3
    with pytest.raises(Stopped):
        crashing.train()
    resumed = run("resumed", resume=True)
    assert resumed.step == 3 and len(resumed.queue) == 1  # step 3: the second pass over step 2's completions
    resumed.train()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [r["loss"] for r in train_records(root / "whole")] == [r["loss"] for r in train_records(root / "resumed")]


def test_grpo_resumes_exactly(rl_setup):
    check_exact_resume(GRPOTrainer, rl_setup)


# ----------------------------------------------------------------------------- bad input
def test_failing_rewards_empty_replies_and_equal_groups_are_counted_never_a_nan_step(rl_setup, tokenizer):
    trainer = make_rl(GRPOTrainer, rl_setup, max_steps=3, log_interval=1)
    calls = {"n": 0}

    def flaky(reply, answer, ended):
        calls["n"] += 1
        if calls["n"] % 4 == 1:
            raise RuntimeError("the reward server is down")
        return {2: math.nan, 3: math.inf, 0: 1.0}[calls["n"] % 4]

    trainer.reward = flaky
    generate = trainer.model.generate

    def empty_replies(idx, *args, **kwargs):  # every reply is <|im_end|> at once
        out = generate(idx, *args, **kwargs)
        out[:, idx.shape[1]:] = tokenizer.im_end_id
        return out

    trainer.model.generate = empty_replies
    trainer.train()
    records = train_records(rl_setup / "grpo")
    assert len(records) == 3
    for r in records:
        assert r["rollout/failed_rewards"] == 6  # 3 of every 4 replies: raised, NaN, inf
        assert r["rollout/empty"] == 1 and r["rollout/completion_length"] == 1
        assert r["rollout/frac_reward_zero_std"] == 1  # one valid reward per group: no signal
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])


@pytest.mark.parametrize("skip", [True, False])
def test_groups_with_equal_rewards_are_left_out_of_training_only_when_asked(rl_setup, skip):
    trainer = make_rl(GRPOTrainer, rl_setup, skip_equal_groups=skip, grad_accum=2)
    prompts = [trainer.train_data.prompt(i)[0] for i in range(4)]
    sample = sample_completions(trainer.model, prompts, 4, 8, trainer.stop_ids, trainer.tokenizer.pad_id)
    rewards = torch.tensor([1., 1., 1., 1., 0., 1., 0., 0., 0., 0., 0., 0., 1., 0., 1., 0.])  # groups 0 and 2 equal
    batches = trainer.make_batches(sample, rewards, {})
    assert len(batches) == 2 and all(b["rollout/frac_reward_zero_std"] == 0.5 for b in batches)
    rows = torch.cat([b["completion_ids"] for b in batches])
    prompts_trained = torch.cat([b["input_ids"][:, :sample["prompt_ids"].shape[1]] for b in batches])
    advantages = torch.cat([b["advantages"] for b in batches])
    if skip:  # the 8 replies of groups 1 and 3, in order, and no zero advantage among them
        assert torch.equal(rows, sample["completion_ids"][[4, 5, 6, 7, 12, 13, 14, 15]]) and (advantages != 0).all()
        assert torch.equal(prompts_trained, sample["prompt_ids"][[1, 3]])
    else:
        assert torch.equal(rows, sample["completion_ids"]) and (advantages == 0).sum() == 8
        assert torch.equal(prompts_trained, sample["prompt_ids"])


def test_bad_settings_fail_with_one_line(rl_setup):
    for cls, kwargs, message in [(GRPOTrainer, {"num_generations": 1}, "^--num_generations must be >= 2 for GRPO"),
                                 (GRPOTrainer, {"scale_rewards": "global"}, "^--scale_rewards must be one of group"),
                                 (GRPOTrainer, {"loss_type": "ppo"}, "^--loss_type must be one of grpo"),
                                 (GRPOTrainer, {"num_iterations": 0}, "^--num_iterations must be >= 1, got 0$"),
                                 (PPOTrainer, {"lam": 2.0}, "^--lam must be between 0 and 1, got 2.0$"),
                                 (PPOTrainer, {"max_completion_length": 64}, "no prompt fits")]:
        with pytest.raises(ValueError, match=message):
            make_rl(cls, rl_setup, **kwargs)


# ----------------------------------------------------------------------------- the reward model
def test_reward_model_learns_the_pairs_and_scores_rollouts(rl_setup):
    trainer = make_reward(rl_setup)
    assert trainer.evaluate()["val_accuracy"] == 0  # a zero head: every pair ties, and a tie counts as wrong
    results = trainer.train()
    assert results["val_accuracy"] == 1 and results["val_margin"] > 0
    model, _ = load_reward_model(rl_setup / "reward")
    assert GPT.from_pretrained(rl_setup / "reward").value_head is None  # model.safetensors stays a plain GPT
    assert torch.equal(model.value_head.weight, trainer.model.value_head.weight.cpu())
    ppo = make_rl(PPOTrainer, rl_setup, reward_model=str(rl_setup / "reward"), correct_reward=0, format_reward=0,
                  max_steps=2)
    ppo.train()
    records = train_records(rl_setup / "ppo")
    assert records[0]["rollout/reward"] == records[0]["rollout/reward_model"] != 0


def test_lora_reward_model_saves_adapters_and_head_and_loads_for_scoring(rl_setup):
    trainer = make_reward(rl_setup, lora=True, lora_r=4, max_steps=5)
    trainer.train()
    assert {p.name for p in (rl_setup / "reward").iterdir()} >= {"adapter.safetensors", checkpoint.VALUE_HEAD}
    model, _ = load_reward_model(rl_setup / "reward")
    batch = next(trainer.eval_batches("val"))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, batch)[0], trainer.compute_loss(trainer.model, batch)[0])


# ----------------------------------------------------------------------------- PPO
def test_ppo_raises_the_reward_and_its_critic_learns(rl_setup, tokenizer):
    trainer = make_rl(PPOTrainer, rl_setup, max_steps=10, batch_size=16, num_iterations=2, max_completion_length=1)
    rewarded = reward_a_letter_or_space_first(trainer, tokenizer)
    before = first_token_mass(trainer, rewarded)
    trainer.train()
    assert first_token_mass(trainer, rewarded) > before + 0.1
    records = train_records(rl_setup / "ppo")
    # A critic that learned nothing (the zero head: every value 0) has value loss 0.5 * mean(return^2), which for
    # 0/1 rewards is 0.5 * the mean reward (the first step, before any update); the trained one does much better.
    # (Step to step the loss is noisy: each batch is new, and the rewards rise as the policy learns.)
    assert records[0]["value_loss"] == pytest.approx(0.5 * records[0]["rollout/reward"], rel=1e-3)
    assert records[-1]["value_loss"] < 0.75 * 0.5 * records[-1]["rollout/reward"]
    assert records[0]["rollout/kl"] == pytest.approx(0, abs=1e-6) and records[-1]["rollout/kl"] > 0


def test_ppo_checkpoint_is_a_plain_gpt_plus_its_head_and_resumes_exactly(rl_setup):
    check_exact_resume(PPOTrainer, rl_setup)
    assert GPT.from_pretrained(rl_setup / "whole").value_head is None
    assert (rl_setup / "whole" / checkpoint.VALUE_HEAD).exists()


def test_lora_grpo_and_ppo_train_adapters_and_the_value_head_only(rl_setup, tokenizer):
    grpo = make_rl(GRPOTrainer, rl_setup, lora=True, beta=0.1, max_steps=2, lora_r=4)
    reward_a_letter_or_space_first(grpo, tokenizer)
    base = {k: v.clone() for k, v in grpo.model.state_dict().items() if ".lora_" not in k}
    grpo.train()
    assert all(torch.equal(v, grpo.model.state_dict()[k]) for k, v in base.items())
    assert train_records(rl_setup / "grpo")[-1]["kl"] > 0  # the reference: the adapters off
    ppo = make_rl(PPOTrainer, rl_setup, lora=True, max_steps=2, lora_r=4)
    ppo.reward = grpo.reward
    ppo.train()
    assert ppo.model.value_head.weight.abs().sum() > 0
    assert {p.name for p in (rl_setup / "ppo").iterdir()} >= {"adapter.safetensors", checkpoint.VALUE_HEAD}
    resumed = make_rl(PPOTrainer, rl_setup, lora=True, max_steps=3, lora_r=4, resume=True)
    assert torch.equal(resumed.model.value_head.weight, ppo.model.value_head.weight)


def test_ppo_under_torchrun_saves_each_ranks_rollouts_and_resumes(rl_setup):
    args = flags(init_from=rl_setup / "sft", out_dir=rl_setup / "ddp", train_file=rl_setup / "prompts.jsonl",
                 device="cpu", compile="false", batch_size=2, num_generations=2, max_completion_length=4,
                 num_iterations=2, max_steps=3, eval_samples=0, seq_len=0, save_interval=100, log_interval=1)
    torchrun(2, "train_ppo.py", *args)
    ranks = checkpoint.load_train_state(rl_setup / "ddp")["rank_rng"]
    assert [len(rank["rollouts"]) for rank in ranks] == [1, 1]  # the second pass over step 2's completions
    prompts = [rank["rollouts"][0]["input_ids"] for rank in ranks]
    assert not torch.equal(prompts[0], prompts[1])  # each rank samples its own prompts
    resumed = torchrun(2, "train_ppo.py", *args, "--max_steps", "4", "--resume")
    assert "resuming ppo from step 3" in resumed.stdout
    assert len(train_records(rl_setup / "ddp")) == 4


def test_train_grpo_without_an_sft_checkpoint_says_to_run_sft_first(tmp_path):
    result = subprocess.run([sys.executable, str(Path("train_grpo.py").resolve()), "--device", "cpu"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: no sft checkpoint under checkpoint/: run `python "
                                                      "train_sft.py` first, or pass --init_from DIR")
