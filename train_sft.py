"""Supervised fine-tuning: turn a pretrained model into a chat model, training only on the assistant's tokens.

With no arguments it loads the best model of the latest checkpoint/pretrain, trains one pass (plan.py) over the
embedded StoryWorld lessons (data/storyworld/sft_train.jsonl: stories with all their questions) and saves to
checkpoint/sft/, reporting the masked validation loss and the answer accuracy on held-out questions before and
after. `--show_mask` prints a tokenised chat with the trained tokens marked. Every flag is listed by --help.
Multi-GPU: torchrun --nproc_per_node N train_sft.py
"""

from configs import SFTConfig, exit_on_bad_input, parse_train_args
from trainers import SFTTrainer, run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(SFTConfig, description=__doc__)
    if cfg.show_mask:
        with exit_on_bad_input():
            print(SFTTrainer.show_mask(cfg))
    else:
        run_stage(SFTTrainer, cfg, model_overrides)
