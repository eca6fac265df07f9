"""Multi-head causal self-attention with RoPE, grouped-query attention and a KV cache.

Two implementations of the same maths, picked by `ModelConfig.attn_impl`:
- `manual_attention`: scores, mask, softmax, dropout, weighted sum, written out to be read;
- `sdpa_attention`: torch's fused `scaled_dot_product_attention` (flash/memory-efficient kernels).
tests/test_model.py checks that they agree in outputs and gradients.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from norms import RMSNorm


# ----------------------------------------------------------------------------- RoPE
def precompute_rope(head_dim: int, max_seq_len: int, theta: float,
                    scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim) for rotary position embeddings.

    Uses the "rotate half" layout of HF Llama: channel i and channel i + head_dim/2 form one rotating pair,
    both turning at frequency theta^(-2i/head_dim). `scaling` stretches the frequencies for contexts longer
    than the model was trained on (configs.ROPE_SCALING_KEYS):
    - linear: every frequency / factor, i.e. position p is treated as p / factor;
    - llama3: wavelengths longer than original_len / low_freq_factor are stretched by factor, those shorter
      than original_len / high_freq_factor are kept, and the ones between are interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
        between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor,
                               torch.where(wavelen < original / high, inv_freq, between))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim): the same angle for both halves of a pair
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the angles of its positions; cos/sin are (T, head_dim)."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


# ----------------------------------------------------------------------------- masks
def build_attention_mask(q_len: int, k_len: int, device, key_padding: torch.Tensor | None = None,
                         segment_ids: torch.Tensor | None = None,
                         branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, q_len, k_len), True where a query may attend to a key.

    Causal: the queries are the last q_len of k_len positions (q_len < k_len when a KV cache holds the
    prefix). key_padding (B, k_len) is 1 for real tokens, 0 for padding. segment_ids (B, q_len == k_len)
    number the documents packed into one row; attention stays inside a document. branch_ids (B, q_len == k_len)
    pack several continuations of one prompt into a row: the prompt is branch 0, then continuation 1, 2, ...
    one after the other; a continuation sees the prompt and itself, not the continuations before it.
    Every query may always attend to itself, so a padding row never has an all-masked softmax (NaN).
    """
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, q, k)
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if branch_ids is not None:
        key_branch = branch_ids[:, None, None, :]
        mask = mask & ((key_branch == 0) | (key_branch == branch_ids[:, None, :, None]))
    return mask | (k_pos == q_pos)[None, None]


def position_mask(positions: torch.Tensor, k_len: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, k_len) for rows that each sit at their own positions (B, T) in a KV cache: the
    query at position p sees its row's keys 0..p (continuous batching: every row is another sequence)."""
    return torch.arange(k_len, device=positions.device) <= positions[:, None, :, None]


# ----------------------------------------------------------------------------- the attention maths
def manual_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, written out. q (B, H, T, D); k, v (B, H_kv, S, D).

    mask None means plain causal attention over the last T of S positions.
    """
    n_rep = q.shape[1] // k.shape[1]
    # Grouped-query attention: query head j reads key/value head j // n_rep.
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        mask = build_attention_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).type_as(q)  # softmax in float32 for stability
    weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def sdpa_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """The same as manual_attention through torch's fused kernel."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and T != S:
        # is_causal aligns the mask top-left; with a cached prefix (T < S) it must align bottom-right.
        mask = build_attention_mask(T, S, q.device) if T > 1 else None
        is_causal = False
    else:
        is_causal = mask is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


ATTENTION_IMPLS = {"manual": manual_attention, "sdpa": sdpa_attention}


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys and values of every layer, for generation one token at a time.

    One buffer per layer rather than one for all: under torch.compile, writing into a slice of a layer's own
    buffer stays in place, while a slice of a shared buffer would copy the whole cache at every layer.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device, dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored (the model advances it after each forward)
        # (B, T) positions of each row's tokens in the current forward, when the rows are sequences of different
        # lengths (continuous batching, engine.py); None = every row at pos. GPT.forward sets it.
        self.positions = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at the current position; return all keys and values so far."""
        if self.positions is not None:  # each row at its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, self.positions] = k.transpose(1, 2)  # row b's tokens at positions[b]
            self.v[layer][rows, :, self.positions] = v.transpose(1, 2)
            end = int(self.positions.max()) + 1  # keys up to the furthest row; position_mask hides the rest
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_rows(self, n: int) -> None:
        """Each row n times over (row b becomes rows b*n .. b*n+n-1): one prompt's cache for n continuations."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Only the rows where keep (B,) is True from now on (generation drops the rows that have finished)."""
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows start:stop (sequences) only, sharing this one's storage: writes land here too."""
        view = copy.copy(self)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        return view


# ----------------------------------------------------------------------------- the module
class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (Llama's q/k/v/o projections).

    Switches (configs.ModelConfig): `bias` gives every projection a bias (GPT-2), `attn_bias` only q, k and v
    (Qwen2); `qk_norm` RMS-normalises each query and key head before RoPE (Qwen3). With learned positions
    (GPT-2) cos and sin are None and no rotation happens here.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_bias = config.bias or config.attn_bias
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attend = ATTENTION_IMPLS[config.attn_impl]

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # each head's query and key vectors to unit RMS (times a learned gain)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = self.attend(q, k, v, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(y))
