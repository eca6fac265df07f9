"""Reinforce correct answers with GRPO (group relative policy optimisation).

With no arguments it starts from the latest checkpoint/sft and, at each step, samples several replies to each of
a few StoryWorld questions (data/storyworld/sft_train.jsonl), rewards the ones that give the expected answer
(plus a small bonus for a reply that ends properly), and makes the better-than-their-group replies more likely.
It saves to checkpoint/grpo/ and reports the answer accuracy on held-out chats (sft_val.jsonl) before, during
and after. --reward_model checkpoint/reward adds a reward model's score (train_reward.py); --beta > 0 adds a KL
penalty to the starting model; --lora trains adapters. Every flag is listed by --help.
"""

from configs import GRPOConfig, parse_train_args
from rl import GRPOTrainer
from trainers import run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(GRPOConfig, description=__doc__)
    run_stage(GRPOTrainer, cfg, model_overrides)
