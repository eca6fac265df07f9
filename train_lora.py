"""LoRA fine-tuning: train low-rank adapters on a frozen model, on the same chats and masked loss as SFT.

With no arguments it loads the latest checkpoint/sft (else checkpoint/pretrain), trains adapters on the
embedded StoryWorld chats and saves only the adapters (a few MB) to checkpoint/lora/, naming their base.
`--export_merged DIR` instead folds the saved adapters into their base and writes a full checkpoint to DIR.
Every flag is listed by --help (the LoRA ones start with lora_).
"""

import sys

import lora
from configs import LoRAConfig, parse_train_args
from train_sft import main as sft_main
from trainers import LoRATrainer


def main(argv=None):
    cfg, _ = parse_train_args(LoRAConfig, argv, __doc__)
    if cfg.export_merged:
        try:
            out = lora.export_merged(cfg.out_dir or "checkpoint/lora", cfg.export_merged)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(f"saved {out}: the adapters folded into their base weights")
        return
    sft_main(LoRATrainer, LoRAConfig, __doc__, argv)


if __name__ == "__main__":
    main()
