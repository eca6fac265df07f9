"""LoRA fine-tuning: train low-rank adapters on a frozen model, on the same chats and masked loss as SFT.

With no arguments it loads the latest checkpoint/sft (else checkpoint/pretrain), trains adapters on the
embedded StoryWorld chats and saves only the adapters (a few MB) to checkpoint/lora/, naming their base.
`--export_merged DIR` instead folds the saved adapters into their base and writes a full checkpoint to DIR.
Every flag is listed by --help (the LoRA ones start with lora_).
"""

from pathlib import Path

import lora
from configs import LoRAConfig, exit_on_bad_input, parse_train_args
from trainers import LoRATrainer, check_out_dir, run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(LoRAConfig, description=__doc__)
    if cfg.export_merged:
        with exit_on_bad_input():
            check_out_dir(Path(cfg.export_merged), "lora", resume=False, overwrite=cfg.overwrite)
            out = lora.export_merged(cfg.out_dir or "checkpoint/lora", cfg.export_merged)
        print(f"saved {out}: the adapters folded into their base weights")
    elif cfg.show_mask:
        with exit_on_bad_input():
            print(LoRATrainer.show_mask(cfg))
    else:
        run_stage(LoRATrainer, cfg, model_overrides)
