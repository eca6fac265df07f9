"""Learning from rewards: a reward model, GRPO and PPO, as stages of the one training loop (trainers.py).

  RewardTrainer  a Bradley-Terry reward model: the SFT model with a scalar head (GPT.add_value_head) read at the
                 last token of a reply, trained on preference pairs (train_reward.py)
  GRPOTrainer    group relative policy optimisation: several completions of each prompt, each rewarded relative
                 to the others of its group (train_grpo.py)
  PPOTrainer     PPO with a value head: the reward at the end of a completion, a KL penalty at each of its tokens,
                 GAE (train_ppo.py)

GRPO and PPO share the rollout (RolloutTrainer): the prompts of an optimizer step are sampled in one left-padded
batch through GPT.generate (its padding mask and KV cache), the completions are rewarded (the expected answer, a
small bonus for ending the reply, a reward model), and the result is cut into micro-batches that the loop trains
on like any other stage's. Bad rewards (a reward function that raises or returns NaN or inf) are counted and their
completions left out, never turned into a NaN step.
"""

import math

import torch

from checkpoint import load_value_head
from dataset import PromptDataset
from evals import answer_matches
from loss import (
    GRPOLoss,
    PPOLoss,
    gae,
    group_advantages,
    masked_mean,
    nanstd,
    reward_loss,
    token_logps,
    whiten,
)
from model import GPT
from pretrained import load_pretrained
from tokenizer import Tokenizer
from trainers import PolicyTrainer, chat_source, check_files, load_answer_chats


def attach_value_head(model: GPT, resume_dir=None) -> GPT:
    """model with a new value head (zero: every score starts at 0), or with resume_dir's trained one."""
    model.add_value_head()
    if resume_dir is not None:
        load_value_head(model, resume_dir)
    return model


def load_reward_model(directory, device="cpu") -> tuple[GPT, Tokenizer]:
    """A reward model written by train_reward.py (full, or LoRA adapters on their base), frozen, in eval mode."""
    model, tokenizer = load_pretrained(directory)
    attach_value_head(model, directory)
    return model.to(device).eval().requires_grad_(False), tokenizer


def last_token_scores(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      last: torch.Tensor) -> torch.Tensor:
    """The value head's scalar (B,) at position last[b] of each row: a reward model's score of a reply whose last
    token (its <|im_end|>) stands there."""
    _, values = model(input_ids, attention_mask=attention_mask, logits_to_keep=1, with_values=True)
    return values.float().gather(1, last[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- the reward model
class RewardTrainer(PolicyTrainer):
    """A Bradley-Terry reward model on preference pairs (trl's RewardTrainer): the starting model (SFT) with a
    scalar head, trained so that the chosen reply scores higher than the rejected one (loss.reward_loss).

    The score is read at the last token of each reply (its <|im_end|>), after the whole prompt and reply, which
    is also where GRPO and PPO read it. Evaluation reports the held-out pairwise accuracy (ties count as wrong) and
    the mean margin. The checkpoint is a plain GPT plus value_head.safetensors; load_reward_model reads it.
    """

    stage = "reward"

    def build_model(self) -> tuple[GPT, Tokenizer]:
        model, tokenizer = self.build_policy(needs_reference=False)
        if not model.config.tie_embeddings:
            model.lm_head.requires_grad_(False)  # the reward model never reads the logits
        return attach_value_head(model, self.out_dir if self.cfg.resume else None), tokenizer

    def build_data(self):
        self.build_pair_data(self.seq_len - 1)  # -1: the score is read after the last label, which is an input here

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.to_device(self.train_data.batch(self.sampler.next(self.cfg.batch_size)))

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The whole sequences: the first input, then the labels (the inputs shifted by one).
        input_ids = torch.cat([batch["input_ids"][:, :1], batch["labels"]], dim=1)
        reply_mask = torch.cat([torch.zeros_like(batch["loss_mask"][:, :1]), batch["loss_mask"]], dim=1)
        last = reply_mask.shape[1] - 1 - reply_mask.flip(1).argmax(1)  # each reply's last token
        chosen, rejected = last_token_scores(model, input_ids, None, last).chunk(2)
        loss = reward_loss(chosen, rejected, center_rewards_coefficient=self.cfg.center_rewards_coefficient)
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).detach().mean(),
                      "reward_mean": torch.cat([chosen, rejected]).detach().mean()}


