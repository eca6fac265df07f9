"""Hugging Face interop: pretrained models in (GPT-2, Llama, Mistral, SmolLM, Qwen2/2.5, Qwen3), HF directories out.

A Hugging Face model directory holds config.json, the weights (model.safetensors, shards listed in
model.safetensors.index.json, or pytorch_model.bin) and the tokenizer (tokenizer.json, tokenizer_config.json,
maybe chat_template.jinja). Reading one:
  config.json    -> ModelConfig (`config_from_hf`): the shape, and the architecture switches of its family;
                    both layouts found on the hub load (rope_theta/rope_scaling at the top, and transformers 5's
                    rope_parameters). Any other model_type or RoPE scaling is refused in one line.
  weights        -> our parameter names (`hf_to_ours`, one name table per family; GPT-2's Conv1D weights are
                    transposed and its fused c_attn split into q, k, v), every tensor checked by name and shape.
  tokenizer      -> tokenizer.HFTokenizer (tiktoken, the same ids as transformers).
`hf:ORG/NAME` is fetched with huggingface_hub's snapshot_download first. `export` writes the other way (`ours_to_hf`
is the inverse of `hf_to_ours`), and `load_pretrained` is what the trainers and the demo call.

Mistral's sliding window (and Qwen's, where switched on) is exact only within the window, so an imported
model's context (max_seq_len) is capped at the window: inside it, sliding and full attention are the same.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint import load_model_config, model_state, read_tensors
from configs import ModelConfig, check_rope_scaling, padded_vocab_size
from fileio import write_json

# The switches each Hugging Face family fixes (the rest of ModelConfig is its shape). Llama also has biases
# (attention_bias and mlp_bias together = our `bias`); the others have none beyond what is listed.
FAMILIES = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", attn_bias=False, qk_norm=False),
    "mistral": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", attn_bias=False, qk_norm=False, bias=False),
    "qwen2": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", attn_bias=True, qk_norm=False, bias=False),
    "qwen3": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", attn_bias=False, qk_norm=True, bias=False),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos_emb="learned", attn_bias=False, qk_norm=False, bias=True),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# Our parameter name -> the family's ("{}" is the layer). A name our model does not have (a bias, q_norm) is
# simply never looked up.
_PROJ = {f"layers.{{}}.attn.{p}.{w}": f"model.layers.{{}}.self_attn.{p}.{w}"
         for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")}
_MLP = {f"layers.{{}}.mlp.{p}.{w}": f"model.layers.{{}}.mlp.{p}.{w}"
        for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    **_PROJ, **_MLP,
}
# GPT-2 keeps q, k and v in one Conv1D, c_attn: here it is the made-up "attn.qkv", split after renaming.
GPT2_NAMES = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    **{f"norm.{w}": f"transformer.ln_f.{w}" for w in ("weight", "bias")},
    **{f"layers.{{}}.{ours}.{w}": f"transformer.h.{{}}.{theirs}.{w}" for w in ("weight", "bias") for ours, theirs in (
        ("attn_norm", "ln_1"), ("mlp_norm", "ln_2"), ("attn.qkv", "attn.c_attn"), ("attn.o_proj", "attn.c_proj"),
        ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))},
}
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2 stores these (in, out): y = x W + b
QKV = ("q_proj", "k_proj", "v_proj")


def _names(config: ModelConfig) -> dict[str, str]:
    """Our name -> the HF name, for every layer of this model's family."""
    table = GPT2_NAMES if config.pos_emb == "learned" else LLAMA_NAMES
    names = {}
    for ours, theirs in table.items():
        for i in range(config.n_layers if "{}" in ours else 1):
            names[ours.format(i)] = theirs.format(i)
    return names


# ----------------------------------------------------------------------------- locating a model
def resolve(path) -> Path:
    """A local directory for path: itself, or for hf:ORG/NAME the snapshot huggingface_hub downloads (or has)."""
    path = str(path)
    if not path.startswith("hf:"):
        return Path(path)
    name = path[3:]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"{path}: hf: names need huggingface_hub (pip install huggingface_hub)") from None
    try:  # the weights in safetensors if the repository has them, else in pytorch_model.bin
        directory = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.jinja"]))
    except Exception as e:  # offline, unknown repository, gated model: several huggingface_hub error types
        raise ConnectionError(
            f"{path}: cannot download {name} from the Hugging Face hub ({type(e).__name__}): no network here, or no "
            f"such public model. Download it where there is a network (huggingface-cli download {name} --local-dir "
            f"DIR) and pass the directory DIR instead") from None
    return directory


