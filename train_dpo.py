"""Align a chat model with preference pairs by direct preference optimisation (DPO).

With no arguments it starts from the latest checkpoint/sft (run train_sft.py first), trains on the embedded
StoryWorld pairs (data/storyworld/dpo_train.jsonl, validated on dpo_val.jsonl) and saves to checkpoint/dpo/.
The reference model is a frozen copy of the starting model; --precompute_ref computes its log-probabilities
once and frees it; --lora trains adapters instead (saved adapter-only, loadable by lora.load_lora_checkpoint) and
uses the same network with the adapters off as the reference. Evaluation reports the reward accuracy on the
validation pairs and the answer accuracy on held-out chats (sft_val.jsonl) before and after. Every flag is listed
by --help.
"""

from configs import DPOConfig, parse_train_args
from trainers import DPOTrainer, run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(DPOConfig, description=__doc__)
    run_stage(DPOTrainer, cfg, model_overrides)
