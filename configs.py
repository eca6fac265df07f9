"""Dataclass configs, named model presets, and a command line generated from the fields.

Every field of a config dataclass becomes a flag: `--lr 3e-4`, `--n_layers 4`, `--compile false`.
Its help text is the field's `metadata["help"]`, so `--help` lists every option with its default.
"""

import argparse
import dataclasses
import json
import math
import re
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field

DEFAULT_DATA_DIR = "data/storyworld"  # the embedded data set, generated on first use (prepare.data_path)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every block projection
QUANT_SCHEMES = ("int8", "nf4", "fp16", "bf16")  # the low-precision weight formats of quant.py
QUANT_RULE = f"must be one of {', '.join(QUANT_SCHEMES)} (or '' for full precision)"


DTYPES = ("auto", "float32", "bfloat16", "float16")


def option(text: str, **kwargs):
    """A dataclass field with a help text for `--help`.

    A subclass that only changes the default writes `lr: float = 1e-4`: the help is found on the base class.
    """
    return field(metadata={"help": text}, **kwargs)


def check_options(cfg, rules: list[tuple[str, bool, str]]) -> None:
    """Raise a one-line ValueError for the first (field, allowed, rule) of rules whose value is not allowed,
    in the one format every script shows: `--batch_size must be >= 1, got 0`."""
    for name, allowed, rule in rules:
        if not allowed:
            raise ValueError(f"--{name} {rule}, got {getattr(cfg, name)}")