def is_hf_model(directory) -> bool:
    """Whether directory holds a Hugging Face model (its config.json names a model_type) rather than ours."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


def read_hf_config(directory) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    return config_from_hf(hf, str(path))


# ----------------------------------------------------------------------------- config.json
def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config (as a dict); one-line ValueErrors for what we cannot hold."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    try:
        if family == "gpt2":
            _refuse(where, family, {
                f"activation_function={hf.get('activation_function')!r}": hf.get(
                    "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
                "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
                "reorder_and_upcast_attn": hf.get("reorder_and_upcast_attn", False),
                "scale_attn_weights=false": not hf.get("scale_attn_weights", True)})
            shape = dict(vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                         n_kv_heads=hf["n_head"], hidden_dim=hf.get("n_inner") or 4 * hf["n_embd"],
                         max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=True)
        else:
            bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
            _refuse(where, family, {
                f"hidden_act={hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
                f"attention_bias={bias} with mlp_bias={mlp_bias}": bias != mlp_bias and family == "llama",
                "attention_bias": bias and family in ("mistral", "qwen3"),
                "mlp_bias": mlp_bias and family != "llama"})
            shape = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                         n_heads=hf["num_attention_heads"],
                         n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                         head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                         hidden_dim=hf["intermediate_size"], max_seq_len=_context(hf),
                         norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                         **_rope(hf, where))
            if family == "llama":
                shape["bias"] = bias
    except KeyError as e:
        raise ValueError(f"{where}: {e.args[0]} missing") from None
    return ModelConfig(**shape, **FAMILIES[family], hf_model_type=family)


def _refuse(where: str, family: str, problems: dict[str, bool]) -> None:
    """One line naming every setting (a key of problems whose value is true) we cannot hold."""
    bad = [setting for setting, wrong in problems.items() if wrong]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} is not supported for model_type {family!r}")


def _rope(hf: dict, where: str) -> dict:
    """rope_theta and rope_scaling from either layout: at the top (older files) or in rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}  # older files say "type"
    if scaling.get("rope_type", "default") == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    check_rope_scaling(scaling, where)
    return dict(rope_theta=theta, rope_scaling=scaling)


def _context(hf: dict) -> int:
    """max_position_embeddings, capped at a sliding attention window (exact within it)."""
    window = None
    if hf.get("use_sliding_window") or (hf["model_type"] == "mistral" and hf.get("sliding_window")) or \
            "sliding_attention" in (hf.get("layer_types") or []):
        window = hf.get("sliding_window")
    return min(hf["max_position_embeddings"], window or hf["max_position_embeddings"])


def family_of(config: ModelConfig) -> str:
    """The Hugging Face family this model is written as: hf_model_type, else the first whose switches match."""
    if config.use_moe:
        raise ValueError("this is a Mixture-of-Experts model (use_moe): only dense models map onto a Hugging Face "
                         f"architecture ({', '.join(FAMILIES)})")
    family = config.hf_model_type or next(
        (f for f in ("llama", "qwen2", "qwen3", "gpt2") if _mismatches(config, f) == []), "llama")
    if family not in FAMILIES:
        raise ValueError(f"hf_model_type {family!r} is not one of {', '.join(FAMILIES)}")
    bad = _mismatches(config, family)
    if bad:
        raise ValueError(f"this model cannot be written as {family}: {', '.join(bad)} differ from that architecture")
    return family


def _mismatches(config: ModelConfig, family: str) -> list[str]:
    bad = [f"{k}={getattr(config, k)!r}" for k, v in FAMILIES[family].items() if getattr(config, k) != v]
    if family == "gpt2" and (config.n_kv_heads != config.n_heads or config.head_dim * config.n_heads != config.dim):
        bad.append("grouped-query attention or a head_dim other than dim / n_heads")
    return bad


def config_to_hf(config: ModelConfig, tokenizer=None, dtype: str = "float32") -> dict:
    """The config.json of this model in its family's layout (rope_theta/rope_scaling at the top, which
    transformers 4 and 5, vLLM and llama.cpp's converter all read)."""
    family, c = family_of(config), config
    if family == "gpt2":
        hf = dict(vocab_size=c.vocab_size, n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.hidden_dim,
                  n_positions=c.max_seq_len, n_ctx=c.max_seq_len, activation_function="gelu_new",
                  layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                  scale_attn_weights=True, tie_word_embeddings=True)
    else:
        hf = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                  head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                  rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_embeddings,
                  hidden_act="silu", attention_dropout=c.dropout)
        hf.update({"llama": dict(attention_bias=c.bias, mlp_bias=c.bias), "mistral": dict(sliding_window=None),
                   "qwen2": dict(use_sliding_window=False, sliding_window=None),
                   "qwen3": dict(attention_bias=False, use_sliding_window=False, sliding_window=None)}[family])
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    return {"architectures": [ARCHITECTURES[family]], "model_type": family, **hf, "torch_dtype": dtype}


