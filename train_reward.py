"""Train a reward model on preference pairs: the SFT model with a scalar head, scored at the end of each reply.

With no arguments it starts from the latest checkpoint/sft, trains on the embedded StoryWorld pairs
(data/storyworld/dpo_train.jsonl, validated on dpo_val.jsonl) with trl's Bradley-Terry loss and saves to
checkpoint/reward/ (the trunk as a plain GPT checkpoint, plus value_head.safetensors). Evaluation reports the
held-out pairwise accuracy (the chosen reply scored higher) and the mean margin. GRPO and PPO use it with
--reward_model checkpoint/reward. Every flag is listed by --help.
"""

from configs import RewardConfig, parse_train_args
from rl import RewardTrainer
from trainers import run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(RewardConfig, description=__doc__)
    run_stage(RewardTrainer, cfg, model_overrides)
