"""Dataclass configs, named model presets, and a command line generated from the fields.

Every field of a config dataclass becomes a flag: `--lr 3e-4`, `--n_layers 4`, `--compile false`.
Its help text is the field's `metadata["help"]`, so `--help` lists every option with its default.
"""

import argparse
import dataclasses
import json
import math
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field

DEFAULT_DATA_DIR = "data/storyworld"  # the embedded data set, generated on first use (prepare.data_path)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every block projection
QUANT_SCHEMES = ("int8", "nf4", "fp16", "bf16")  # the low-precision weight formats of quant.py


def option(text: str, **kwargs):
    """A dataclass field with a help text for `--help`.

    A subclass that only changes the default writes `lr: float = 1e-4`: the help is found on the base class.
    """
    return field(metadata={"help": text}, **kwargs)


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
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads} "
                                 f"(or give head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            if self.mlp == "gelu":
                self.hidden_dim = 4 * self.dim
            else:
                hidden = int(8 * self.dim / 3)
                self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self):
        """Raise a one-line ValueError if the shape cannot work."""
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
    "tiny": dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=256),
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
    # tiny with MoE: 3 experts of 128 active per token = tiny's hidden size of 384, so the same active size.
    "tiny-moe": dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=256, hidden_dim=128, use_moe=True,
                     n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
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
                         "'auto' = tiny on CPU, minimind2-small on a GPU", default="auto")
    data_dir: str = option("prepared data directory (from prepare.py)", default=DEFAULT_DATA_DIR)
    out_dir: str = option("where checkpoints and metrics go; '' = checkpoint/<stage>", default="")
    init_from: str = option("checkpoint directory to start from; '' = the stage's default (SFT: the latest "
                            "checkpoint/pretrain; LoRA: sft, else pretrain; DPO: sft)", default="")
    resume: bool = option("continue the run saved in out_dir (model, optimizer, RNG, data position)", default=False)
    device: str = option("'auto' (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps", default="auto")
    dtype: str = option("'auto' (bf16 on GPUs that have it, else fp16 with a grad scaler; fp32 on CPU/MPS), "
                        "or float32, bfloat16, float16", default="auto")
    compile: str = option("torch.compile the model: auto (CUDA on Linux), true or false", default="auto")
    seed: int = option("random seed (model init and data order)", default=1337)
    batch_size: int = option("rows per micro-batch (per process): token windows, chats, or preference pairs (DPO: "
                             "a chosen and a rejected sequence each)", default=16)
    seq_len: int = option("tokens per sequence, longer chats are truncated; 0 = the model's max_seq_len",
                          default=256)
    grad_accum: int = option("micro-batches per optimizer step (global batch = batch_size * grad_accum * world)",
                             default=1)
    max_steps: int = option("optimizer steps to train (the default suits the tiny preset on a CPU; "
                            "use thousands on a GPU)", default=200)
    epochs: float = option("instead of --max_steps, train for this many passes over the training data (chats, "
                           "pairs, or pretraining tokens) and set max_steps to match; 0 = off", default=0.0)
    lr: float = option("peak learning rate", default=2e-3)
    min_lr: float = option("learning rate at the end of the cosine decay", default=1e-4)
    warmup_steps: int = option("linear warmup steps", default=20)
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


def parse_args(cls, argv: list[str] | None = None, description: str = ""):
    """Parse the command line into an instance of dataclass `cls`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_bad_input():  # a value the config's __post_init__ refuses
        return cls(**{k: v for k, v in vars(ns).items() if v is not None})


def parse_train_args(train_cls, argv: list[str] | None = None, description: str = ""):
    """Parse a training stage's command line: its TrainConfig subclass plus ModelConfig overrides.

    Returns (train_config, model_overrides), where model_overrides holds only the model fields given,
    so that they can be applied on top of a preset or of the checkpoint being fine-tuned.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, train_cls, "training")
    add_dataclass_args(parser, ModelConfig, "model (override the preset's fields)")
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_kwargs = {k: v for k, v in ns.items() if v is not None and k not in model_names}
    model_overrides = {k: v for k, v in ns.items() if v is not None and k in model_names}
    with exit_on_bad_input():  # a value the config's __post_init__ refuses
        return train_cls(**train_kwargs), model_overrides


