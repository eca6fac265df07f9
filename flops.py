"""FLOPs per training token and the device's peak: model FLOPs utilisation (MFU) in one place.

MFU = training FLOPs per token x tokens/s / the device's peak FLOPs (PaLM, Chowdhery et al. 2022, appendix B).
The trainer logs it with tokens/s, bench.py reports it for ours and HF's model, report.py shows it per stage.
"""

import functools
import time

import torch

from configs import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
GPU_PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0), ("RTX 4090", 165.0), ("RTX 4080", 97.0),
    ("RTX 3090", 71.0), ("RTX 3080", 59.5), ("V100", 125.0), ("T4", 65.0),  # V100, T4: fp16 (no bf16)
]


def matmul_params(c: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token: every projection and the output head
    (the embedding is a lookup, so a tied embedding is counted once, as the head). With MoE, only the
    experts a token visits count (the shared ones and its top-k routed ones), plus the router."""
    q = o = c.dim * c.n_heads * c.head_dim
    k = v = c.dim * c.n_kv_heads * c.head_dim
    mlp = (3 if c.mlp == "swiglu" else 2) * c.dim * c.hidden_dim  # SwiGLU: gate, up, down; GELU: up, down
    if c.use_moe:
        mlp = mlp * (c.n_shared_experts + c.num_experts_per_tok) + c.dim * c.n_routed_experts
    return c.n_layers * (q + k + v + o + mlp) + c.dim * c.vocab_size


def train_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, as in PaLM (appendix B):

    6 * N for the weight matmuls (2 FLOPs per multiply-add forward, twice that backward), plus
    12 * n_layers * (n_heads * head_dim) * seq_len for attention (q.k^T and the weighted sum of v, each
    2 * n_heads * head_dim * seq_len FLOPs per token forward, x3 with backward), over the full sequence,
    not halved for the causal mask. The real vocabulary counts, not its padding. A forward alone is 1/3.
    Only the model's own work counts: recomputation (--grad_checkpoint), a DPO reference's forward and the
    weight gradients LoRA skips are not modelled.
    """
    return 6 * matmul_params(c) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """The device's practical peak: the fastest of repeated n x n matmuls (a peak, so not the median), timed
    for about `seconds` (3 to 10 of them, after one warm-up)."""
    # Its own generator: drawing from the global one would change the training run that measures its MFU.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    if device.type == "cpu":  # a dtype the CPU emulates (bf16 here: ~40x slower) would take minutes at n = 2048
        t0 = time.perf_counter()
        a[:256] @ b
        if (time.perf_counter() - t0) * n / 256 > 0.5:
            a, b = a[:512, :512].contiguous(), b[:512, :512].contiguous()
            n = 512
    times: list[float] = []
    start = time.perf_counter()
    for i in range(11):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > seconds:
            break
    return 2 * n ** 3 / min(times) / 1e12


@functools.cache
def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOPS, where it came from): the data-sheet table for a known GPU, else a measured matmul in
    `dtype` (CPU, MPS, other GPUs). Measured once per process."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops, f"table: {name}, dense bf16"
    dtype_name = str(dtype).removeprefix("torch.")
    return measured_matmul_tflops(device, dtype), f"measured: {dtype_name} matmul on {device.type}"


def mfu(config: ModelConfig, seq_len: int, tokens_per_s: float, device: torch.device, dtype: torch.dtype,
        n_devices: int = 1) -> float:
    """Model FLOPs utilisation of training at tokens_per_s (summed over n_devices of this kind), 0 to 1."""
    peak, _ = device_peak_tflops(device, dtype)
    return train_flops_per_token(config, seq_len) * tokens_per_s / (peak * 1e12 * n_devices)