# ----------------------------------------------------------------------------- weights
def read_hf_weights(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory: model.safetensors, its shards, or pytorch_model.bin (and its shards)."""
    d = Path(directory)
    for single, index, read in (("model.safetensors", "model.safetensors.index.json", read_tensors),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_bin)):
        if (d / single).exists():
            return read(d / single)
        if (d / index).exists():
            try:
                files = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{d / index}: not a weight index ({e!r})") from None
            return {k: v for f in files for k, v in read(d / f).items()}
    raise FileNotFoundError(f"{d}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:  # weights_only: a pickle that holds code (not just tensors) is refused instead of run
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def hf_to_ours(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A HF state dict under our names and layouts; names it does not know stay as they are (so that a check
    against the model reports them as unexpected)."""
    gpt2 = config.pos_emb == "learned"
    theirs_to_ours = {theirs: ours for ours, theirs in _names(config).items()}
    out = {}
    for name, tensor in hf_state.items():
        if gpt2 and not name.startswith("transformer.") and name != "lm_head.weight":
            name = "transformer." + name  # the original GPT-2 files have no prefix
        if name.endswith("rotary_emb.inv_freq") or re.fullmatch(r"transformer\.h\.\d+\.attn\.(masked_)?bias", name):
            continue  # buffers that older transformers versions saved (RoPE frequencies, GPT-2's causal mask)
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: the embedding is the head
        if gpt2 and name.endswith(CONV1D):
            tensor = tensor.T
        out[theirs_to_ours.get(name, name)] = tensor
    for i in range(config.n_layers if gpt2 else 0):
        for w in ("weight", "bias"):
            if f"layers.{i}.attn.qkv.{w}" in out:
                parts = out.pop(f"layers.{i}.attn.qkv.{w}").chunk(3, dim=0)
                out.update({f"layers.{i}.attn.{p}.{w}": t for p, t in zip(QKV, parts)})
    return out


def ours_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_ours, for a state dict of model_state (the tied head left out, the vocabulary's
    padding rows cut off)."""
    state = dict(state)
    for name in ("embed.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name][:config.vocab_size]
    if config.pos_emb == "learned":
        for i in range(config.n_layers):
            for w in ("weight", "bias"):
                state[f"layers.{i}.attn.qkv.{w}"] = torch.cat([state.pop(f"layers.{i}.attn.{p}.{w}") for p in QKV])
    names = _names(config)
    unknown = [k for k in state if k not in names]
    if unknown:
        raise ValueError(f"no Hugging Face name for {', '.join(unknown[:3])}")
    return {names[k]: (v.T if names[k].endswith(CONV1D) else v).contiguous() for k, v in state.items()}


def ours_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A HF state dict as our model's state dict: our names (hf_to_ours), the vocabulary's padding rows added
    (zero) and the tied head pointing at the embedding; the caller checks it against the model."""
    loaded = hf_to_ours(hf_state, config)
    padded = padded_vocab_size(config.vocab_size)
    for name in ("embed.weight", "lm_head.weight"):
        if name in loaded and loaded[name].shape[0] == config.vocab_size < padded:
            extra = loaded[name].new_zeros(padded - config.vocab_size, loaded[name].shape[1])
            loaded[name] = torch.cat([loaded[name], extra])  # the padding rows stay zero
    if config.tie_embeddings and "embed.weight" in loaded:
        loaded["lm_head.weight"] = loaded["embed.weight"]
    return loaded


# ----------------------------------------------------------------------------- loading
def load_config(path) -> ModelConfig:
    """The ModelConfig of our checkpoint directory, a HF model directory or hf:ORG/NAME."""
    directory = resolve(path)
    return read_hf_config(directory) if is_hf_model(directory) else load_model_config(directory)


# ----------------------------------------------------------------------------- transformers models and export
def to_transformers(model, family: str | None = None):
    """A transformers model of this model's family (or `family`) with its weights (tests, bench.py)."""
    import transformers

    config = replace(model.config, hf_model_type=family) if family else model.config
    hf_config = config_to_hf(config)
    hf_config.pop("architectures")
    hf_model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "torch_dtype"}))
    state = ours_to_hf(model_state(model), config)
    if config.tie_embeddings:
        state["lm_head.weight"] = state[_names(config)["embed.weight"]]
    hf_model.load_state_dict(state, strict=True)
    return hf_model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(model, tokenizer, out_dir, dtype: str = "float32") -> Path:
    """Write model and tokenizer as a Hugging Face directory: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template) and generation_config.json."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new --out directory")
    config = config_to_hf(model.config, tokenizer, dtype)  # refuses what no HF family can hold
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    state = {k: v.to(DTYPES[dtype]) for k, v in ours_to_hf(model_state(model), model.config).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    write_json(out / "config.json", config)
    stop = list(dict.fromkeys([tokenizer.im_end_id, tokenizer.eot_id]))
    write_json(out / "generation_config.json", {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop,
                                                "pad_token_id": tokenizer.pad_id})
    tokenizer.save_hf(out, model.config.max_seq_len)
    return out
