"""A decoder-only GPT in the Llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU.

A few switches of ModelConfig give the other families in the same classes: LayerNorm, a GELU MLP, learned
positions and biases (GPT-2), q/k/v biases (Qwen2), QK-norm (Qwen3). The parameters match HF transformers'
models up to renaming (hf.py holds the name maps), so checkpoints convert exactly both ways
(`GPT.from_pretrained` reads Hugging Face directories; export.py writes them).
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import quant
from attention import Attention, KVCache, build_attention_mask, position_mask, precompute_rope
from checkpoint import WEIGHTS, check_state_matches, load_weights, saved_quantization
from configs import ModelConfig, padded_vocab_size
from devices import EagerFallback
from hf import config_from_hf, is_hf_model, load_config, ours_from_hf, read_hf_weights, resolve
from moe import MoE
from norms import make_norm
from sampling import apply_repetition_penalty, sample_next


class MLP(nn.Module):
    """SwiGLU feed-forward, down(silu(gate(x)) * up(x)); or with mlp='gelu' GPT-2's down(gelu_tanh(up(x))),
    where gelu_tanh(h) = 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.gated else F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is an MoE with use_moe."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config, MLP) if config.use_moe else MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        vocab = padded_vocab_size(config.vocab_size)
        self.embed = nn.Embedding(vocab, config.dim)
        # GPT-2: a learned vector per position, added to the token embedding; else positions are RoPE's.
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim) if config.pos_emb == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.pos_emb == "rope":
            cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False  # recompute each block in backward (set by the trainer)
        self.decode_step = None  # a compiled forward for generation's one-token steps (compile_decoding)
        self.value_head: nn.Linear | None = None  # a scalar head, for reward models and PPO (add_value_head)
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

    def num_params(self) -> int:
        """Parameter count (a tied embedding counted once; a quantised layer's weights, frozen buffers, count too)."""
        quantised = sum(m.num_weights() for name, m in self.named_modules() if isinstance(m, quant.QuantLinear)
                        and not (name == "lm_head" and self.config.tie_embeddings))  # a copy of the embedding
        return sum(p.numel() for p in self.parameters()) + quantised

    def num_active_params(self) -> int:
        """Parameters used per token: with MoE, the routed experts a token does not visit are left out."""
        inactive = sum(block.mlp.num_inactive_params() for block in self.layers) if self.config.use_moe else 0
        return self.num_params() - inactive

    def describe_size(self) -> str:
        """'26.88M parameters', or with MoE '9.20M parameters, 4.10M active per token'."""
        text = f"{self.num_params() / 1e6:.2f}M parameters"
        return text + (f", {self.num_active_params() / 1e6:.2f}M active per token" if self.config.use_moe else "")

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int = 0, with_values: bool = False,
                branch_ids: torch.Tensor | None = None):
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        attention_mask (B, T): 1 for real tokens, 0 for padding (only needed where padding comes before
        real tokens, e.g. left-padded prompts). segment_ids (B, T): packed documents, attention stays
        inside each. branch_ids (B, T): a prompt (0) and its continuations (1, 2, ...) packed into one row,
        each continuation seeing the prompt and itself (attention.build_attention_mask; GRPO's groups, rl.py).
        cache: a KVCache holding earlier positions; it is advanced by T.
        positions (B, T): each token's position (RoPE or learned), where it is not its index in the row: packed
        continuations all start where the prompt ends. With a cache: each row's own token positions, for rows
        that are sequences of different lengths (continuous batching, engine.py). Row b is stored at
        positions[b] and each token sees its row's keys up to its own position; cache.pos is neither used nor
        advanced.
        logits_to_keep: only the logits of the last N positions (0 = all), as in HF transformers: a loss on a
        completion needs only its own positions, and (B, T, vocab) logits are a step's largest tensor.
        with_values: return (logits, values), values (B, T) being the value head's scalar at every position
        (a reward model or PPO's critic; see add_value_head).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        length = int(positions.max()) + 1 if positions is not None else start + T
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_seq_len {self.config.max_seq_len}")
        mask = None
        if cache is not None and positions is not None:  # rows at positions of their own (continuous batching)
            mask = position_mask(positions, length)
        elif attention_mask is not None or segment_ids is not None or branch_ids is not None:
            mask = build_attention_mask(T, start + T, idx.device, attention_mask, segment_ids, branch_ids)
        if cache is not None:
            cache.positions = positions
        x = self.embed(idx)
        if self.pos_embed is None:
            if positions is not None:
                cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)
            else:
                cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            cos = sin = None
            absolute = positions
            if absolute is None and attention_mask is None:
                absolute = torch.arange(start, start + T, device=idx.device)
            elif absolute is None:  # left padding: a token's position is the number of real tokens before it
                # (RoPE is relative and does not care, absolute positions do)
                absolute = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            x = x + self.pos_embed(absolute)
        x = self.dropout(x)
        for block in self.layers:
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None and positions is None:
            cache.pos += T
        hidden = self.norm(x)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        # Padding rows of the vocabulary are never predicted.
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        if not with_values:
            return logits
        if self.value_head is None:
            raise ValueError("with_values needs a value head: call add_value_head() first")
        return logits, self.value_head(hidden).squeeze(-1)

    def add_value_head(self) -> nn.Linear:
        """Attach a linear head that reads one scalar from the last hidden state of each position: the score of a
        reward model, the value of PPO's critic. It starts at zero (every score and value is 0 before training)
        and is saved in a file of its own (checkpoint.py), so the language model stays a plain GPT checkpoint."""
        weight = self.embed.weight
        self.value_head = nn.Linear(self.config.dim, 1, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        return self.value_head

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        eos_id: int | list[int] | None = None, generator: torch.Generator | None = None,
                        attention_mask: torch.Tensor | None = None, num_samples: int = 1):
        """Yield the next tokens (B * num_samples, 1) one step at a time, with a KV cache.

        The prompt idx (B, T) is processed once (prefill); each later step feeds only the newest token.
        The model sees at most the last max_seq_len tokens: a longer prompt is cut from the left, and when
        the context fills up it slides (each step re-reads the last max_seq_len tokens), as nanoGPT's crop does.
        Stops after max_new_tokens or when every row has produced an eos_id (rows that finished early keep
        receiving eos, and are no longer computed once they are most of the batch). The repetition penalty looks at
        the whole prompt and everything generated.
        attention_mask (B, T) marks the real prompt tokens (0 = padding, for left-padded batches of prompts).
        num_samples: continuations of each prompt, in rows b * num_samples .. (b + 1) * num_samples - 1; the prompt
        is processed once and its cache copied to them (GRPO samples a group of replies to each question).
        """
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else (eos_id or []), dtype=torch.long,
                           device=idx.device)
        window = self.config.max_seq_len
        # Only as long as this generation can get: a pretrained model's context (32k for Qwen2.5) would
        # otherwise allocate gigabytes of cache for a short reply.
        cache = self.new_kv_cache(idx.shape[0], min(window, idx.shape[1] + max_new_tokens))
        finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        live = torch.arange(idx.shape[0], device=idx.device)  # the rows still computed (see the end of the loop)
        seq, step_input, seq_mask = idx, idx[:, -window:], attention_mask
        for _ in range(max_new_tokens):
            if cache.pos + step_input.shape[1] > window:
                cache.pos = 0  # the context is full: refill the same buffers with the newest tokens
                step_input = seq[live, -window:]
            # The cache and the step input together are the last cache.pos + len(step_input) tokens of seq.
            mask = None if seq_mask is None else seq_mask[live, -(cache.pos + step_input.shape[1]):]
            forward = self.decode_step if self.decode_step and step_input.shape[1] == 1 else self
            # Only the last position's logits: a prompt's other positions would each cost a (vocab x dim) product.
            logits = forward(step_input, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1, :].float()
            if num_samples > 1 and len(seq) == len(idx):  # after the prefill: num_samples rows for each prompt
                logits, seq = logits.repeat_interleave(num_samples, 0), seq.repeat_interleave(num_samples, 0)
                seq_mask = None if seq_mask is None else seq_mask.repeat_interleave(num_samples, 0)
                finished = finished.repeat_interleave(num_samples, 0)
                live = torch.arange(len(seq), device=idx.device)
                cache.repeat_rows(num_samples)
            logits = apply_repetition_penalty(logits, seq[live], repetition_penalty)
            token = torch.zeros_like(finished, dtype=torch.long)
            token[live] = sample_next(logits, temperature, top_k, top_p, generator)
            if len(eos):
                token = torch.where(finished, eos[0], token)
                finished |= torch.isin(token, eos)
            yield token
            if finished.all():
                return
            seq = torch.cat([seq, token], dim=1)
            if seq_mask is not None:
                seq_mask = torch.cat([seq_mask, torch.ones_like(token)], dim=1)
            # Finished rows only receive eos: once they are most of the rows computed, drop them from the batch
            # (and their cache), so that one long reply does not keep a whole batch of finished ones running.
            if finished[live].float().mean() > 0.5:
                keep = ~finished[live, 0]
                live = live[keep]
                cache.keep_rows(keep)
            step_input = token[live]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 num_samples: int = 1) -> torch.Tensor:
        """idx (B, T) with up to max_new_tokens sampled tokens appended (temperature 0 = greedy); with num_samples,
        (B * num_samples, T + new): each prompt's rows next to each other (generate_stream)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        eos_id, generator, attention_mask, num_samples))
        return torch.cat([idx.repeat_interleave(num_samples, 0), *new], dim=1)

    def compile_decoding(self, log=print) -> bool:
        """Run generation's one-token steps through torch.compile; False if that failed (decoding stays eager).

        At batch 1, decoding streams every weight once per token, and in eager mode the ~300 small
        operations around those matrix-vector products cost almost as much again in Python and dispatch
        overhead. Compiled (dynamic in the cache length, so it compiles once), the norms, RoPE and the cache
        writes fuse into a few kernels, called from generated C++. Compiling happens here, on a short dummy
        sequence: tens of seconds on a CPU. Prompts (prefill) stay eager: they are large matrix products already.
        A compiled step that fails later (a recompile for a new batch size, say) falls back to eager with a
        message from `log`, like one that fails here.
        """
        # cpp_wrapper: the compiled step's calls are made from C++, not Python (~10% faster decoding on a CPU).
        compiled = torch.compile(self.forward, dynamic=True, options={"cpp_wrapper": True})
        self.decode_step = EagerFallback(compiled, self.forward, "decoding eagerly", log)
        # One step at position 2 (sizes 0 and 1 would be specialised) compiles it now.
        self.generate(torch.zeros(1, 2, dtype=torch.long, device=self.embed.weight.device), 2, temperature=0)
        return self.decode_step.is_compiled

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
    def from_pretrained(cls, path, device="cpu", overrides: dict | None = None,
                        quantize: str | None = None) -> "GPT":
        """Load our checkpoint directory (config.json + model.safetensors), a Hugging Face model directory or
        hf:ORG/NAME (downloaded with huggingface_hub), every weight checked by name and shape. overrides:
        model fields to change on the way (e.g. dropout).

        quantize (quant.SCHEMES: int8, nf4, fp16, bf16) quantises it for inference: every linear layer, the output
        head in 16 bits (quant.INFERENCE_HEAD; the embedding stays float). A checkpoint saved quantised
        (quant.save_quantized) loads in the scheme it was saved in; asking for another is refused.
        """
        directory = resolve(path)
        model = cls(dataclasses.replace(load_config(directory), **(overrides or {})))
        saved = None if is_hf_model(directory) else saved_quantization(directory)
        if saved:  # the quantised layers must exist before their packed weights load into them
            quant.quantize_model(model, saved["scheme"], saved["head"], saved["double_quant"], saved["block_size"])
        if is_hf_model(directory):
            model._load_hf_state(read_hf_weights(directory), str(directory))
        else:
            load_weights(model, directory)
        return quant.quantize_as(model, quantize, directory / WEIGHTS).to(device)

    @classmethod
    def from_transformers(cls, hf_model) -> "GPT":
        """A GPT with the weights of a transformers model of a family hf.py maps (tests, bench.py)."""
        source = type(hf_model).__name__
        model = cls(config_from_hf(hf_model.config.to_dict(), source))
        model._load_hf_state(hf_model.state_dict(), source)
        return model

    def _load_hf_state(self, hf_state: dict, source: str) -> None:
        loaded = ours_from_hf(hf_state, self.config)
        check_state_matches(self.state_dict(), loaded, source)
        self.load_state_dict(loaded, strict=True)
