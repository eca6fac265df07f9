"""LoRA (Hu et al. 2021): fine-tune a frozen linear layer W through a low-rank update, W x + (alpha/r) B A x.

A (r x in) starts Kaiming-uniform and B (out x r) at zero, so a wrapped model starts out unchanged. Only A and
B train: a few percent of the parameters, and the optimizer state shrinks with them. The update can be folded
into W (`merge`) for inference at full speed, and taken out again (`unmerge`).

An adapter checkpoint (checkpoint/lora/) holds only the adapters (adapter.safetensors, a few MB) and
adapter_config.json, which names the base checkpoint and its step; `load_lora_checkpoint` rebuilds the model.
"""

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import check_state_matches, load_run_info, read_tensors, save_checkpoint
from configs import LORA_TARGETS
from model import GPT
from quant import QuantLinear, dequantize_model, quantization_of, quantize_model
from tokenizer import Tokenizer

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))) around a frozen nn.Linear (peft's layout: lora_A, lora_B).

    The base may be a quant.QuantLinear (QLoRA: a frozen NF4 base, adapters in the dtype it was quantised from).
    Such a base cannot take the update into its low-precision weight: merge_and_unload dequantises it first.
    """

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        self.r, self.alpha = r, alpha
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's size stable as r grows.
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device, dtype = (base.qweight.device, base.dtype) if isinstance(base, QuantLinear) else (
            base.weight.device, base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init
        self.dropout = nn.Dropout(dropout)
        self.merged = False  # the update is folded into base.weight
        self.enabled = True  # off: behave exactly as the base layer (e.g. a DPO reference model)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.base, QuantLinear):
            raise ValueError(f"cannot merge LoRA adapters into a {self.base.scheme}-quantised weight in place; "
                             "merge_and_unload dequantises the base first")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model: GPT, targets=LORA_TARGETS, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               use_rslora: bool = False) -> dict[str, int]:
    """Wrap every nn.Linear (or quantised QuantLinear) named in targets (its name, or its name's last part) and
    freeze all else.

    Returns {"wrapped", "trainable", "total"} counts (parameters, a tied embedding counted once).
    """
    targets = [t.strip() for t in targets if t.strip()]
    found = {t: 0 for t in targets}
    for name, module in list(model.named_modules()):
        matches = [t for t in targets if name == t or name.endswith("." + t)]
        if not matches or not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout, use_rslora))
        for t in matches:
            found[t] += 1
    # The default names every projection of a Llama block; a model without some of them (GPT-2 has no gate_proj)
    # takes those it has. A name outside the default, or a list that matches nothing, is a mistake.
    missing = [t for t, n in found.items() if n == 0 and (t not in LORA_TARGETS or not any(found.values()))]
    if missing:
        raise ValueError(f"LoRA targets match no linear layer: {', '.join(missing)}")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in f".{name}"
    return {"wrapped": len(lora_layers(model)),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": model.num_params()}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: adapters off (and unmerged) inside the block, restored after it."""
    layers = lora_layers(model)
    state = [(layer.enabled, layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, (enabled, merged) in zip(layers, state):
            layer.enabled = enabled
            if merged:
                layer.merge()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and put the plain nn.Linear layers back (in place). Quantised layers
    (QLoRA) are dequantised first, so the result is a plain float model."""
    dequantize_model(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    for p in model.parameters():
        p.requires_grad = True
    return model


# ----------------------------------------------------------------------------- adapter checkpoints
def save_lora_checkpoint(directory, model: GPT, tokenizer: Tokenizer, base_dir, lora_config: dict, run_info: dict,
                         train_state: dict | None = None) -> Path:
    """Atomically write an adapter-only checkpoint: adapters, their config (with the base, and how the base was
    quantised, QLoRA, or None), run info."""
    base_dir = Path(base_dir)
    config = {**lora_config, "base_checkpoint": str(base_dir), "base_step": load_run_info(base_dir).get("step"),
              "quantization": quantization_of(model)}
    return save_checkpoint(directory, model, tokenizer, run_info, train_state,
                           extra_files={ADAPTER_WEIGHTS: adapter_state(model)},
                           extra_json={ADAPTER_CONFIG: config}, save_weights=False)


def is_adapter_dir(directory) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).exists()


def read_adapter_config(directory) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, so {directory} is not a LoRA checkpoint")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("base_checkpoint", "base_step", "r", "alpha", "targets") if k not in config]
    if missing:
        raise ValueError(f"{path}: field(s) missing: {', '.join(missing)}")
    return config


def check_base(config: dict, directory) -> Path:
    """The base checkpoint directory of an adapter config, checked to be the one the adapters were trained on."""
    base = Path(config["base_checkpoint"])
    step = load_run_info(base).get("step")  # raises a one-line FileNotFoundError if it is gone
    if step != config.get("base_step"):
        raise ValueError(f"{directory}: the adapters were trained on {base} at step {config.get('base_step')}, "
                         f"but it is now at step {step}; retrain them (python train_lora.py)")
    return base


def load_adapters(model: nn.Module, directory) -> None:
    """Load adapter.safetensors into a model that apply_lora already wrapped, checking every adapter matches."""
    path = Path(directory) / ADAPTER_WEIGHTS
    loaded = read_tensors(path)
    check_state_matches(adapter_state(model), loaded, str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)


def load_lora_checkpoint(directory, device="cpu") -> tuple[GPT, Tokenizer]:
    """The base model of an adapter checkpoint with its adapters applied (unmerged, in eval mode). Adapters trained
    on a quantised base (QLoRA: "quantization" in the adapter config) get the base quantised the same way again."""
    config = read_adapter_config(directory)
    base = check_base(config, directory)
    model = GPT.from_pretrained(base)
    recorded = config.get("quantization")
    if recorded and quantization_of(model) is None:  # else the base checkpoint was saved quantised
        quantize_model(model, recorded["scheme"], recorded["head"], recorded["double_quant"], recorded["block_size"])
    apply_lora(model, config["targets"], config["r"], config["alpha"], config.get("dropout", 0.0),
               config.get("use_rslora", False))
    load_adapters(model, directory)
    return model.to(device).eval(), Tokenizer.from_pretrained(base)


def load_merged(directory) -> tuple[GPT, Tokenizer]:
    """The model of a full checkpoint (ours or a Hugging Face one), or of an adapter checkpoint with its adapters
    folded into its base; the tokenizer as saved."""
    if not is_adapter_dir(directory):
        return GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory)
    model, tokenizer = load_lora_checkpoint(directory)
    return merge_and_unload(model), tokenizer


def export_merged(adapter_dir, out_dir) -> Path:
    """Save the adapters of adapter_dir folded into their base as a full checkpoint in out_dir."""
    model, tokenizer = load_merged(adapter_dir)
    info = load_run_info(adapter_dir)
    run_info = {"stage": "lora-merged", "step": info.get("step"), "init_from": str(adapter_dir),
                "base_checkpoint": read_adapter_config(adapter_dir)["base_checkpoint"]}
    return save_checkpoint(out_dir, model, tokenizer, run_info)
