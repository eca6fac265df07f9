"""Knowledge distillation: a smaller student learns from a trained teacher's next-token distributions.

With no arguments the teacher is the latest checkpoint/sft and the student a fresh model of --preset (with any
model flag, e.g. --n_layers 3 --dim 96), trained on the embedded StoryWorld chats and saved to checkpoint/distill/.
The loss is alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher, student) on the trained tokens, D the generalised
Jensen-Shannon divergence of GKD (--beta 0 forward KL, 1 reverse KL). --data text distils on pretraining text instead;
--teacher_topk K stores the teacher's top K once on disk and frees it. Every flag is listed by --help.
Multi-GPU: torchrun --nproc_per_node N train_distill.py
"""

from configs import DistillConfig, exit_on_bad_input, parse_train_args
from trainers import DistillTrainer, run_stage

if __name__ == "__main__":
    cfg, model_overrides = parse_train_args(DistillConfig, description=__doc__)
    if cfg.show_mask:  # the tokens that the labels and the teacher train
        with exit_on_bad_input():
            print(DistillTrainer.show_mask(cfg))
    else:
        run_stage(DistillTrainer, cfg, model_overrides)
