"""Export a model as a Hugging Face directory that transformers, vLLM and llama.cpp's converter load.

    python export.py --checkpoint checkpoint/sft --out hf-sft
    python export.py --checkpoint checkpoint/lora --out hf-lora       # the adapters are merged into the weights
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf-sft')"

It writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template) and
generation_config.json. Our presets are written as `llama`; a model imported from Hugging Face as what it was
(gpt2, llama, mistral, qwen2, qwen3). Mixture-of-Experts checkpoints are refused. The checkpoint can also be a
Hugging Face directory or hf:ORG/NAME (then the export is the same model again, bit for bit).
"""

from dataclasses import dataclass

import hf
import lora
from configs import check_options, exit_on_bad_input, option, parse_args


@dataclass
class ExportConfig:
    checkpoint: str = option("what to export: our checkpoint directory (a LoRA adapter one is merged into its base), "
                             "a Hugging Face model directory or hf:ORG/NAME", default="")
    out: str = option("the Hugging Face directory to write (new, or empty)", default="")
    dtype: str = option("weights as float32 (exact), bfloat16 or float16", default="float32")

    def __post_init__(self):
        if not self.checkpoint or not self.out:
            raise ValueError("give --checkpoint DIR and --out DIR")
        check_options(self, [("dtype", self.dtype in hf.DTYPES, f"must be one of {', '.join(hf.DTYPES)}")])


def main(argv: list[str] | None = None):
    cfg = parse_args(ExportConfig, argv, description=__doc__)
    with exit_on_bad_input():
        model, tokenizer = lora.load_merged(hf.resolve(cfg.checkpoint))  # as saved: nothing added to its tokenizer
        out = hf.export(model, tokenizer, cfg.out, cfg.dtype)
    print(f"wrote {out}: {hf.family_of(model.config)}, {model.describe_size()}, {cfg.dtype}")


if __name__ == "__main__":
    main()
