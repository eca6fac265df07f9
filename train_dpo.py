"""Align a chat model with preference pairs by direct preference optimisation (DPO).

With no arguments it starts from the latest checkpoint/sft (run train_sft.py first), trains on the embedded
StoryWorld pairs (data/storyworld/dpo_train.jsonl, validated on dpo_val.jsonl) and saves to checkpoint/dpo/.
The reference model is a frozen copy of the starting model; --precompute_ref computes its log-probabilities
once and frees it. Every flag is listed by --help.
"""

from configs import DPOConfig
from trainers import DPOTrainer, run_stage

if __name__ == "__main__":
    run_stage(DPOTrainer, DPOConfig, description=__doc__)
