"""Reinforce correct answers with PPO: a policy with a value head (critic), per-token KL penalty, GAE.

With no arguments it starts from the latest checkpoint/sft and, at each step, samples a reply to each of a batch
of StoryWorld questions (data/storyworld/sft_train.jsonl), rewards the ones that give the expected answer (plus a
small bonus for a reply that ends properly), subtracts a KL penalty to the starting model at every token, and
trains the policy and its critic for several epochs on the batch. It saves to checkpoint/ppo/ and reports the
answer accuracy on held-out chats (sft_val.jsonl) before, during and after. --reward_model checkpoint/reward
rewards with a reward model's score (train_reward.py; add --correct_reward 0 --format_reward 0 to use it alone);
--lora trains adapters. Every flag is listed by --help.
"""

from configs import PPOConfig, parse_train_args
from rl import PPOTrainer
from trainers import run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(PPOConfig, description=__doc__)
    run_stage(PPOTrainer, cfg, model_overrides)
