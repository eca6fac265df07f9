"""Supervised fine-tuning: turn a pretrained model into a chat model, training only on the assistant's tokens.

With no arguments it loads the latest checkpoint/pretrain, trains on the embedded StoryWorld chats
(data/storyworld/sft_train.jsonl) and saves to checkpoint/sft/, reporting the masked validation loss and the
answer accuracy on held-out questions before and after. `--show_mask` prints a tokenised chat with the trained
tokens marked. Every flag is listed by --help. Multi-GPU: torchrun --nproc_per_node N train_sft.py
"""

import sys

from configs import SFTConfig, parse_train_args
from dataset import format_mask, load_chats, shift_chat
from tokenizer import Tokenizer
from trainers import SFTTrainer, chat_source, find_init_dir, run_stage


def show_mask(cfg: SFTConfig, init_stages: tuple[str, ...]) -> None:
    """Print the first training chat as the trainer sees it, the trained-on tokens between ⟦ ⟧."""
    source = chat_source(cfg, "sft_train.jsonl", cfg.sft_data)
    try:  # the tokenizer of the checkpoint to fine-tune, else (before pretraining) the data's
        tokenizer = Tokenizer.from_pretrained(find_init_dir(cfg.init_from, init_stages))
    except FileNotFoundError:
        tokenizer = Tokenizer.from_pretrained(cfg.data_dir)
    chats, _ = load_chats(source, cfg.skip_bad_rows, cfg.hf_data_files, cfg.hf_split)
    ids, mask = tokenizer.apply_chat_template(chats[0], return_assistant_mask=True)
    example = shift_chat(ids, mask, cfg.seq_len or len(ids))
    print(f"{source}, first chat: {len(ids)} tokens, {int(example[2].sum())} trained on (between ⟦ ⟧):\n")
    print(format_mask(tokenizer, *example))


def main(trainer_cls=SFTTrainer, config_cls=SFTConfig, description=__doc__, argv=None):
    cfg, _ = parse_train_args(config_cls, argv, description)
    if cfg.show_mask:
        try:
            show_mask(cfg, trainer_cls.init_stages)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        return
    run_stage(trainer_cls, config_cls, argv, description)


if __name__ == "__main__":
    main()
