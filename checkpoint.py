"""Self-contained, atomically written checkpoints.

A checkpoint is a directory (e.g. checkpoint/pretrain/) holding:
  model.safetensors   the weights (safetensors: loading never unpickles code; a quantised model records its
                      scheme in the file's metadata, quant.save_quantized)
  value_head.safetensors  only for a model with a value head (a reward model, a PPO policy and its critic)
  config.json         the ModelConfig
  run.json            stage, step, the checkpoint it started from, the training config
  tokenizer.tiktoken, tokenizer_config.json   the tokenizer, so the directory stands alone
  train_state.pt      optimizer, grad scaler, RNG states and data position, for --resume
  metrics.jsonl       the training log, appended as the run goes

It is written into `<dir>.tmp` and swapped in with renames, so a crash while saving leaves the previous
checkpoint whole (at worst as `<dir>.old`, which the next load or save puts back, or clears if the swap was
done). A checkpoint can hold others (`best/`, the run's best so far): each save of the outer one moves them into
the new directory by a rename, and a save that crashes part-way leaves them where the next load or save finds
them. A save that fails, e.g. on a full disk, removes what it wrote and says so in one line.
"""

import errno
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from configs import ModelConfig
from fileio import write_json

WEIGHTS = "model.safetensors"
QUANTIZATION_KEY = "quantization"  # model.safetensors' metadata entry naming a quantised model's scheme (quant.py)
VALUE_HEAD = "value_head.safetensors"


def _nested(directory: Path) -> list[Path]:
    """The checkpoints kept inside a checkpoint directory (best/): its subdirectories, less a save's leftovers."""
    if not directory.is_dir():
        return []
    return [d for d in directory.iterdir() if d.is_dir() and not d.name.endswith((".tmp", ".old"))]


def _recover(directory: Path) -> None:
    """Undo what a crashed save left: `<dir>.old` if it crashed between its two renames, nested checkpoints
    already moved into `<dir>.tmp`, and the same inside (a crashed save of `best/`)."""
    old, tmp = directory.with_name(directory.name + ".old"), directory.with_name(directory.name + ".tmp")
    if not directory.exists() and old.exists():
        os.replace(old, directory)
    if directory.is_dir():
        for nested in _nested(tmp):
            if not (directory / nested.name).exists():
                os.replace(nested, directory / nested.name)
        for leftover in directory.glob("*.old"):
            _recover(leftover.with_name(leftover.name.removesuffix(".old")))


def _kept(directory: Path) -> str:
    """What a failed save of directory leaves in place, for its error message."""
    if not (directory / "config.json").exists():
        return "nothing was saved there"
    step = json.loads((directory / "run.json").read_text()).get("step") if (directory / "run.json").exists() else None
    return f"the step-{step} checkpoint is kept" if step is not None else "the checkpoint there is kept"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: contiguous copies, the tied output head left out (it is the embedding), and the
    value head left out too (it has its own file, so that model.safetensors always loads as a plain GPT)."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith("value_head.")}


def save_checkpoint(directory, model, tokenizer, run_info: dict, train_state: dict | None = None,
                    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
                    extra_json: dict[str, dict] | None = None, save_weights: bool = True,
                    weights_metadata: dict[str, str] | None = None) -> Path:
    """Atomically (re)write the checkpoint directory. extra_files maps file names to tensors to save,
    extra_json file names to JSON objects; save_weights=False leaves out model.safetensors (adapter-only
    checkpoints, whose tensors are in extra_files); weights_metadata goes into model.safetensors' header
    (a quantised model's scheme)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.parent.name:  # saving best/: its enclosing checkpoint first, if a crash left it part-way
        _recover(directory.parent)
    _recover(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)  # a save that crashed after its swap left it
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if save_weights:
            save_file(model_state(model), tmp / WEIGHTS, metadata={"format": "pt", **(weights_metadata or {})})
        if getattr(model, "value_head", None) is not None:  # adapter-only checkpoints keep their trained head too
            head = {k: v.detach().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
            save_file(head, tmp / VALUE_HEAD, metadata={"format": "pt"})
        for name, tensors in (extra_files or {}).items():
            save_file(tensors, tmp / name, metadata={"format": "pt"})
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)
        write_json(tmp / "config.json", asdict(model.config))
        write_json(tmp / "run.json", run_info)
        tokenizer.save_pretrained(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if (directory / "metrics.jsonl").exists():
            shutil.copy2(directory / "metrics.jsonl", tmp / "metrics.jsonl")
    except Exception as e:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos"), safetensors as its own error type
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(tmp.parent).free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)  # no partial files left filling the disk
        if full:
            raise OSError(f"cannot save to {directory}: no space left; {_kept(directory)}") from None
        raise
    for nested in _nested(directory):  # best/ moves into the new directory: a rename, not a copy
        os.replace(nested, tmp / nested.name)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _checked_dir(directory) -> Path:
    directory = Path(directory)
    _recover(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no checkpoint here (config.json missing)")
    return directory


def load_model_config(directory) -> ModelConfig:
    path = _checked_dir(directory) / "config.json"
    try:
        return ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid model config ({e})") from None


def load_run_info(directory) -> dict:
    path = _checked_dir(directory) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a one-line error if it is missing or broken."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise ValueError(f"{path}: cannot read weights ({e})") from None


def saved_quantization(directory) -> dict | None:
    """The quantisation recorded in a checkpoint's model.safetensors by quant.save_quantized, or None (floats)."""
    path = _checked_dir(directory) / WEIGHTS
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            recorded = (f.metadata() or {}).get(QUANTIZATION_KEY)
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    return json.loads(recorded) if recorded else None


