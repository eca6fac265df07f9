"""Export a model as a Hugging Face directory that transformers, vLLM and llama.cpp's converter load.

    python export.py --checkpoint checkpoint/sft --out hf-sft
    python export.py --checkpoint checkpoint/lora --out hf-lora       # the adapters are merged into the weights
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf-sft')"

It writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template) and
generation_config.json. Our presets are written as `llama`; a model imported from Hugging Face as what it was
(gpt2, llama, mistral, qwen2, qwen3). Mixture-of-Experts checkpoints are refused. The checkpoint can also be a
Hugging Face directory or hf:ORG/NAME (then the export is the same model again, bit for bit).
"""

import sys
from dataclasses import dataclass

import hf
import lora
from configs import option, parse_args
from model import GPT
from tokenizer import Tokenizer


@dataclass
class ExportConfig:
    checkpoint: str = option("what to export: our checkpoint directory (a LoRA adapter one is merged into its base), "
                             "a Hugging Face model directory or hf:ORG/NAME", default="")
    out: str = option("the Hugging Face directory to write (new, or empty)", default="")
    dtype: str = option("weights as float32 (exact), bfloat16 or float16", default="float32")


def load_for_export(path):
    """(model, tokenizer) as saved: adapters folded into their base, nothing added to a tokenizer."""
    directory = hf.resolve(path)
    if lora.is_adapter_dir(directory):
        model, tokenizer = lora.load_lora_checkpoint(directory)
        return lora.merge_and_unload(model), tokenizer
    return GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory)


def main(argv: list[str] | None = None):
    cfg = parse_args(ExportConfig, argv, description=__doc__)
    try:
        if not cfg.checkpoint or not cfg.out:
            raise ValueError("give --checkpoint DIR and --out DIR")
        if cfg.dtype not in hf.DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(hf.DTYPES)}, got {cfg.dtype!r}")
        model, tokenizer = load_for_export(cfg.checkpoint)
        out = hf.export(model, tokenizer, cfg.out, cfg.dtype)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: {hf.family_of(model.config)}, {model.describe_size()}, {cfg.dtype}")


if __name__ == "__main__":
    main()