# ----------------------------------------------------------------------------- sampling and rewarding completions
@torch.no_grad()
def sample_completions(model: GPT, prompts: list[list[int]], num_generations: int, max_new_tokens: int,
                       stop_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None) -> dict[str, torch.Tensor]:
    """num_generations completions of each prompt (token ids), all sampled in one batch by GPT.generate.

    Returns input_ids (N, P + C): each left-padded prompt then its completion, the rows of one prompt next to
    each other; attention_mask (N, P + C): 0 on the padding; completion_mask (N, C): 1 on each completion's tokens
    up to and including its first stop token (a completion that ran out of room has none).
    """
    rows = [ids for ids in prompts for _ in range(num_generations)]
    width = max(len(ids) for ids in rows)
    device = next(model.parameters()).device
    idx = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
    steps = min(max_new_tokens, model.config.max_seq_len - width)
    out = model.generate(idx, steps, temperature, top_k, top_p, eos_id=stop_ids, attention_mask=prompt_mask)
    stops = torch.isin(out[:, width:], torch.tensor(stop_ids, device=device)).long()
    completion_mask = (stops.cumsum(1) - stops == 0).long()  # no stop before this token
    return {"input_ids": out, "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "completion_mask": completion_mask}


def completion_logps(model: GPT, batch: dict[str, torch.Tensor], with_values: bool = False):
    """Log-probabilities (B, C) of the completion tokens of sample_completions' rows under model; with_values,
    also the value head's values (B, C) at the positions that predict them (the states the tokens act from)."""
    C = batch["completion_mask"].shape[1]
    out = model(batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1], logits_to_keep=C,
                with_values=with_values)
    logits, values = out if with_values else (out, None)
    logps = token_logps(logits, batch["input_ids"][:, -C:])
    return (logps, values[:, -C:].float()) if with_values else logps


def answer_reward(reply: str, answer: str, ended: bool, correct_reward: float = 1.0,
                  format_reward: float = 0.1) -> float:
    """The verifiable reward: correct_reward if the reply is the expected answer (evals.answer_matches), plus
    format_reward if it is not empty and ends with <|im_end|> (the model stopped, as SFT taught it to)."""
    return correct_reward * answer_matches(reply, answer) + format_reward * (ended and bool(reply.strip()))