def device_rules(cfg) -> list[tuple[str, bool, str]]:
    """The rules of the device and dtype options (and compile and quantize, where a config has them) that
    training, the demo, the server, the evaluations and the benchmark share. Whether the device exists on this
    machine is checked when it is picked (devices.pick_device)."""
    rules = [("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None,
              "must be auto, cpu, mps, cuda or cuda:N"),
             ("dtype", cfg.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")]
    if hasattr(cfg, "compile"):
        rules.append(("compile", cfg.compile in ("auto", "true", "false"), "must be auto, true or false"))
    if isinstance(cfg, QuantizeOption):
        rules.append(("quantize", cfg.quantize in ("", *QUANT_SCHEMES), QUANT_RULE))
    return rules


@dataclass
class ModelConfig:
    """Shape of the GPT: Llama-style (RMSNorm, RoPE, GQA, SwiGLU) by default; switches below give GPT-2 and Qwen."""

    vocab_size: int = option("vocabulary size (taken from the tokenizer when training)", default=6400)
    dim: int = option("model width (embedding size)", default=512)
    n_layers: int = option("number of transformer blocks", default=8)
    n_heads: int = option("number of query heads", default=8)
    n_kv_heads: int = option("number of key/value heads (grouped-query attention; = n_heads for MHA)", default=2)
    head_dim: int | None = option("size of each attention head; None = dim / n_heads (Qwen3 and some Mistral models "
                                  "use another)", default=None)
    hidden_dim: int | None = option("MLP hidden size; None = 8/3 * dim rounded up to multiple_of (SwiGLU), "
                                    "4 * dim (GELU)", default=None)
    multiple_of: int = option("round the SwiGLU hidden size up to a multiple of this", default=64)
    max_seq_len: int = option("longest sequence the position tables cover", default=1024)
    rope_theta: float = option("RoPE base frequency", default=1e6)
    rope_scaling: dict | None = option(
        'RoPE scaling as Hugging Face writes it (JSON): None; {"rope_type": "linear", "factor": F} (positions / F); '
        'or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", '
        '"original_max_position_embeddings"} (Llama 3.1+)', default=None)
    norm_eps: float = option("normalisation epsilon", default=1e-5)
    dropout: float = option("dropout on attention weights and residual branches", default=0.0)
    tie_embeddings: bool = option("share the token embedding with the output head", default=True)
    # Architecture switches: the defaults are the Llama layout; GPT-2 and Qwen checkpoints set the others
    # (hf.py), and each switch's maths is in model.py / attention.py.
    norm: str = option("'rmsnorm' (Llama, Qwen) or 'layernorm' (GPT-2: mean and variance, with a bias if bias)",
                       default="rmsnorm")
    mlp: str = option("'swiglu' (down(silu(gate(x)) * up(x)), Llama) or 'gelu' (down(gelu_tanh(up(x))), GPT-2)",
                      default="swiglu")
    pos_emb: str = option("positions: 'rope' (rotary, Llama) or 'learned' (an absolute position table added to the "
                          "token embedding, GPT-2)", default="rope")
    bias: bool = option("biases in every linear layer (and in LayerNorm), as GPT-2", default=False)
    attn_bias: bool = option("biases in the query, key and value projections only, as Qwen2", default=False)
    qk_norm: bool = option("RMS-normalise each query and key head before RoPE, as Qwen3", default=False)
    hf_model_type: str = option("the Hugging Face architecture export.py writes (llama, mistral, qwen2, qwen3, gpt2); "
                                "'' = the one the switches describe; set when a model is imported", default="")
    attn_impl: str = option("attention: 'sdpa' (fast, torch's fused kernel) or 'manual' (readable)", default="sdpa")
    # Mixture-of-Experts (moe.py): each routed or shared expert is a SwiGLU of hidden_dim.
    use_moe: bool = option("replace every block's SwiGLU MLP with a Mixture-of-Experts layer", default=False)
    n_routed_experts: int = option("MoE: routed experts per layer", default=4)
    num_experts_per_tok: int = option("MoE: routed experts each token goes to (top-k)", default=2)
    n_shared_experts: int = option("MoE: always-on shared experts per layer", default=1)
    norm_topk_prob: bool = option("MoE: renormalise the top-k router weights to sum to 1", default=True)
    aux_loss_alpha: float = option("MoE: weight of the load-balancing loss added to the training loss",
                                   default=0.01)
    seq_aux: bool = option("MoE: balance the experts within each sequence (else over the whole batch)",
                           default=True)
    capacity_factor: float = option("MoE: an expert takes at most capacity_factor * its fair share of the "
                                    "tokens, the rest are dropped; 0 = never drop", default=0.0)

    def __post_init__(self):
        if self.head_dim is None and self.n_heads >= 1:  # n_heads < 1 is refused by validate()
            if self.dim % self.n_heads:
                raise ValueError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads} "
                                 f"(or give head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            if self.mlp == "gelu":
                self.hidden_dim = 4 * self.dim
            elif self.multiple_of >= 1:
                hidden = int(8 * self.dim / 3)
                self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self):
        """Raise a one-line ValueError if the shape cannot work."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "multiple_of",
                     "hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model config: dropout={self.dropout} must be >= 0 and < 1")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"model config: head size {self.head_dim} must be even for RoPE")
        choices = {"attn_impl": ("sdpa", "manual"), "norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"),
                   "pos_emb": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model config: {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        check_rope_scaling(self.rope_scaling, "model config: rope_scaling")
        if self.use_moe:
            if self.mlp != "swiglu":
                raise ValueError("model config: use_moe needs mlp='swiglu' (the experts are SwiGLUs)")
            if self.n_routed_experts < 1 or not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"model config: num_experts_per_tok={self.num_experts_per_tok} must be between 1 "
                                 f"and n_routed_experts={self.n_routed_experts}")
            if self.n_shared_experts < 0 or self.aux_loss_alpha < 0 or self.capacity_factor < 0:
                raise ValueError("model config: n_shared_experts, aux_loss_alpha and capacity_factor must be >= 0")


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the embedding table up so the output matmul has tensor-core friendly shapes."""
    return multiple * math.ceil(vocab_size / multiple)


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict | None, where: str) -> None:
    """One-line ValueError unless scaling is None, linear or llama3 with all its parameters."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported; supported: none, "
                         f"{', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"{where}: RoPE scaling {kind!r} lacks {', '.join(missing)}")


# Named presets. `tiny` trains in minutes on a laptop CPU; the others follow published models.
PRESETS: dict[str, dict] = {
    # Two layers of four 64-wide heads: in the CPU budget a deeper model, narrower heads or grouped keys and values
    # copied fewer names and objects out of the stories (README, "What the default run gives").
    "tiny": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=512, rope_theta=1e4),
    # MiniMind2-Small, 26M parameters (jingyaogong/minimind).
    "minimind2-small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    # MiniMind2, 104M parameters.
    "minimind2": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    # GPT-2 small's size (124M with its 50257 vocabulary), in the Llama layout.
    "gpt2-124m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, vocab_size=50304,
                      rope_theta=1e4, tie_embeddings=True),
    # MiniMind2-MoE, 145M parameters (1 shared + top-2 of 4 routed experts per layer).
    "minimind2-moe": dict(dim=640, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=1024, use_moe=True,
                          n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    # tiny with MoE: 3 experts of 256 active per token, about tiny's hidden size of 704, so about the same active size.
    "tiny-moe": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=512, rope_theta=1e4, hidden_dim=256,
                     use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of preset `name`, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainConfig:
    """Options shared by every training stage (the Trainer base reads these)."""

    preset: str = option(f"model preset: {', '.join(PRESETS)} (model fields below override it); "
                         "'auto' = the device's plan (plan.py)", default="auto")
    data_dir: str = option("prepared data directory (from prepare.py)", default=DEFAULT_DATA_DIR)
    out_dir: str = option("where checkpoints and metrics go; '' = checkpoint/<stage>", default="")
    init_from: str = option("checkpoint directory to start from; '' = the stage's default (SFT: the latest "
                            "checkpoint/pretrain; LoRA: sft, else pretrain; DPO, reward, GRPO, PPO: sft)", default="")
    resume: bool = option("continue the run saved in out_dir (model, optimizer, RNG, data position)", default=False)
    overwrite: bool = option("replace the checkpoint already in out_dir (without this, a fresh run refuses to)",
                             default=False)
    device: str = option("'auto' (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps", default="auto")
    dtype: str = option("'auto' (bf16 on GPUs that have it, else fp16 with a grad scaler; fp32 on CPU/MPS), "
                        "or float32, bfloat16, float16", default="auto")
    compile: str = option("torch.compile the model: auto (CUDA on Linux), true or false", default="auto")
    seed: int = option("random seed (model init and data order)", default=1337)
    batch_size: int = option("rows per micro-batch (per process): token windows, chats, or preference pairs (DPO: "
                             "a chosen and a rejected sequence each)", default=4)
    seq_len: int = option("tokens per sequence, longer chats are truncated; 0 = the model's max_seq_len",
                          default=0)
    grad_accum: int = option("micro-batches per optimizer step (global batch = batch_size * grad_accum * world)",
                             default=1)
    max_steps: int = option("optimizer steps to train; 0 = from --max_tokens or --epochs, or else the device's plan "
                            "(plan.py: a budget in tokens or passes over the data, printed at start)", default=0)
    max_tokens: int = option("instead of --max_steps, train on this many tokens (batch_size * seq_len a row) and "
                             "set max_steps to match; 0 = off", default=0)
    epochs: float = option("instead of --max_steps, train for this many passes over the training data (chats, "
                           "pairs, or pretraining tokens) and set max_steps to match; 0 = off", default=0.0)
    lr: float = option("peak learning rate", default=1e-3)
    min_lr: float = option("learning rate at the end of the cosine decay", default=1e-4)
    warmup_steps: int = option("linear warmup steps", default=40)
    weight_decay: float = option("AdamW weight decay (matrices only)", default=0.1)
    beta1: float = option("AdamW beta1", default=0.9)
    beta2: float = option("AdamW beta2", default=0.95)
    grad_clip: float = option("clip the global gradient norm to this; 0 = off", default=1.0)
    grad_checkpoint: bool = option("recompute activations in the backward pass to save memory", default=False)
    eval_interval: int = option("evaluate on the validation split every N steps (and always before the first "
                                "and after the last step)", default=50)
    eval_iters: int = option("validation batches per evaluation (always the same ones)", default=10)
    log_interval: int = option("print/log training metrics every N steps", default=10)
    save_interval: int = option("save a checkpoint every N steps (and at the end)", default=100)
    wandb: bool = option("log to Weights & Biases (set WANDB_MODE=offline without a network)", default=False)
    wandb_project: str = option("wandb project name", default="nanollm")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise a one-line ValueError naming the first flag whose value cannot work. The configs that mix in
        more options extend this (calling super().validate() first)."""
        check_options(self, [
            ("preset", self.preset in ("auto", *PRESETS), f"must be auto or one of {', '.join(PRESETS)}"),
            *device_rules(self),
            *((name, getattr(self, name) >= 1, "must be >= 1") for name in (
                "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "save_interval")),
            ("max_steps", self.max_steps >= 0, "must be >= 0 (0 = the budget of --max_tokens, --epochs or the plan)"),
            ("max_tokens", self.max_tokens >= 0, "must be >= 0 (0 = off)"),
            ("seq_len", self.seq_len >= 0, "must be >= 0 (0 = the model's max_seq_len)"),
            ("epochs", self.epochs >= 0, "must be >= 0 (0 = off)"),
            ("lr", self.lr > 0, "must be > 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"must be between 0 and --lr {self.lr}"),
            *((name, getattr(self, name) >= 0, "must be >= 0") for name in (
                "warmup_steps", "weight_decay", "grad_clip")),
            *((name, 0 <= getattr(self, name) < 1, "must be >= 0 and < 1") for name in ("beta1", "beta2")),
        ])
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the checkpoint in out_dir and --overwrite replaces it: give one")
        if self.preset != "auto" and (self.resume or self.init_from):
            raise ValueError(f"--preset {self.preset} does not apply to --resume or --init_from: the model is the "
                             f"checkpoint's (model fields such as --dropout still override it)")


def _flag_type(tp):
    """The argparse converter for a dataclass field annotation."""
    if typing.get_origin(tp) is list:  # list[X]: each of the flag's values is an X
        return _flag_type(typing.get_args(tp)[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:  # Optional[X] / X | None
        inner = _flag_type(args[0])
        return lambda s: None if s.lower() in ("none", "null") else inner(s)
    if tp is dict:  # e.g. --rope_scaling '{"rope_type": "linear", "factor": 2}'
        return json.loads
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
        return to_bool
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None):
    """Add one `--name` flag per field of dataclass `cls`, defaulting to None (meaning 'not given')."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(type=_flag_type(hints[f.name]), default=None, metavar=f.name.upper(),
                      help=f"{_help(cls, f.name)} (default: {default})")
        if hints[f.name] is bool:
            kwargs.update(nargs="?", const=True)  # `--flag` alone means true
        if typing.get_origin(hints[f.name]) is list:
            kwargs.update(nargs="+")  # `--checkpoint A B`: one or more values
        group.add_argument(f"--{f.name}", **kwargs)


def _help(cls, name: str) -> str:
    """The help text of field `name`: from the nearest class of cls's MRO that declares it with one."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata["help"]
    return ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`error: argument --batch_size: invalid int value: 'x'`) instead of
    argparse's usage, which lists every flag, followed by the error."""

    def __init__(self, description: str = ""):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def parse_args(cls, argv: list[str] | None = None, description: str = ""):
    """Parse the command line into an instance of dataclass `cls`; a value its validation refuses exits with
    `error: ...`."""
    parser = ArgumentParser(description)
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_bad_input():
        return cls(**{k: v for k, v in vars(ns).items() if v is not None})


def parse_train_args(train_cls, argv: list[str] | None = None, description: str = ""):
    """Parse a training stage's command line: its TrainConfig subclass plus ModelConfig overrides.

    Returns (train_config, model_overrides), where model_overrides holds only the model fields given,
    so that they can be applied on top of a preset or of the checkpoint being fine-tuned.
    """
    parser = ArgumentParser(description)
    add_dataclass_args(parser, train_cls, "training")
    add_dataclass_args(parser, ModelConfig, "model (override the preset's fields)")
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_kwargs = {k: v for k, v in ns.items() if v is not None and k not in model_names}
    model_overrides = {k: v for k, v in ns.items() if v is not None and k in model_names}
    with exit_on_bad_input():
        return train_cls(**train_kwargs), model_overrides


@contextmanager
def exit_on_bad_input():
    """Bad input (a missing file, a malformed row, a setting that cannot work) raises ValueError or OSError with a
    one-line message naming it, and a run that diverges FloatingPointError: entry points print that as
    `error: ...` and exit with status 1, instead of a traceback. Any other exception is a bug, and shows its
    traceback."""
    try:
        yield
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


@dataclass
class FineTuneOptions:
    """Options of the stages that train on chats or preference pairs (SFT, LoRA, DPO); mixed into their configs."""

    hf_data_files: str = option("hf: sources only, the file(s) of the dataset repository to read", default="")
    hf_split: str = option("hf: sources only, the split to read", default="train")
    skip_bad_rows: bool = option("skip and count malformed rows instead of stopping at the first", default=False)
    eval_samples: int = option("held-out chats scored for answer accuracy (greedy generation); 0 = off",
                               default=100)
    max_new_tokens: int = option("longest generated answer in the accuracy evaluation", default=64)
    takes_preset = False  # whether the stage can start from a fresh model of --preset (a class attribute, not a flag)

    def read_options(self) -> dict:
        """How the data sets read a source (dataset.load_chats, SFTDataset, PreferenceDataset)."""
        return {"skip_bad_rows": self.skip_bad_rows, "hf_data_files": self.hf_data_files, "hf_split": self.hf_split}

    def validate(self):  # mixed in before TrainConfig, whose validate() comes first
        super().validate()
        check_options(self, [("eval_samples", self.eval_samples >= 0, "must be >= 0 (0 = off)"),
                             ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")])
        if self.preset != "auto" and not self.takes_preset:
            raise ValueError(f"--preset {self.preset} does not apply to fine-tuning: the model is the checkpoint's "
                             f"(--init_from)")


@dataclass
class ChatDataOptions:
    """Where the chats come from and how they are trained on (SFT, LoRA, distillation); mixed into their configs."""

    sft_data: str = option("training chats: a .jsonl file (any chat format of dataset.to_messages) or "
                           "hf:<dataset> (e.g. hf:jingyaogong/minimind_dataset with --hf_data_files "
                           "sft_mini_512.jsonl); '' = <data_dir>/sft_train.jsonl", default="")
    sft_val_data: str = option("validation chats, same forms; '' = <data_dir>/sft_val.jsonl; 'none' = no "
                               "validation", default="")
    reasoning: bool = option("the reasoning variant of the default chats: each reply is <think> the story's "
                             "sentence it rests on </think> then the answer ('' above = <data_dir>/"
                             "sft_reasoning_train.jsonl and sft_reasoning_val.jsonl); the answer accuracy scores "
                             "the part after </think>", default=False)
    think_weight: float = option("loss weight of the reasoning format's <think> and </think> tokens (MiniMind uses "
                                 "10); 1 = like any other token", default=1.0)
    pack: bool = option("pack several chats into each row (attention stays inside each chat) instead of padding",
                        default=False)
    drop_long: bool = option("drop chats longer than seq_len instead of truncating them", default=False)

    def validate(self):  # mixed in before TrainConfig, whose validate() comes first
        super().validate()
        check_options(self, [("think_weight", self.think_weight >= 0, "must be >= 0")])

    def chat_file(self, split: str) -> str:
        """The default file of `split` (train or val) in data_dir: sft_<split>.jsonl, or with --reasoning
        sft_reasoning_<split>.jsonl."""
        return f"sft_reasoning_{split}.jsonl" if self.reasoning else f"sft_{split}.jsonl"


@dataclass
class SFTConfig(ChatDataOptions, FineTuneOptions, TrainConfig):
    """Supervised fine-tuning on chats (train_sft.py)."""

    batch_size: int = 16
    warmup_steps: int = 20
    eval_interval: int = 1000
    eval_iters: int = 4
    # Stage options.
    show_mask: bool = option("print one tokenised training chat with the trained tokens marked, and exit",
                             default=False)


@dataclass
class QuantizeOption:
    """--quantize, said once for everything that loads a model to train adapters on or to run (quant.py); mixed
    into LoRAOptions and the configs of demo.py, serve.py and eval.py, and checked with device_rules."""

    quantize: str = option(f"hold the linear layers' weights in low precision: {', '.join(QUANT_SCHEMES)} (quant.py); "
                           "'' = as saved. With LoRA: the frozen base (QLoRA; the adapters stay in the compute "
                           "dtype, the output head in full precision); for inference: every linear layer, the "
                           "head in 16 bits (int8 decodes fastest on a CPU)", default="")


@dataclass
class LoRAOptions(QuantizeOption):
    """The adapter options of the stages that can train through LoRA (lora.py); mixed into their configs."""

    lora_r: int = option("adapter rank r", default=8)
    lora_alpha: float = option("adapter scale alpha: the update is (alpha / r) * B A", default=16.0)
    lora_dropout: float = option("dropout on the adapters' input", default=0.05)
    use_rslora: bool = option("rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r", default=False)
    lora_targets: str = option("comma-separated names of the linear layers to adapt (a name matches a module "
                               "whose name is it or ends in .<name>)", default=",".join(LORA_TARGETS))

    def validate(self):  # mixed in before TrainConfig, whose validate() comes first
        super().validate()
        check_options(self, [("lora_r", self.lora_r >= 1, "must be >= 1"),
                             ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
                             ("lora_dropout", 0 <= self.lora_dropout < 1, "must be >= 0 and < 1"),
                             ("lora_targets", self.lora_targets.strip(" ,") != "", "must name at least one layer")])


@dataclass
class LoRAConfig(LoRAOptions, SFTConfig):
    """LoRA fine-tuning (train_lora.py): SFT that trains only low-rank adapters on frozen weights."""

    weight_decay: float = 0.0
    export_merged: str = option("instead of training, fold the adapters saved in out_dir into their base "
                                "weights and save a full checkpoint to this directory", default="")


@dataclass
class OptionalLoRA(LoRAOptions):
    """--lora and the adapter options, for the stages that train the whole model unless asked (DPO, the reward
    model, GRPO, PPO)."""

    lora: bool = option("train LoRA adapters (the lora_* options) on the frozen starting model; the reference is "
                        "the same network with the adapters off, so no second copy is held. Adapters take a "
                        "higher --lr than full fine-tuning", default=False)

    def validate(self):  # mixed in before TrainConfig, whose validate() comes first
        super().validate()
        check_options(self, [("quantize", not self.quantize or self.lora,
                              "holds the frozen base of LoRA adapters quantised, so it needs --lora")])


@dataclass
class AlignOptions(OptionalLoRA):
    """Options of the stages that align the SFT chat model (DPO, GRPO, PPO)."""

    eval_chats: str = option("held-out chats for the answer accuracy before, during and after training; '' = "
                             "<data_dir>/sft_val.jsonl", default="")


@dataclass
class PreferenceOptions:
    """The preference pairs of DPO and the reward model."""

    train_file: str = option("preference pairs: a .jsonl file or hf:<dataset>; '' = <data_dir>/dpo_train.jsonl",
                             default="")
    val_file: str = option("validation pairs, same forms; '' = <data_dir>/dpo_val.jsonl", default="")


@dataclass
class DPOConfig(PreferenceOptions, AlignOptions, FineTuneOptions, TrainConfig):
    """Direct preference optimisation (train_dpo.py): TrainConfig's options with DPO's defaults, plus its own
    (and the lora_* options, used with --lora)."""

    batch_size: int = 8
    lr: float = 2e-5  # higher rates lowered the answer accuracy of the default run (README)
    min_lr: float = 2e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 30
    log_interval: int = 1
    save_interval: int = 30
    beta: float = option("DPO beta: strength of the pull towards the reference model", default=0.1)
    loss_type: str = option("sigmoid (DPO), ipo or hinge", default="sigmoid")
    label_smoothing: float = option("conservative DPO: assumed probability that a preference is flipped (sigmoid)",
                                    default=0.0)
    precompute_ref: bool = option("compute the reference log-probabilities once, then free the reference model",
                                  default=False)
    reference_quant: str = option(f"hold the frozen reference model's linear weights in low precision: "
                                  f"{', '.join(QUANT_SCHEMES)} (quant.py); '' = as the policy", default="")

    def validate(self):
        super().validate()
        check_options(self, [
            ("reference_quant", self.reference_quant in ("", *QUANT_SCHEMES), QUANT_RULE),
            ("reference_quant", not (self.reference_quant and self.lora), "does not apply with --lora (the reference "
             "is the policy's frozen base, which --quantize holds quantised)"),
            ("reference_quant", not (self.reference_quant and self.precompute_ref), "does not apply with "
             "--precompute_ref (the policy itself computes the reference's log-probabilities, and none is kept)")])


@dataclass
class RewardConfig(PreferenceOptions, OptionalLoRA, FineTuneOptions, TrainConfig):
    """A Bradley-Terry reward model (train_reward.py): the SFT model's trunk with a scalar head, on preference pairs."""

    batch_size: int = 8
    max_steps: int = 150
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_samples: int = 0  # a reward model does not answer questions
    save_interval: int = 50
    center_rewards_coefficient: float | None = option("add this times mean((r_chosen + r_rejected)^2) to the loss, "
                                                      "keeping the rewards centred on 0; None = off", default=None)

    def validate(self):
        super().validate()
        check_options(self, [("center_rewards_coefficient", (self.center_rewards_coefficient or 0) >= 0,
                              "must be >= 0 (or None)")])


@dataclass
class RolloutOptions:
    """Options of the stages that learn from sampled completions and their rewards (GRPO, PPO).

    Each optimizer step samples completions for batch_size * grad_accum prompts (per process), scores them and
    trains on them; num_iterations > 1 trains that many steps on each batch of completions.
    """

    train_file: str = option("prompts: chats whose first user turn is the prompt and whose first reply is the "
                             "expected answer (any SFT chat format), a .jsonl file or hf:<dataset>; '' = "
                             "<data_dir>/sft_train.jsonl", default="")
    num_generations: int = option("completions sampled per prompt", default=8)
    max_completion_length: int = option("longest completion, in tokens", default=32)
    temperature: float = option("sampling temperature of the completions", default=1.0)
    top_k: int | None = option("sample the completions from the k most likely tokens; None = all", default=None)
    top_p: float | None = option("sample the completions from the nucleus of probability p; None = all",
                                 default=None)
    num_iterations: int = option("optimizer steps on each batch of completions (GRPO's mu, PPO's epochs)", default=1)
    epsilon: float = option("clip the policy's probability ratio to [1 - epsilon, 1 + epsilon]", default=0.2)
    beta: float = option("weight of the KL penalty to the reference, the starting model (GRPO: in the loss; PPO: in "
                         "each token's reward); 0 = no reference model", default=0.0)
    correct_reward: float = option("reward for a reply that is the expected answer (evals.answer_matches)",
                                   default=1.0)
    format_reward: float = option("reward for a non-empty reply that ends with <|im_end|>", default=0.1)
    reward_model: str = option("a reward-model checkpoint (train_reward.py) whose score is added to the reward; "
                               "'' = none", default="")
    reward_model_weight: float = option("weight of the reward model's score", default=1.0)

    def validate(self):  # mixed in before TrainConfig, whose validate() comes first
        super().validate()
        check_options(self, [
            *((name, getattr(self, name) >= 1, "must be >= 1") for name in (
                "num_generations", "max_completion_length", "num_iterations")),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1 (or None)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1] (or None)"),
            ("epsilon", self.epsilon > 0, "must be > 0"),
            ("beta", self.beta >= 0, "must be >= 0 (0 = no reference model)")])


@dataclass
class RolloutConfig(RolloutOptions, AlignOptions, FineTuneOptions, TrainConfig):
    """The defaults GRPO and PPO share: a few minutes of training on a 2-core CPU."""

    batch_size: int = 16
    max_steps: int = 60
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_interval: int = 20
    log_interval: int = 1
    save_interval: int = 20


@dataclass
class GRPOConfig(RolloutConfig):
    """Group relative policy optimisation (train_grpo.py): the SFT model rewarded for correct answers."""

    batch_size: int = 32
    max_steps: int = 400  # about 6 minutes on 2 cores with the tiny model (README)
    lr: float = 2e-4
    beta: float = 0.04  # a KL anchor to the SFT model: lr 3e-4 without it gave 65.8%, with it 68.7% (README)
    eval_interval: int = 100
    epsilon_high: float | None = option("upper clip of the ratio, 1 + epsilon_high (DAPO's clip-higher); None = "
                                        "epsilon", default=None)
    loss_type: str = option("grpo (mean over each completion, then over completions), bnpo (over all tokens) or "
                            "dr_grpo (sum / (completions x max_completion_length))", default="grpo")
    scale_rewards: str = option("divide the advantages by the std of the rewards of each prompt's group, of the "
                                "batch, or none", default="group")
    skip_equal_groups: bool = option("leave the groups whose rewards are all equal out of the training pass: their "
                                     "advantages are 0, so they cost time and teach nothing (as DAPO's dynamic "
                                     "sampling); the loss then averages over the groups that remain", default=True)

    def validate(self):
        from loss import GRPO_LOSS_TYPES, SCALE_REWARDS  # here, not at the top: configs.py does not import torch

        super().validate()
        check_options(self, [
            ("num_generations", self.num_generations >= 2, "must be >= 2 for GRPO (a group of one has no advantage)"),
            ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "must be > 0 (or None)"),
            ("loss_type", self.loss_type in GRPO_LOSS_TYPES, f"must be one of {', '.join(GRPO_LOSS_TYPES)}"),
            ("scale_rewards", self.scale_rewards in SCALE_REWARDS, f"must be one of {', '.join(SCALE_REWARDS)}")])


@dataclass
class PPOConfig(RolloutConfig):
    """PPO with a value head (train_ppo.py): the SFT model rewarded for correct answers, minus a KL penalty."""

    batch_size: int = 16
    num_generations: int = 1
    num_iterations: int = 4
    beta: float = 0.05
    gamma: float = option("discount per token in GAE", default=1.0)
    lam: float = option("GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD", default=0.95)
    cliprange_value: float = option("clip the new values to within this of the values at sampling time",
                                    default=0.2)
    vf_coef: float = option("weight of the value loss", default=0.1)

    def validate(self):
        super().validate()
        check_options(self, [("gamma", 0 <= self.gamma <= 1, "must be between 0 and 1"),
                             ("lam", 0 <= self.lam <= 1, "must be between 0 and 1"),
                             ("cliprange_value", self.cliprange_value > 0, "must be > 0"),
                             ("vf_coef", self.vf_coef >= 0, "must be >= 0")])


@dataclass
class DistillConfig(SFTConfig):
    """Knowledge distillation (train_distill.py): a student learns from a frozen teacher's next-token distributions
    as well as from the labels. The student is a fresh model of --preset (and the model flags), or --init_from."""

    max_steps: int = 300  # its own budget, not the device plan's (plan.py plans pretraining, SFT and DPO)
    eval_interval: int = 100
    teacher: str = option("the teacher checkpoint (it must have the student's tokenizer); '' = the latest "
                          "checkpoint/sft", default="")
    data: str = option("'chats' (the chats of --sft_data; the loss on the assistant tokens) or 'text' (windows of "
                       "seq_len tokens of --data_dir's train.bin and val.bin; the loss on every token)",
                       default="chats")
    alpha: float = option("loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher, student) on the trained "
                          "tokens; 0 = the teacher only, 1 = the labels only (plain SFT)", default=0.5)
    temperature: float = option("T: both distributions are softened by T before D; the T^2 factor keeps the "
                                "gradients' size the same for any T", default=1.0)
    beta: float = option("D is the generalised Jensen-Shannon divergence of GKD: 0 = forward KL(teacher || "
                         "student), 1 = reverse KL(student || teacher), between = the JSD of that mixture",
                         default=0.5)
    teacher_topk: int = option("compute the teacher's top-K log-probabilities of every trained token once, into a "
                               "cache on disk beside the data, and then free the teacher; 0 = run the teacher at "
                               "every step", default=0)

    takes_preset = True  # the student can be a fresh model of --preset (a class attribute, not a flag)

    def validate(self):
        super().validate()
        check_options(self, [
            ("data", self.data in ("chats", "text"), "must be chats or text"),
            ("alpha", 0 <= self.alpha <= 1, "must be between 0 and 1"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("beta", 0 <= self.beta <= 1, "must be between 0 (forward KL) and 1 (reverse KL)"),
            ("teacher_topk", self.teacher_topk >= 0, "must be >= 0 (0 = off)")])
        if self.pack and (self.teacher_topk or self.data == "text"):
            raise ValueError("--pack is for chats without --teacher_topk (the stored top K are per chat; text "
                             "windows are full already)")
