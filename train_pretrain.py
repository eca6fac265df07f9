"""Pretrain a GPT from scratch: next-token prediction on the token files that prepare.py writes.

With no arguments it prepares the embedded story data set if needed, trains the model and the budget that
plan.py gives this device (on a CPU the `tiny` preset on 1.2M tokens, about 5 minutes on 2 cores), says which
at start, and saves to checkpoint/pretrain/. Every flag is listed by --help.
Multi-GPU: torchrun --nproc_per_node N train_pretrain.py
"""

from configs import TrainConfig, parse_train_args
from trainers import PretrainTrainer, run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(TrainConfig, description=__doc__)
    run_stage(PretrainTrainer, cfg, model_overrides)