class RolloutTrainer(PolicyTrainer):
    """What GRPO and PPO share: prompts, sampling, rewards, and a queue of micro-batches to train on.

    Each optimizer step draws batch_size * grad_accum prompts (per process), samples num_generations completions
    of each, rewards them, and queues grad_accum micro-batches of batch_size prompts, num_iterations times over
    (num_iterations optimizer steps per batch of completions). The queue is saved with the checkpoint (per rank), so
    --resume continues exactly. Evaluation is the answer accuracy on held-out chats. A subclass turns the sampled,
    rewarded completions into micro-batches (make_batches) and trains on them (compute_loss).
    """

    def build_data(self):
        cfg = self.cfg
        source = chat_source(cfg, "sft_train.jsonl", cfg.train_file)
        check_files(source, chat_source(cfg, "sft_val.jsonl", cfg.eval_chats) if cfg.eval_samples else None)
        self.reward_model = None
        if cfg.reward_model:  # loaded first: a wrong one is said before the prompts are tokenised
            self.reward_model, tokenizer = load_reward_model(cfg.reward_model, self.device)
            if tokenizer.fingerprint() != self.tokenizer.fingerprint():
                raise ValueError(f"--reward_model {cfg.reward_model} has another tokenizer than the policy")
            self.log(f"reward model {cfg.reward_model} (weight {cfg.reward_model_weight})")
        with self.rank_zero_first():  # rank 0 tokenises into the cache, the others then read it
            self.train_data = PromptDataset(source, self.tokenizer, self.seq_len - cfg.max_completion_length,
                                            **cfg.read_options())
        self.log(f"{source}: {len(self.train_data)} prompts ({self.train_data.n_too_long} left out as longer than "
                 f"seq_len - max_completion_length = {self.seq_len - cfg.max_completion_length} tokens"
                 + (f", {self.train_data.n_skipped} malformed rows skipped" if self.train_data.n_skipped else "") + ")")
        self.sampler = self.train_data.sampler(cfg.seed, self.rank, self.world)
        self.answer_chats = load_answer_chats(cfg, cfg.eval_chats, self.log)
        if self.reference is not None:
            self.reference.to(self.device).eval()
        self.stop_ids = [self.tokenizer.im_end_id, self.tokenizer.eot_id]
        self.reward_failure_logged = False
        self.queue: list[dict[str, torch.Tensor]] = []  # micro-batches still to train on

    def rows_per_epoch(self) -> int:
        return len(self.train_data) * self.cfg.num_iterations  # each prompt is trained on num_iterations times

    def eval_batches(self, split: str):
        return iter(())  # no loss to evaluate on held-out data: evaluation is the answer accuracy

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.queue:
            batches = self.rollout()
            self.queue = [batch for _ in range(self.cfg.num_iterations) for batch in batches]
        return self.queue.pop(0)

    def rank_state(self) -> dict:
        return {**super().rank_state(), "rollouts": [{k: v.cpu() for k, v in b.items()} for b in self.queue]}

    def load_rank_state(self, state: dict):
        super().load_rank_state(state)
        self.queue = [self.to_device(batch) for batch in state["rollouts"]]

    def reward(self, reply: str, answer: str, ended: bool) -> float:
        """The reward of one completion (a stage may override it): the verifiable answer_reward."""
        return answer_reward(reply, answer, ended, self.cfg.correct_reward, self.cfg.format_reward)

    def rollout(self) -> list[dict[str, torch.Tensor]]:
        """Sample and reward the completions of the next prompts; returns the grad_accum micro-batches."""
        cfg = self.cfg
        prompts, answers = zip(*(self.train_data.prompt(i) for i in self.sampler.next(cfg.batch_size * cfg.grad_accum)))
        self.model.eval()
        with self.autocast():
            sample = sample_completions(self.model, list(prompts), cfg.num_generations, cfg.max_completion_length,
                                        self.stop_ids, self.tokenizer.pad_id, cfg.temperature, cfg.top_k, cfg.top_p)
        rewards, stats = self.reward_completions(sample, [a for a in answers for _ in range(cfg.num_generations)])
        batches = self.make_batches(sample, rewards, stats)
        self.model.train()
        return batches

    def reward_completions(self, sample: dict[str, torch.Tensor], answers: list[str],
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """The reward (N,) of each completion, NaN where a reward failed (raised, or gave NaN or inf), and rollout
        statistics for the log."""
        completions, mask = sample["input_ids"][:, -sample["completion_mask"].shape[1]:], sample["completion_mask"]
        lengths = mask.sum(1)
        rewards, correct, empty, stopped, failures = [], [], [], [], []
        for ids, n, answer in zip(completions.tolist(), lengths.tolist(), answers):
            stopped.append(ids[n - 1] in self.stop_ids)
            reply = self.tokenizer.decode(ids[:n - 1] if stopped[-1] else ids[:n])
            correct.append(answer_matches(reply, answer))
            empty.append(not reply.strip())
            try:
                rewards.append(float(self.reward(reply, answer, ids[n - 1] == self.tokenizer.im_end_id)))
            except Exception as e:  # a broken reward function must not end the run: counted, and logged once
                failures.append(f"{type(e).__name__}: {e}")
                rewards.append(math.nan)
        if failures and not self.reward_failure_logged:
            self.log(f"a reward function failed ({failures[0]}); such completions are left out of training and "
                     f"counted in rollout/failed_rewards")
            self.reward_failure_logged = True
        rewards = torch.tensor(rewards, device=mask.device)
        if self.reward_model is not None:
            with self.autocast():
                scores = last_token_scores(self.reward_model, sample["input_ids"], sample["attention_mask"],
                                           sample["input_ids"].shape[1] - mask.shape[1] + lengths - 1)
            rewards = rewards + self.cfg.reward_model_weight * scores
        rewards = rewards.masked_fill(~torch.isfinite(rewards), math.nan)

        def share(flags):
            return sum(flags) / len(flags)

        stats = {"rollout/reward": torch.nanmean(rewards).item(), "rollout/reward_std": nanstd(rewards).item(),
                 "rollout/correct": share(correct), "rollout/failed_rewards": float(torch.isnan(rewards).sum()),
                 "rollout/completion_length": lengths.float().mean().item(), "rollout/empty": share(empty),
                 "rollout/truncated": 1 - share(stopped)}
        if self.reward_model is not None:
            stats["rollout/reward_model"] = torch.nanmean(scores.float()).item()
        return rewards, stats

    @torch.no_grad()
    def sampling_logps(self, model, batch, with_values: bool = False):
        """completion_logps of a micro-batch without gradients, under the stage's autocast."""
        with self.autocast():
            return completion_logps(model, batch, with_values)

    def split(self, batch: dict[str, torch.Tensor], stats: dict[str, float]) -> list[dict[str, torch.Tensor]]:
        """The rollout's rows cut into grad_accum micro-batches (of batch_size prompts' completions when none were
        left out), each carrying the rollout's statistics (0-dim tensors, logged with the loss)."""
        device = batch["input_ids"].device
        extra = {name: torch.tensor(value, device=device) for name, value in stats.items()}
        parts = torch.tensor_split(torch.arange(len(batch["input_ids"]), device=device), self.cfg.grad_accum)
        return [{**{k: v[rows] for k, v in batch.items()}, **extra} for rows in parts]

    @staticmethod
    def logged(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k.startswith("rollout/")}


# ----------------------------------------------------------------------------- GRPO
class GRPOTrainer(RolloutTrainer):
    """Group relative policy optimisation (DeepSeekMath; as trl's GRPOTrainer).

    The num_generations completions of a prompt form a group; a completion's advantage is its reward less the
    group's mean, over the group's standard deviation (--scale_rewards), so no value model is needed. The loss is
    loss.GRPOLoss: clipped ratios against the policy that sampled (old log-probabilities, kept when
    num_iterations > 1), and with beta > 0 the k3 KL to the frozen reference.
    """

    stage = "grpo"

    def __init__(self, cfg, model_overrides: dict | None = None):
        self.loss_fn = GRPOLoss(cfg.beta, cfg.epsilon, cfg.epsilon_high, cfg.loss_type, cfg.max_completion_length)
        super().__init__(cfg, model_overrides)

    def build_model(self) -> tuple[GPT, Tokenizer]:
        return self.build_policy(needs_reference=self.cfg.beta > 0)

    def make_batches(self, sample, rewards, stats) -> list[dict[str, torch.Tensor]]:
        cfg = self.cfg
        advantages, no_signal = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        failed = torch.isnan(rewards)
        batch = {**sample, "completion_mask": sample["completion_mask"] * ~failed[:, None], "advantages": advantages}
        stats["rollout/frac_reward_zero_std"] = no_signal.float().mean().item()
        if cfg.skip_equal_groups and (~no_signal).sum() >= cfg.grad_accum:  # at least a row per micro-batch
            batch = {k: v[~no_signal] for k, v in batch.items()}
        batches = self.split(batch, stats)
        for micro in batches:  # the log-probabilities of the policy that sampled, and of the reference
            if cfg.num_iterations > 1:
                micro["old_logps"] = self.sampling_logps(self.model, micro)
            if cfg.beta > 0:
                with self.reference_model() as reference:
                    micro["ref_logps"] = self.sampling_logps(reference, micro)
        return batches

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = completion_logps(model, batch)
        loss, metrics = self.loss_fn(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                                     batch["completion_mask"])
        return loss, {**metrics, **self.logged(batch)}


# ----------------------------------------------------------------------------- PPO
class PPOTrainer(RolloutTrainer):
    """PPO for language models with a value head on the policy (InstructGPT; alignmentnanoGPT; trl's PPOTrainer).

    Each completion is an episode whose actions are its tokens. A token's reward is -beta times its KL to the
    frozen reference (log π - log π_ref, as sampled), and the last token also gets the completion's reward (the
    verifiable one, a reward model's score, or both). The critic, a value head on the policy's last hidden state,
    estimates each state's return; GAE turns rewards and values into advantages (whitened over the batch) and
    returns, and loss.PPOLoss trains the clipped policy and clipped value losses, num_iterations epochs over each
    batch of completions. The checkpoint is the policy as a plain GPT, plus value_head.safetensors for --resume.
    """

    stage = "ppo"

    def __init__(self, cfg, model_overrides: dict | None = None):
        self.loss_fn = PPOLoss(cfg.epsilon, cfg.cliprange_value, cfg.vf_coef)
        super().__init__(cfg, model_overrides)

    def build_model(self) -> tuple[GPT, Tokenizer]:
        model, tokenizer = self.build_policy(needs_reference=self.cfg.beta > 0)
        return attach_value_head(model, self.out_dir if self.cfg.resume else None), tokenizer

    def make_batches(self, sample, rewards, stats) -> list[dict[str, torch.Tensor]]:
        cfg = self.cfg
        failed = torch.isnan(rewards)
        mask = sample["completion_mask"] * ~failed[:, None]
        batches = self.split({**sample, "completion_mask": mask}, stats)
        for micro in batches:  # log-probabilities and values at sampling time, and the reference's
            micro["old_logps"], micro["old_values"] = self.sampling_logps(self.model, micro, with_values=True)
            if cfg.beta > 0:
                with self.reference_model() as reference:
                    micro["ref_logps"] = self.sampling_logps(reference, micro)
        old_logps, old_values = (torch.cat([b[k] for b in batches]) for k in ("old_logps", "old_values"))
        kl = torch.zeros_like(old_logps)  # log π - log π_ref of each sampled token
        if cfg.beta > 0:
            kl = (old_logps - torch.cat([b["ref_logps"] for b in batches])) * mask
        token_rewards = -cfg.beta * kl
        last = (mask.sum(1) - 1).clamp(min=0)
        token_rewards[torch.arange(len(last)), last] += torch.nan_to_num(rewards, nan=0.0) * (mask.sum(1) > 0)
        advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        rows = cfg.batch_size * cfg.num_generations
        for i, micro in enumerate(batches):
            part = slice(i * rows, (i + 1) * rows)
            micro["advantages"], micro["returns"] = advantages[part], returns[part]
            micro["rollout/kl"] = kl.sum(1).mean()
            micro["rollout/value_mean"] = masked_mean(old_values, mask)
        return batches

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, values = completion_logps(model, batch, with_values=True)
        loss, metrics = self.loss_fn(logps, batch["old_logps"], values, batch["old_values"],
                                     batch["advantages"], batch["returns"], batch["completion_mask"])
        return loss, {**metrics, **self.logged(batch)}
