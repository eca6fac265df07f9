"""Everything a stage or the demo can start from, as (model, tokenizer): our checkpoints, LoRA adapter
checkpoints (folded onto their base at load), Hugging Face model directories and hf:ORG/NAME names.

A Hugging Face base model without a chat template (GPT-2) is given ChatML here, so that SFT, DPO and the
demo can use it as a chat model.
"""

from dataclasses import replace
from pathlib import Path

import torch

import lora
from checkpoint import WEIGHTS, best_checkpoint, latest_checkpoint, load_run_info
from hf import is_hf_model, resolve
from model import GPT
from quant import quantize_as
from tokenizer import HFTokenizer, Tokenizer, read_chat_template

TRAIN_FIRST = "python train_pretrain.py (then python train_sft.py for a chat model)"


def load_pretrained(path, device="cpu", overrides: dict | None = None, log=print) -> tuple[GPT, Tokenizer]:
    """Model and tokenizer to fine-tune or chat with, from our checkpoint (or LoRA adapter) directory, a HF model
    directory or hf:ORG/NAME.

    A HF model without a chat template (a base model such as GPT-2) is given ChatML: <|im_start|> and
    <|im_end|> become new special tokens, and the embedding (and an untied head) grows by their rows, set to
    the mean of the existing rows, which is logged.
    """
    directory = resolve(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if lora.is_adapter_dir(directory):
        model, tokenizer = lora.load_lora_checkpoint(directory)
    else:
        model, tokenizer = GPT.from_pretrained(directory, overrides=overrides), Tokenizer.from_pretrained(directory)
    if needs_chatml(tokenizer):
        old = model.config.vocab_size
        tokenizer = tokenizer.with_chatml()
        model = resize_vocab(model, max(old, tokenizer.vocab_size))
        log(f"{path}: no chat template, so ChatML is added: <|im_start|> and <|im_end|> are tokens "
            f"{tokenizer.im_start_id} and {tokenizer.im_end_id}, the embedding grows from {old} to "
            f"{model.config.vocab_size} rows, the new rows at the mean of the old ones")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model.to(device), tokenizer


def needs_chatml(tokenizer) -> bool:
    """A Hugging Face base model's tokenizer (no chat template), which the chat stages give ChatML."""
    return isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is None


def resize_vocab(model: GPT, vocab_size: int) -> GPT:
    """The model with vocab_size token rows (embedding and output head); new rows at the mean of the old ones."""
    old = model.config.vocab_size
    if vocab_size == old:
        return model
    state = model.state_dict()
    resized = GPT(replace(model.config, vocab_size=vocab_size))
    for name in ("embed.weight",) if model.config.tie_embeddings else ("embed.weight", "lm_head.weight"):
        rows = torch.zeros_like(resized.state_dict()[name])  # the padding rows stay zero
        keep = min(old, vocab_size)
        rows[:keep] = state[name][:keep]
        rows[old:vocab_size] = state[name][:old].mean(0)
        state[name] = rows
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    resized.load_state_dict(state)
    return resized


def checkpoint_stage(directory) -> str | None:
    """What trained a model, for the demo's chat or text mode: our run.json's stage ('lora' for adapters); for a
    HF model 'pretrain' if it came without a chat template (a base model), else 'instruct'."""
    directory = resolve(directory)
    if is_hf_model(directory):
        return "instruct" if read_chat_template(directory) is not None else "pretrain"
    stage = load_run_info(directory).get("stage")
    return "lora" if stage is None and lora.is_adapter_dir(directory) else stage


def find_checkpoint(checkpoint: str | None, log=print) -> Path:
    """The checkpoint directory given, or else the best model of the newest chat or text run under checkpoint/
    (its best/ if it kept one; never a reward model, which scores replies rather than writing them); says which
    through log."""
    if checkpoint is not None:
        log(f"checkpoint: {checkpoint}")
        return Path(checkpoint)
    found = latest_checkpoint("checkpoint", exclude=("reward",))
    if found is None:
        raise FileNotFoundError(f"no checkpoint under checkpoint/; train one first: {TRAIN_FIRST}")
    found = best_checkpoint(found)
    log(f"checkpoint: {found} (the best model of the newest run under checkpoint/; --checkpoint DIR picks another)")
    return found


def load_checkpoint(directory, device="cpu", log=print,
                    quantize: str | None = None) -> tuple[GPT, Tokenizer, str | None]:
    """(model, tokenizer, the stage that trained it) of a checkpoint, a LoRA adapter directory, a Hugging Face
    model directory or hf:ORG/NAME. quantize (int8, nf4, fp16, bf16) holds its linear layers quantised for
    inference, the output head too (a LoRA checkpoint: its base, the adapters stay float); a checkpoint saved
    quantised in another scheme is refused (quant.quantize_as)."""
    directory = resolve(directory)  # hf:ORG/NAME: its downloaded snapshot
    if directory.is_file():
        raise ValueError(f"{directory} is a file; a checkpoint is a directory with config.json, the weights and the "
                         f"tokenizer (a bare weights file has no tokenizer to read and write text with)")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory; make one first: {TRAIN_FIRST}")
    try:
        model, tokenizer = load_pretrained(directory, device=device, log=log)
        stage = checkpoint_stage(directory)
    except (ValueError, FileNotFoundError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"broken checkpoint: {e}; re-run the training stage that wrote it "
                         f"(e.g. python train_pretrain.py)") from None
    recorded_in = directory / (lora.ADAPTER_CONFIG if lora.is_adapter_dir(directory) else WEIGHTS)
    return quantize_as(model, quantize, recorded_in), tokenizer, stage
