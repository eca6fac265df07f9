"""Evaluate checkpoints: perplexity, StoryWorld answers, multiple choice, or answers to your own prompts.

    python eval.py --checkpoint checkpoint/pretrain --task perplexity            # data/storyworld/val.bin
    python eval.py --checkpoint checkpoint/sft checkpoint/dpo --task storyworld  # held-out StoryWorld chats
    python eval.py --checkpoint checkpoint/sft --task choice --data ARC-Easy-Test.jsonl --shots 5
    python eval.py --checkpoint checkpoint/sft --task choice --data hf:cais/mmlu:anatomy --shots 5 --out mmlu.json
    python eval.py --checkpoint checkpoint/dpo --task generate --data qa.jsonl   # {"prompt", "answer"} rows

Tasks and their metrics:
  perplexity  loss (mean nats per token), perplexity = exp(loss), bits_per_byte = total nats / (ln 2 x UTF-8 bytes
              of the text scored), tokens, bytes
  storyworld  acc: greedy answers equal to the expected one up to case, spaces and final punctuation; contains:
              the expected answer appears in the reply; acc_en, acc_zh; acc_<question type>; n
  choice      lm-evaluation-harness 0.4's multiple choice: acc (highest summed log-likelihood of " " + option),
              acc_norm (divided by the option's length in characters), acc_bytes (by its UTF-8 bytes); n.
              C-Eval/CMMLU (.csv with a header), MMLU (.csv without one, or .jsonl), ARC and HellaSwag (.jsonl)
  generate    acc (exact match, as storyworld), contains, n
Several checkpoints give one comparison table (a column each); --out writes the results as JSON.
"""

import sys
from dataclasses import dataclass

from configs import QuantizeOption, check_options, device_rules, option, parse_args
from devices import pick_device, pick_dtype
from evals import DEFAULT_DATA, TASKS, TaskOptions, evaluate_task, write_results
from pretrained import load_checkpoint


@dataclass
class EvalConfig(QuantizeOption, TaskOptions):
    checkpoint: list[str] = option("checkpoint directories (full or LoRA) to evaluate", default_factory=list)
    task: str = option(f"what to measure: {', '.join(TASKS)}", default="")
    out: str = option("also write the results to this JSON file: a list of {checkpoint, task, data, metrics...}",
                      default="")
    device: str = option("'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'", default="auto")
    dtype: str = option("'auto' (bfloat16/float16 on CUDA, else float32), 'float32', 'bfloat16', 'float16'",
                        default="auto")

    def validate(self):
        if not self.checkpoint:
            raise ValueError("--checkpoint: name at least one checkpoint directory")
        super().validate()
        check_options(self, [("task", self.task in TASKS, f"must be one of {', '.join(TASKS)}"), *device_rules(self)])


def info(message: str):
    print(message, file=sys.stderr, flush=True)


def format_value(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"  # nan: a group without samples
    return str(value)


def print_table(results: list[dict]):
    """Metrics down, checkpoints across: one column per checkpoint."""
    names = list(dict.fromkeys(k for r in results for k in r if k not in ("checkpoint", "task", "data")))
    rows = [["metric", *(r["checkpoint"] for r in results)]]
    rows += [[name, *(format_value(r.get(name, "-")) for r in results)] for name in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(EvalConfig, argv, description=__doc__)
    try:
        data = cfg.data or DEFAULT_DATA.get(cfg.task, "")
        if not data:
            raise ValueError(f"--task {cfg.task} needs --data FILE (or hf:NAME)")
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        results = []
        for directory in cfg.checkpoint:
            model, tokenizer, stage = load_checkpoint(directory, device, quantize=cfg.quantize)
            model.to(device, dtype).eval()
            info(f"{directory} (stage {stage or 'unknown'}): {cfg.task} on {data}")
            metrics, _ = evaluate_task(model, tokenizer, cfg.task, cfg, stage, progress=True)
            results.append({"checkpoint": directory, "task": cfg.task, "data": data, **metrics})
    except (OSError, ValueError) as e:  # a bad checkpoint, file or row: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_table(results)
    if cfg.out:
        write_results(cfg.out, results)
        info(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
