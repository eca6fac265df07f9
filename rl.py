"""Learning from rewards: a reward model, GRPO and PPO, as stages of the one training loop (trainers.py).

  RewardTrainer  a Bradley-Terry reward model: the SFT model with a scalar head (GPT.add_value_head) read at the
                 last token of a reply, trained on preference pairs (train_reward.py)
  GRPOTrainer    group relative policy optimisation: several completions of each prompt, each rewarded relative
                 to the others of its group (train_grpo.py)
  PPOTrainer     PPO with a value head: the reward at the end of a completion, a KL penalty at each of its tokens,
                 GAE (train_ppo.py)

GRPO and PPO share the rollout (RolloutTrainer): the prompts of an optimizer step are sampled in one left-padded
batch through GPT.generate (its padding mask and KV cache, each prompt read once for all its completions), the
completions are rewarded (the expected answer, a small bonus for ending the reply, a reward model), and the result
is cut into micro-batches that the loop trains on like any other stage's: rows that hold each prompt once, followed
by its completions (pack_groups). Bad rewards (a reward function that raises or returns NaN or inf) are counted
and their completions left out, never turned into a NaN step.
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
    """num_generations completions of each prompt (token ids), all sampled in one batch by GPT.generate, which
    reads each prompt once (num_samples).

    Returns prompt_ids and prompt_mask (P, W): the prompts left-padded to one width W, 0 on the padding;
    completion_ids (N, C), N = P * num_generations, the completions of one prompt next to each other;
    completion_mask (N, C): 1 on each completion's tokens up to and including its first stop token (a
    completion that ran out of room has none).
    """
    width = max(len(ids) for ids in prompts)
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    steps = min(max_new_tokens, model.config.max_seq_len - width)
    out = model.generate(prompt_ids, steps, temperature, top_k, top_p, eos_id=stop_ids, attention_mask=prompt_mask,
                         num_samples=num_generations)
    completion_ids = out[:, width:]
    stops = torch.isin(completion_ids, torch.tensor(stop_ids, device=device)).long()
    completion_mask = (stops.cumsum(1) - stops == 0).long()  # no stop before this token
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


# A sample's tensors with a row per prompt; the others have a row per completion.
PROMPT_KEYS = ("prompt_ids", "prompt_mask")


def group_size(sample: dict[str, torch.Tensor]) -> int:
    """Completions per prompt in a sample (or a micro-batch of pack_groups' rows: one row per prompt)."""
    return len(sample["completion_ids"]) // len(sample["prompt_ids" if "prompt_ids" in sample else "input_ids"])


def full_rows(sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (N, W + C): each completion after its own copy of its prompt."""
    prompt_ids, prompt_mask = (sample[k].repeat_interleave(group_size(sample), 0) for k in PROMPT_KEYS)
    return (torch.cat([prompt_ids, sample["completion_ids"]], 1),
            torch.cat([prompt_mask, sample["completion_mask"]], 1))


def pack_groups(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows the policy is trained on: each prompt once, followed by its group's completions, in one row.

    The G completions of a prompt share its tokens instead of each repeating them (a StoryWorld question is ~100
    tokens, a reply ~8): GPT.forward's branch_ids let each completion see the prompt and itself only, and
    positions start every completion where the prompt ends, so each completion's log-probabilities are those of
    the prompt and it alone (tests/test_rl.py). Returns input_ids, attention_mask (key padding), branch_ids
    and positions, all (P, W + G * C).
    """
    prompt_ids, prompt_mask = sample["prompt_ids"], sample["prompt_mask"]
    (P, W), C, G = prompt_ids.shape, sample["completion_ids"].shape[1], group_size(sample)
    device = prompt_ids.device
    branches = torch.arange(G + 1, device=device).repeat_interleave(torch.tensor([W] + [C] * G, device=device))
    positions = torch.cat([torch.arange(W, device=device), W + torch.arange(C, device=device).repeat(G)])
    return {"input_ids": torch.cat([prompt_ids, sample["completion_ids"].reshape(P, G * C)], 1),
            "attention_mask": torch.cat([prompt_mask, sample["completion_mask"].reshape(P, G * C)], 1),
            "branch_ids": branches.expand(P, -1), "positions": positions.expand(P, -1)}


def select_groups(sample: dict[str, torch.Tensor], groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompts numbered in groups and their completions' rows."""
    size = group_size(sample)
    rows = (groups[:, None] * size + torch.arange(size, device=groups.device)).view(-1)
    return {k: v[groups] if k in PROMPT_KEYS else v[rows] for k, v in sample.items()}


def completion_logps(model: GPT, batch: dict[str, torch.Tensor], with_values: bool = False):
    """Log-probabilities (N, C) of the completion tokens under model, from pack_groups' rows; with_values, also
    the value head's values (N, C) at the positions that predict them (the states the tokens act from)."""
    (N, C), G = batch["completion_ids"].shape, group_size(batch)
    # The logits of the prompt's last token (which predicts every completion's first) and of all completion tokens.
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], branch_ids=batch["branch_ids"],
                positions=batch["positions"], logits_to_keep=G * C + 1, with_values=with_values)
    logits, values = out if with_values else (out, None)
    # Token j of completion g is predicted by its token j - 1, kept at g * C + j, or for j = 0 by the prompt, at 0.
    j = torch.arange(C, device=logits.device)
    predictor = torch.where(j == 0, 0, torch.arange(G, device=logits.device)[:, None] * C + j).view(-1)
    logps = token_logps(logits[:, predictor].reshape(N, C, -1), batch["completion_ids"])
    if not with_values:
        return logps
    return logps, values[:, -(G * C + 1):][:, predictor].reshape(N, C).float()


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
        completions, mask = sample["completion_ids"], sample["completion_mask"]
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
            input_ids, attention_mask = full_rows(sample)
            with self.autocast():
                scores = last_token_scores(self.reward_model, input_ids, attention_mask,
                                           sample["prompt_ids"].shape[1] + lengths - 1)
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

    def split(self, sample: dict[str, torch.Tensor], stats: dict[str, float],
              groups: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """The rollout's prompts (or only those numbered in groups) with their completions, cut into grad_accum
        micro-batches (of batch_size prompts when none were left out) of pack_groups' rows, each carrying the
        rollout's statistics (0-dim tensors, logged with the loss)."""
        device = sample["prompt_ids"].device
        extra = {name: torch.tensor(value, device=device) for name, value in stats.items()}
        if groups is None:
            groups = torch.arange(len(sample["prompt_ids"]), device=device)
        batches = []
        for part in torch.tensor_split(groups, self.cfg.grad_accum):
            micro = select_groups(sample, part)
            batches.append({**pack_groups(micro), **{k: v for k, v in micro.items() if k not in PROMPT_KEYS},
                            **extra})
        return batches

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
        sample = {**sample, "completion_mask": sample["completion_mask"] * ~failed[:, None], "advantages": advantages}
        stats["rollout/frac_reward_zero_std"] = no_signal.float().mean().item()
        with_signal = (~no_signal).view(-1, cfg.num_generations)[:, 0].nonzero().squeeze(1)  # those groups
        skip = cfg.skip_equal_groups and len(with_signal) >= cfg.grad_accum  # at least a group per micro-batch
        batches = self.split(sample, stats, with_signal if skip else None)
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
        sizes = [len(micro["completion_ids"]) for micro in batches]
        for micro, part_advantages, part_returns in zip(batches, advantages.split(sizes), returns.split(sizes)):
            micro["advantages"], micro["returns"] = part_advantages, part_returns
            micro["rollout/kl"] = kl.sum(1).mean()
            micro["rollout/value_mean"] = masked_mean(old_values, mask)
        return batches

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, values = completion_logps(model, batch, with_values=True)
        loss, metrics = self.loss_fn(logps, batch["old_logps"], values, batch["old_values"],
                                     batch["advantages"], batch["returns"], batch["completion_mask"])
        return loss, {**metrics, **self.logged(batch)}
