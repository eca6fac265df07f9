"""Normalisation layers: RMSNorm (Llama, Qwen; also Qwen3's per-head QK-norm) and LayerNorm (GPT-2).

Both normalise in float32, as the reference implementations do, and cast back before the learned gain.
"""

import torch
import torch.nn as nn

from configs import ModelConfig


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


class LayerNorm(nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias), normalising in float32 (GPT-2's LayerNorm)."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        xf = x.float()
        xf = xf - xf.mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.type_as(x)
        return y + self.bias if self.bias is not None else y


def make_norm(config: ModelConfig) -> nn.Module:
    """The block and final norm of this architecture (config.norm)."""
    if config.norm == "layernorm":
        return LayerNorm(config.dim, config.norm_eps, config.bias)
    return RMSNorm(config.dim, config.norm_eps)
