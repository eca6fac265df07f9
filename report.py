"""Write report.md: a report card of the training stages under checkpoint/, as nanochat ends a run with one.

    python report.py                                   # checkpoint/* -> report.md
    python report.py --root runs/exp1 --out runs/exp1/report.md --eval_samples 200

Per stage (pretrain, sft, lora, dpo, reward, grpo, ppo, distill, then any other): the command line, the settings,
wall time, tokens seen, tokens/s and MFU (medians of the logged intervals), peak memory, the final train and validation
metrics and the training curves (curves.png, drawn if missing). Then one evaluation table over the stages (eval.py's
perplexity on the data's validation tokens and StoryWorld answer accuracy on held-out chats; a reward model, which
scores replies rather than writing them, is left out) and a few sample answers of each chat stage to the same
held-out questions.
"""

import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import check_options, device_rules, option, parse_args
from devices import pick_device, pick_dtype
from evals import TaskOptions, evaluate_task
from plots import read_metrics, write_curves
from pretrained import load_checkpoint

STAGE_ORDER = ("pretrain", "sft", "lora", "dpo", "reward", "grpo", "ppo", "distill")


@dataclass
class ReportConfig:
    root: str = option("the directory holding the stages' checkpoints", default="checkpoint")
    out: str = option("the Markdown file to write", default="report.md")
    data_dir: str = option("prepared data: perplexity on its val.bin, answers to its sft_val.jsonl; '' = the "
                           "data_dir the first stage trained on", default="")
    eval_samples: int = option("held-out questions for the answer accuracy; 0 = no answer evaluation", default=100)
    max_tokens: int = option("validation tokens for perplexity; 0 = all", default=100_000)
    samples: int = option("sample answers shown", default=3)
    device: str = option("'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'", default="auto")
    dtype: str = option("'auto' (bfloat16/float16 on CUDA, else float32), 'float32', 'bfloat16', 'float16'",
                        default="auto")

    def __post_init__(self):
        check_options(self, [("eval_samples", self.eval_samples >= 0, "must be >= 0 (0 = no answer evaluation)"),
                             ("max_tokens", self.max_tokens >= 0, "must be >= 0 (0 = all)"),
                             ("samples", self.samples >= 0, "must be >= 0"), *device_rules(self)])


def stage_dirs(root: Path) -> list[Path]:
    """The checkpoints under root, the pipeline's stages first, in pipeline order."""
    found = [d for d in root.iterdir() if (d / "config.json").exists() and not d.name.endswith((".tmp", ".old"))]
    return sorted(found, key=lambda d: (STAGE_ORDER.index(d.name) if d.name in STAGE_ORDER else len(STAGE_ORDER),
                                        d.name))


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {s} s" if minutes else f"{s} s"


