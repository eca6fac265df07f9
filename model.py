"""A decoder-only GPT in the Llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The parameter names and layouts match HF transformers' LlamaForCausalLM up to renaming, so a checkpoint
converts exactly both ways (`GPT.from_hf_llama`, `GPT.to_hf_llama`).
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import quant
from attention import Attention, KVCache, build_attention_mask, precompute_rope
from configs import ModelConfig
from sampling import apply_repetition_penalty, sample_next


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalising in float32 (as Llama) and casting back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is an MoE with use_moe."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        if config.use_moe:
            from moe import MoE  # imported here: moe.py builds its experts from MLP above

            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the embedding table up so the output matmul has tensor-core friendly shapes."""
    return multiple * math.ceil(vocab_size / multiple)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        vocab = padded_vocab_size(config.vocab_size)
        self.embed = nn.Embedding(vocab, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False  # recompute each block in backward (set by the trainer)
        self.decode_step = None  # a compiled forward for generation's one-token steps (compile_decoding)
        self.apply(self._init_weights)
        # Scale the residual projections by 1/sqrt(2 * n_layers) so the residual stream does not grow
        # with depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied embedding counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def num_active_params(self, non_embedding: bool = False) -> int:
        """Parameters used per token: with MoE, the routed experts a token does not visit are left out."""
        inactive = sum(block.mlp.num_inactive_params() for block in self.layers) if self.config.use_moe else 0
        return self.num_params(non_embedding) - inactive

    def describe_size(self) -> str:
        """'26.88M parameters', or with MoE '9.20M parameters, 4.10M active per token'."""
        text = f"{self.num_params() / 1e6:.2f}M parameters"
        return text + (f", {self.num_active_params() / 1e6:.2f}M active per token" if self.config.use_moe else "")

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        attention_mask (B, T): 1 for real tokens, 0 for padding (only needed where padding comes before
        real tokens, e.g. left-padded prompts). segment_ids (B, T): packed documents, attention stays
        inside each. cache: a KVCache holding earlier positions; it is advanced by T.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if attention_mask is not None or segment_ids is not None:
            mask = build_attention_mask(T, start + T, idx.device, attention_mask, segment_ids)
        x = self.dropout(self.embed(idx))
        for block in self.layers:
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        # Padding rows of the vocabulary are never predicted.
        return logits if logits.shape[-1] == self.config.vocab_size else logits[..., :self.config.vocab_size]

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        eos_id: int | list[int] | None = None, generator: torch.Generator | None = None,
                        attention_mask: torch.Tensor | None = None):
        """Yield the next tokens (B, 1) one step at a time, with a KV cache.

        The prompt idx (B, T) is processed once (prefill); each later step feeds only the newest token.
        The model sees at most the last max_seq_len tokens: a longer prompt is cut from the left, and when
        the context fills up it slides (each step re-reads the last max_seq_len tokens), as nanoGPT's crop does.
        Stops after max_new_tokens or when every row has produced an eos_id (rows that finished early keep
        receiving eos). The repetition penalty looks at the whole prompt and everything generated.
        attention_mask (B, T) marks the real prompt tokens (0 = padding, for left-padded batches of prompts).
        """
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else (eos_id or []), dtype=torch.long,
                           device=idx.device)
        window = self.config.max_seq_len
        cache = self.new_kv_cache(idx.shape[0])
        finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        seq, step_input, seq_mask = idx, idx[:, -window:], attention_mask
        for _ in range(max_new_tokens):
            if cache.pos + step_input.shape[1] > window:
                cache.pos = 0  # the context is full: refill the same buffers with the newest tokens
                step_input = seq[:, -window:]
            # The cache and the step input together are the last cache.pos + len(step_input) tokens of seq.
            mask = None if seq_mask is None else seq_mask[:, -(cache.pos + step_input.shape[1]):]
            forward = self.decode_step if self.decode_step and step_input.shape[1] == 1 else self
            logits = forward(step_input, attention_mask=mask, cache=cache)[:, -1, :].float()
            logits = apply_repetition_penalty(logits, seq, repetition_penalty)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if len(eos):
                token = torch.where(finished, eos[0], token)
                finished |= torch.isin(token, eos)
            yield token
            if finished.all():
                return
            seq, step_input = torch.cat([seq, token], dim=1), token
            if seq_mask is not None:
                seq_mask = torch.cat([seq_mask, torch.ones_like(token)], dim=1)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) with up to max_new_tokens sampled tokens appended (temperature 0 = greedy)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        eos_id, generator, attention_mask))
        return torch.cat([idx, *new], dim=1)

    def compile_decoding(self) -> str | None:
        """Run generation's one-token steps through torch.compile; None on success, else why it failed.

        At batch 1, decoding streams every weight once per token, and in eager mode the ~300 small
        operations around those matrix-vector products cost almost as much again in Python and dispatch
        overhead. Compiled (dynamic in the cache length, so it compiles once), the norms, RoPE and the cache
        writes fuse into a few kernels, called from generated C++. Compiling happens here, on a short dummy
        sequence: tens of seconds on a CPU. Prompts (prefill) stay eager: they are large matrix products already.
        """
        # cpp_wrapper: the compiled step's calls are made from C++, not Python (~10% faster decoding on a CPU).
        self.decode_step = torch.compile(self.forward, dynamic=True, options={"cpp_wrapper": True})
        try:  # one step at position 2 (sizes 0 and 1 would be specialised)
            self.generate(torch.zeros(1, 2, dtype=torch.long, device=self.embed.weight.device), 2, temperature=0)
        except Exception as e:  # no C++ compiler, Windows, MPS, an old torch: decoding stays eager
            self.decode_step = None
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        return None

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.config
        p = self.embed.weight
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                       p.device, p.dtype)

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (not on norms or biases); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    # ------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, checkpoint_dir, device="cpu", quantize: str | None = None) -> "GPT":
        """Load a model saved by the trainers (config.json + model.safetensors).

        quantize (quant.SCHEMES: int8, nf4, fp16, bf16) quantises it for inference: every linear layer, the output
        head included (the embedding stays float). A checkpoint saved quantised (quant.save_quantized) loads in the
        scheme it was saved in; asking for another is refused.
        """
        from checkpoint import WEIGHTS, load_model_config, load_weights, saved_quantization

        config = load_model_config(checkpoint_dir)
        model = cls(config)
        saved = saved_quantization(checkpoint_dir)
        if saved:
            quant.check_scheme(saved, quantize, Path(checkpoint_dir) / WEIGHTS)
            quant.quantize_model(model, saved["scheme"], saved["head"], saved["double_quant"], saved["block_size"])
        load_weights(model, checkpoint_dir, device=device)
        if quantize and not saved:
            quant.quantize_model(model, quantize, head=True)
        return model.to(device)

    # ------------------------------------------------------------------------- HF Llama interop
    # Our parameter name -> LlamaForCausalLM's (layer i replaces "{}").
    HF_NAMES = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        **{f"layers.{{}}.attn.{p}.weight": f"model.layers.{{}}.self_attn.{p}.weight"
           for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"layers.{{}}.mlp.{p}.weight": f"model.layers.{{}}.mlp.{p}.weight"
           for p in ("gate_proj", "up_proj", "down_proj")},
    }

    def _hf_name_map(self) -> dict[str, str]:
        names = {}
        for ours, theirs in self.HF_NAMES.items():
            if "{}" in ours:
                names.update({ours.format(i): theirs.format(i) for i in range(self.config.n_layers)})
            else:
                names[ours] = theirs
        if self.config.bias:
            names.update({k.replace(".weight", ".bias"): v.replace(".weight", ".bias")
                          for k, v in list(names.items()) if "proj" in k})
        return names

    @classmethod
    def from_hf_llama(cls, hf_model) -> "GPT":
        """Build a GPT with the weights of a transformers LlamaForCausalLM."""
        c = hf_model.config
        if getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts", None):
            raise ValueError(f"from_hf_llama: {type(c).__name__} is a Mixture-of-Experts model; "
                             "only dense Llama models convert")
        config = ModelConfig(
            vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, hidden_dim=c.intermediate_size,
            max_seq_len=c.max_position_embeddings, rope_theta=c.rope_parameters["rope_theta"]
            if getattr(c, "rope_parameters", None) else c.rope_theta,
            norm_eps=c.rms_norm_eps, tie_embeddings=c.tie_word_embeddings, bias=c.attention_bias)
        model = cls(config)
        hf_state = hf_model.state_dict()
        with torch.no_grad():
            for ours, theirs in model._hf_name_map().items():
                if ours == "lm_head.weight" and config.tie_embeddings:
                    continue
                src = hf_state[theirs]
                dst = model.get_parameter(ours)
                dst.zero_()  # padded vocabulary rows stay zero
                dst[:src.shape[0]].copy_(src)
        return model

    def to_hf_llama(self):
        """A transformers LlamaForCausalLM with this model's weights."""
        c = self.config
        if c.use_moe:
            raise ValueError("to_hf_llama: this is a Mixture-of-Experts model (use_moe); only dense models "
                             "convert to LlamaForCausalLM")
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, attention_bias=c.bias, mlp_bias=c.bias, hidden_act="silu")
        hf_model = LlamaForCausalLM(hf_config)
        hf_state = {}
        for ours, theirs in self._hf_name_map().items():
            t = self.get_parameter(ours).detach()
            hf_state[theirs] = t[:c.vocab_size] if ours in ("embed.weight", "lm_head.weight") else t
        if c.tie_embeddings:
            hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
        hf_model.load_state_dict(hf_state, strict=True)
        return hf_model