def check_state_matches(model_state: dict, loaded: dict, source: str) -> None:
    """Raise one line naming the file if any weight is missing, unexpected or of another shape.

    This is what `load_state_dict(strict=False)` would silently skip (a model that trains from random
    weights while the user thinks it was loaded).
    """
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    mismatched = [f"{k} {tuple(loaded[k].shape)} vs model {tuple(model_state[k].shape)}"
                  for k in loaded if k in model_state and loaded[k].shape != model_state[k].shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            problems.append(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})")
    if problems:
        raise ValueError(f"{source}: weights do not match the model: {'; '.join(problems)}")


def load_weights(model: torch.nn.Module, directory, device="cpu") -> None:
    """Load model.safetensors into model, checking that every weight is found and matches."""
    path = _checked_dir(directory) / WEIGHTS
    loaded = read_tensors(path)
    state = model.state_dict()
    if "lm_head.weight" in state and model.config.tie_embeddings and "embed.weight" in loaded:
        loaded.setdefault("lm_head.weight", loaded["embed.weight"])  # saved once, shared by both
    check_state_matches(state, loaded, str(path))
    model.load_state_dict(loaded, strict=True)


def load_value_head(model: torch.nn.Module, directory) -> None:
    """Load value_head.safetensors into model.value_head (add_value_head first), checking that it matches."""
    path = _checked_dir(directory) / VALUE_HEAD
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, so {directory} holds no value head (no reward model or PPO run)")
    loaded = read_tensors(path)
    check_state_matches(model.value_head.state_dict(), loaded, str(path))
    model.value_head.load_state_dict(loaded, strict=True)


def load_train_state(directory) -> dict:
    path = _checked_dir(directory) / "train_state.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, so this run cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)


def best_checkpoint(directory) -> Path:
    """directory/best if the run kept one (its best evaluation), else directory itself."""
    directory = Path(directory)
    _recover(directory)
    best = directory / "best"
    return best if (best / "config.json").exists() else directory


def describe(directory) -> str:
    """'checkpoint/sft/best (step 300: answer_acc 0.6100, val_loss 1.3100)': which checkpoint, and how good."""
    info = load_run_info(directory)
    metrics = info.get("metrics", {})
    scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("answer_acc", "val_loss") if k in metrics)
    return f"{directory} (step {info.get('step')}{': ' + scores if scores else ''})"


def latest_checkpoint(root="checkpoint", stages: tuple[str, ...] | None = None,
                      exclude: tuple[str, ...] = ()) -> Path | None:
    """The most recently written checkpoint directory under root (among `stages` if given, never one named in
    exclude): full checkpoints and LoRA adapter-only ones alike, as every checkpoint holds a config.json."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in root.iterdir():
        if d.name.endswith(".old"):
            _recover(d.with_name(d.name[:-4]))
    names = [n for n in (stages if stages is not None else [d.name for d in root.iterdir()]) if n not in exclude]
    found = [root / n for n in names if (root / n / "config.json").exists() and not n.endswith((".tmp", ".old"))]
    return max(found, key=lambda d: (d / "config.json").stat().st_mtime) if found else None