@contextmanager
def exit_on_bad_input():
    """Bad input (a missing file, a malformed row, a setting that cannot work) raises ValueError, OSError or
    RuntimeError with a one-line message naming it: entry points print that as `error: ...` and exit with status 1,
    instead of a traceback."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
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

    def read_options(self) -> dict:
        """How the data sets read a source (dataset.load_chats, SFTDataset, PreferenceDataset)."""
        return {"skip_bad_rows": self.skip_bad_rows, "hf_data_files": self.hf_data_files, "hf_split": self.hf_split}


@dataclass
class SFTConfig(FineTuneOptions, TrainConfig):
    """Supervised fine-tuning on chats (train_sft.py). Defaults: about 5 minutes of training on a 2-core CPU."""

    # Chats are short, and fine-tuning needs fewer steps.
    seq_len: int = 0
    max_steps: int = 300
    min_lr: float = 2e-4
    warmup_steps: int = 15
    eval_interval: int = 1000
    eval_iters: int = 4
    # Stage options.
    sft_data: str = option("training chats: a .jsonl file (any chat format of dataset.to_messages) or "
                           "hf:<dataset> (e.g. hf:jingyaogong/minimind_dataset with --hf_data_files "
                           "sft_mini_512.jsonl); '' = <data_dir>/sft_train.jsonl", default="")
    sft_val_data: str = option("validation chats, same forms; '' = <data_dir>/sft_val.jsonl; 'none' = no "
                               "validation", default="")
    pack: bool = option("pack several chats into each row (attention stays inside each chat) instead of padding",
                        default=False)
    drop_long: bool = option("drop chats longer than seq_len instead of truncating them", default=False)
    show_mask: bool = option("print one tokenised training chat with the trained tokens marked, and exit",
                             default=False)


def check_scheme_option(flag: str, value: str) -> None:
    """A one-line ValueError unless value is '' (full precision) or one of QUANT_SCHEMES."""
    if value not in ("", *QUANT_SCHEMES):
        raise ValueError(f"--{flag} must be one of {', '.join(QUANT_SCHEMES)} (or left out), got {value!r}")


@dataclass
class QuantizeOption:
    """--quantize, said once for everything that loads a model to train adapters on or to run (quant.py); mixed
    into LoRAOptions and the configs of demo.py, serve.py and eval.py."""

    quantize: str = option(f"hold the linear layers' weights in low precision: {', '.join(QUANT_SCHEMES)} (quant.py); "
                           "'' = as saved. With LoRA: the frozen base (QLoRA; the adapters stay in the compute "
                           "dtype, the output head in full precision); for inference: every linear layer and the "
                           "head (int8 decodes fastest on a CPU)", default="")

    def __post_init__(self):
        check_scheme_option("quantize", self.quantize)


@dataclass
class LoRAOptions(QuantizeOption):
    """The adapter options of the stages that can train through LoRA (lora.py); mixed into their configs."""

    lora_r: int = option("adapter rank r", default=8)
    lora_alpha: float = option("adapter scale alpha: the update is (alpha / r) * B A", default=16.0)
    lora_dropout: float = option("dropout on the adapters' input", default=0.05)
    use_rslora: bool = option("rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r", default=False)
    lora_targets: str = option("comma-separated names of the linear layers to adapt (a name matches a module "
                               "whose name is it or ends in .<name>)", default=",".join(LORA_TARGETS))


@dataclass
class LoRAConfig(LoRAOptions, SFTConfig):
    """LoRA fine-tuning (train_lora.py): SFT that trains only low-rank adapters on frozen weights."""

    weight_decay: float = 0.0
    export_merged: str = option("instead of training, fold the adapters saved in out_dir into their base "
                                "weights and save a full checkpoint to this directory", default="")


@dataclass
class DPOConfig(LoRAOptions, FineTuneOptions, TrainConfig):
    """Direct preference optimisation (train_dpo.py): TrainConfig's options with DPO's defaults, plus its own
    (and the lora_* options, used with --lora)."""

    batch_size: int = 8
    max_steps: int = 60
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 30
    log_interval: int = 1
    save_interval: int = 30
    train_file: str = option("preference pairs: a .jsonl file or hf:<dataset>; '' = <data_dir>/dpo_train.jsonl",
                             default="")
    val_file: str = option("validation pairs, same forms; '' = <data_dir>/dpo_val.jsonl", default="")
    beta: float = option("DPO beta: strength of the pull towards the reference model", default=0.1)
    loss_type: str = option("sigmoid (DPO), ipo or hinge", default="sigmoid")
    label_smoothing: float = option("conservative DPO: assumed probability that a preference is flipped (sigmoid)",
                                    default=0.0)
    precompute_ref: bool = option("compute the reference log-probabilities once, then free the reference model",
                                  default=False)
    lora: bool = option("train LoRA adapters (the lora_* options) on the frozen starting model; the reference is "
                        "the same network with the adapters off, so no second copy is held. Adapters take a "
                        "higher --lr than full fine-tuning", default=False)
    eval_chats: str = option("held-out chats for the answer accuracy before, during and after DPO; '' = "
                             "<data_dir>/sft_val.jsonl", default="")
    reference_quant: str = option(f"hold the frozen reference model's weights in low precision: "
                                  f"{', '.join(QUANT_SCHEMES)} (quant.py); '' = as the policy", default="")

    def __post_init__(self):
        super().__post_init__()
        check_scheme_option("reference_quant", self.reference_quant)
        if self.quantize and not self.lora:
            raise ValueError("--quantize holds a frozen base quantised, so it needs --lora (for the reference model "
                             "alone: --reference_quant)")
        if self.reference_quant and self.lora:
            raise ValueError("--reference_quant does not apply with --lora: the reference is the policy's frozen base, "
                             "which --quantize holds quantised")
        if self.reference_quant and self.precompute_ref:
            raise ValueError("--reference_quant does not apply with --precompute_ref: the reference's "
                             "log-probabilities are computed once by the policy itself, and no reference is kept")