def fmt(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return str(value)


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def last_metrics(records: list[dict]) -> str:
    skip = ("step", "tokens", "split", "time")
    last = records[-1] if records else {}
    return ", ".join(f"{k} {fmt(v)}" for k, v in last.items() if k not in skip) or "-"


def stage_section(directory: Path, out_dir: Path, n_params: int | None) -> list[str]:
    """The Markdown of one stage: its run, its figures, its curves."""
    info = json.loads((directory / "run.json").read_text()) if (directory / "run.json").exists() else {}
    config = json.loads((directory / "config.json").read_text())
    try:
        metrics = read_metrics(directory)
    except (OSError, ValueError) as e:
        metrics = {"train": [], "val": []}
        print(f"{directory}: {e}", file=sys.stderr)
    train = metrics["train"]
    argv = info.get("argv")
    command = f"`python {shlex.join(argv)}`" if argv else "(not recorded: an older run)"
    wall = info.get("wall_time_s")
    if wall is None and train:  # older runs: from the log's timestamps
        times = [r["time"] for r in metrics["train"] + metrics["val"] if "time" in r]
        wall = max(times) - min(times) if times else None

    def median(key):
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    tokens = info.get("tokens_seen", train[-1].get("tokens") if train else None)
    tok_s, mfu = median("tokens_per_s"), median("mfu")
    size = f"{n_params / 1e6:.2f}M parameters, " if n_params else ""
    rows = [
        ("stage, step", f"{info.get('stage', directory.name)}, step {info.get('step', '-')}"
                        + (f" (from {info['init_from']})" if info.get("init_from") else "")),
        ("model", f"{size}dim {config['dim']}, {config['n_layers']} layers, {config['n_heads']} heads "
                  f"({config['n_kv_heads']} kv), context {config['max_seq_len']}"
                  + (", MoE" if config.get("use_moe") else "")),
        ("wall time", duration(wall) if wall is not None else "-"),
        ("tokens seen", f"{tokens:,}" if tokens is not None else "-"),
        ("tokens/s (median of the logged intervals)", f"{tok_s:,.0f}" if tok_s is not None else "-"),
        ("MFU (median)", f"{mfu:.1%}" if mfu is not None else "-"),
        ("peak memory", info.get("peak_memory", "-")),
        ("final train metrics", last_metrics(train)),
        ("final validation metrics", last_metrics(metrics["val"])),
    ]
    lines = [f"## {directory.name}", "", command, "", "| | |", "|---|---|"]
    lines += [f"| {name} | {cell(value)} |" for name, value in rows]
    curves = directory / "curves.png"
    if train or metrics["val"]:
        if not curves.exists():
            print(write_curves(directory), file=sys.stderr)
        if curves.exists():
            lines += ["", f"![{directory.name} training curves]({os.path.relpath(curves, out_dir)})"]
    settings = info.get("train_config", {})
    if settings:
        lines += ["", "<details><summary>settings</summary>", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {cell(v)} |" for k, v in settings.items()]
        lines += ["", "</details>"]
    return lines + [""]


def evaluate_stages(dirs: list[Path], cfg: ReportConfig, data_dir: Path) -> tuple[list[str], dict[str, int]]:
    """The evaluation table and the sample answers, as Markdown; and each stage's parameter count."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    val_bin, chats = data_dir / "val.bin", data_dir / "sft_val.jsonl"
    header = ["| stage | val loss (nats/token) | perplexity | bits/byte | answers exact | EN | ZH | contains |",
              "|---|---|---|---|---|---|---|---|"]
    rows, answers, n_params = [], {}, {}
    for directory in dirs:
        try:
            model, tokenizer, stage = load_checkpoint(directory, device)
        except (OSError, ValueError) as e:
            rows.append(f"| {directory.name} | {cell(e)} |||||||")
            continue
        n_params[directory.name] = model.num_params()
        if stage == "reward":
            continue
        model.to(device, dtype).eval()
        print(f"evaluating {directory}", file=sys.stderr)
        ppl, acc = {}, {}
        if val_bin.exists():
            ppl = evaluate_task(model, tokenizer, "perplexity",
                                TaskOptions(data=str(val_bin), max_tokens=cfg.max_tokens), stage, progress=True)[0]
        if cfg.eval_samples and chats.exists() and stage not in ("pretrain", None):
            acc, samples = evaluate_task(model, tokenizer, "storyworld",
                                         TaskOptions(data=str(chats), limit=cfg.eval_samples), stage, progress=True)
            answers[directory.name] = samples[:cfg.samples]
        rows.append(f"| {directory.name} | " + " | ".join(fmt(ppl.get(k, "-")) for k in ("loss", "perplexity",
                                                                                         "bits_per_byte"))
                    + " | " + " | ".join(f"{acc[k]:.1%}" if k in acc and acc[k] == acc[k] else "-"
                                         for k in ("acc", "acc_en", "acc_zh", "contains")) + " |")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    scope = f"up to {cfg.max_tokens:,}" if cfg.max_tokens else "all"
    lines = ["## Evaluation", "",
             f"Perplexity on {scope} tokens of {val_bin} (eval.py --task perplexity); "
             f"greedy answers to the first {cfg.eval_samples} held-out questions of {chats}, exact match up to case, "
             "spaces and final punctuation (eval.py --task storyworld).", "", *header, *rows, ""]
    if answers:
        stages = list(answers)
        first = answers[stages[0]]
        lines += ["### Sample answers", "", "| question | expected | " + " | ".join(stages) + " |",
                  "|---|---|" + "---|" * len(stages)]
        for i, sample in enumerate(first):
            question = sample["question"].strip().split("\n")[-1]
            lines.append(f"| {cell(question)} | {cell(sample['expected'])} | "
                         + " | ".join(cell(answers[s][i]["reply"]) for s in stages) + " |")
        lines += ["", "The stories are in the chats file; the questions are about stories no stage trained on.", ""]
    return lines, n_params


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ReportConfig, argv, description=__doc__)
    root, out = Path(cfg.root), Path(cfg.out)
    try:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory; train a stage first (python train_pretrain.py)")
        dirs = stage_dirs(root)
        if not dirs:
            raise FileNotFoundError(f"{root}: no checkpoints; train a stage first (python train_pretrain.py)")
        first = json.loads((dirs[0] / "run.json").read_text()) if (dirs[0] / "run.json").exists() else {}
        data_dir = Path(cfg.data_dir or first.get("train_config", {}).get("data_dir", "data/storyworld"))
        evaluation, n_params = evaluate_stages(dirs, cfg, data_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lines = [f"# Run report: {root}", "", "Written by `python report.py`. Stages in pipeline order; each section "
             "comes from the checkpoint's run.json (command, settings, wall time, tokens, peak memory) and "
             "metrics.jsonl (tokens/s, MFU, final metrics, curves).", ""]
    for directory in dirs:
        lines += stage_section(directory, out.parent, n_params.get(directory.name))
    lines += evaluation
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
