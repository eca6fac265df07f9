"""Low-precision weights: 4-bit NF4 (QLoRA), int8, float16 and bfloat16, for smaller models and faster CPU decoding.

- NF4 (Dettmers et al. 2023, "QLoRA"): the weight is cut into blocks of 64 values; each block is divided by its
  absolute maximum (absmax) and every value becomes the nearest of 16 levels (quantiles of a normal distribution,
  so that each level is used about equally often by normally distributed weights). Two 4-bit codes share a byte,
  the first in the high nibble, exactly as bitsandbytes stores them (tests/test_quant.py checks codes and absmax
  against bitsandbytes). Optional double quantisation stores the absmax values themselves in 8 bits (blocks of 256,
  bitsandbytes' dynamic 8-bit map, after subtracting their mean): 4.127 bits a weight instead of 4.5.
- int8: one scale per output row (absmax / 127), every weight rounded to the nearest multiple of it.
- fp16 / bf16: the weight stored in half precision.

`QuantLinear` replaces an nn.Linear: it stores the low-precision weight and computes in the dtype of its input
(the model's compute dtype), either by dequantising the weight for F.linear (training, prompts, GPUs) or, for a
few rows of input on an x86 CPU, through our own matrix-vector kernels (quant_kernels.cpp, built on first use;
without a C++ compiler the layer stays on the torch path). `quantize_model` swaps a GPT's linear layers in place.
A quantised model saves as a normal checkpoint whose safetensors file records the scheme (`save_quantized`),
and `GPT.from_pretrained(directory, quantize=...)` loads it back.
"""

import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import QUANTIZATION_KEY, save_checkpoint
from configs import QUANT_SCHEMES as SCHEMES

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- block-wise absmax quantisation
def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1]: normal quantiles, 8 positive and 7 negative, plus an exact zero.

    The positive half takes the quantiles of N(0, 1) at 8 evenly spaced probabilities from 0.9677 down to (not
    including) 0.5, the negative half at 7; dividing by the largest puts them in [-1, 1]. The offset 0.9677 is
    QLoRA's (it makes the outermost levels the centres of the outermost 1/32 of probability mass, not infinity).
    Computed as bitsandbytes does (float32 probabilities and division), so the levels equal its table exactly.
    """
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    return levels / levels.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 2016): 256 sorted values in [-1, 1].

    A value is a sign, a power of ten (10^-6 .. 10^0) and a fraction: the smaller the power, the more of the
    8 bits go to the exponent and the fewer to the fraction, so small magnitudes keep their relative precision.
    """
    values = []
    for i in range(7):  # exponent 10^(i - 6); 2^i fractions at that exponent, centres of equal steps in [0.1, 1]
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        centres = (bounds[:-1] + bounds[1:]) / 2
        values += (10 ** (i - 6) * centres).tolist() + (-(10 ** (i - 6)) * centres).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values + [0.0] * (256 - len(values))))


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one a value of x, flattened) and the absmax of each block of block_size values.

    Each value is divided by its block's absmax and coded as the nearest of the sorted levels (in [-1, 1]). The
    last block may be shorter. Scaling multiplies by 1/absmax and ties go to the lower level, as bitsandbytes does,
    so the codes are the same bit for bit.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = F.pad(flat, (0, -n % block_size)).view(-1, block_size)  # zeros change no block's absmax
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    midpoints = (levels[1:] + levels[:-1]) / 2  # a value belongs to the level whose interval holds it
    codes = torch.bucketize(scaled.view(-1)[:n], midpoints.to(flat.device)).to(torch.uint8)
    return codes, absmax


def scale_blocks(levels: torch.Tensor, absmax: torch.Tensor, block_size: int, dtype=torch.float32) -> torch.Tensor:
    """Flat levels (one a value) times the absmax of their block of block_size."""
    n = levels.numel()
    blocks = F.pad(levels, (0, -n % block_size)).view(-1, block_size)
    return (blocks * absmax[:, None]).view(-1)[:n].to(dtype)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block_size: int,
                         dtype=torch.float32) -> torch.Tensor:
    """The flat float values of quantize_blockwise's codes."""
    return scale_blocks(levels.to(codes.device)[codes.long()], absmax, block_size, dtype)


# ----------------------------------------------------------------------------- NF4
NF4_LEVELS = nf4_levels()
NF4_ZERO = 7  # the code of the level 0.0
# The two levels each byte of packed codes stands for, the high nibble's first: looking up whole bytes dequantises
# twice as fast as unpacking the nibbles first.
NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): two NF4 codes a byte (the first value in the high nibble), one float32 absmax a block."""
    codes, absmax = quantize_blockwise(weight, NF4_LEVELS, block_size)
    codes = F.pad(codes, (0, codes.numel() % 2), value=NF4_ZERO)  # an odd count ends with the code of 0.0
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape, block_size: int = 64, dtype=torch.float32,
                   pairs: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of the given shape that quantize_nf4's codes and absmax stand for (pairs: NF4_PAIRS, already on
    the codes' device)."""
    pairs = NF4_PAIRS.to(codes.device) if pairs is None else pairs
    levels = pairs.index_select(0, codes.int()).view(-1)[:math.prod(shape)]
    return scale_blocks(levels, absmax, block_size, dtype).view(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store NF4's absmax values in 8 bits, as bitsandbytes' compress_statistics does: subtract their mean
    (offset), then code them block-wise with the dynamic map. Returns (codes, absmax of the absmax, offset)."""
    offset = absmax.mean()
    codes, scale = quantize_blockwise(absmax - offset, DYNAMIC_MAP, block_size)
    return codes, scale, offset


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      block_size: int = 256) -> torch.Tensor:
    return dequantize_blockwise(codes, scale, DYNAMIC_MAP, block_size) + offset


DYNAMIC_MAP = dynamic_map()


# ----------------------------------------------------------------------------- int8
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row): weight ≈ q * scale[:, None], scale = row absmax / 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp(min=1e-38)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(dtype) * scale.to(dtype)[:, None])


# ----------------------------------------------------------------------------- the CPU kernels
_kernels = {"state": "unbuilt"}  # then "built" or "unavailable"


def cpu_kernels_ready() -> bool:
    """Whether quant_kernels.cpp is loaded: built on the first call on an x86-64 CPU with AVX2 (about a minute,
    cached by torch under ~/.cache/torch_extensions), else False for good, with one line saying why."""
    if _kernels["state"] == "unbuilt" and not torch.compiler.is_compiling():
        _kernels["state"] = "unavailable"
        if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
                "AVX2", "AVX512"):
            return False
        try:
            from torch.utils.cpp_extension import load

            print("quant: loading the CPU mat-vec kernels (built on first use: about a minute) ...", file=sys.stderr,
                  flush=True)
            load("nanollm_quant", sources=[str(Path(__file__).with_name("quant_kernels.cpp"))],
                 extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], is_python_module=False)
            _register_fakes()
            _kernels["state"] = "built"
        except Exception as e:  # no compiler, no headers: the torch path works everywhere
            print(f"quant: no CPU kernels ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]}); "
                  "dequantising instead", file=sys.stderr)
    return _kernels["state"] == "built"


def _register_fakes():
    """Shapes of the kernels' outputs, for torch.compile (which traces without running them)."""
    lib = "nanollm_quant::"

    def fake(x, w, *args):
        return x.new_empty(x.shape[0], w.shape[0])

    for name in ("int8_matvec", "half_matvec"):
        torch.library.register_fake(lib + name)(fake)
    torch.library.register_fake(lib + "nf4_matvec")(lambda x, codes, absmax, levels, n: x.new_empty(x.shape[0], n))


# ----------------------------------------------------------------------------- the layer
KERNEL_MAX_ROWS = 32  # more rows (long prompts, training batches) go through dequantise + F.linear, which is
# as fast there for int8 (measured: the kernel is 3x faster at 8 rows, 1.6x at 32, level at 64)


class DequantizedLinear(torch.autograd.Function):
    """F.linear through a QuantLinear's weight, dequantised in forward and again in backward, so that only the
    low-precision weight is kept for backward, not a float copy of it (QLoRA's memory saving; bitsandbytes'
    MatMul4Bit does the same). The weight is frozen: only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None, None


class QuantLinear(nn.Module):
    """A frozen linear layer with a low-precision weight (`qweight`, plus `scale` or `absmax` buffers); it has no
    parameters, so nothing in it trains (LoRA adapters go around it: lora.py).

    It computes in the dtype of its input: the weight is dequantised to it, or, for a few rows of float32 input
    on a CPU without gradients, multiplied by our kernels straight from the low-precision bytes.
    """

    def __init__(self, linear: nn.Linear, scheme: str, block_size: int = 64, double_quant: bool = False):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        self.scheme, self.block_size, self.double_quant = scheme, block_size, double_quant and scheme == "nf4"
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype  # what dequantising gives back (and LoRA adapters are made in)
        w = linear.weight.detach()
        if scheme in HALF_DTYPES:
            self.register_buffer("qweight", w.to(HALF_DTYPES[scheme]).contiguous())
        elif scheme == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            codes, absmax = quantize_nf4(w, block_size)
            self.register_buffer("qweight", codes)
            if self.double_quant:
                absmax_codes, absmax_scale, absmax_offset = double_quantize(absmax)
                self.register_buffer("absmax_codes", absmax_codes)
                self.register_buffer("absmax_scale", absmax_scale)
                self.register_buffer("absmax_offset", absmax_offset)
            else:
                self.register_buffer("absmax", absmax)
            self.register_buffer("levels", NF4_LEVELS.to(w.device), persistent=False)  # for the kernel
            self.register_buffer("pairs", NF4_PAIRS.to(w.device), persistent=False)  # for dequantize_nf4
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the stored tensors; model.to(dtype) and .half() leave their formats alone (the
        kernels and the scheme depend on them), as bitsandbytes' quantised parameters do."""
        device = fn(torch.empty(0, device=self.qweight.device)).device
        for name, tensor in self._buffers.items():
            if tensor is not None:
                self._buffers[name] = tensor.to(device)
        return self

    def nf4_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight (out_features, in_features) as floats of dtype (default: the dtype it was quantised from)."""
        dtype = dtype or self.dtype
        if self.scheme in HALF_DTYPES:
            return self.qweight.to(dtype)
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_nf4(self.qweight, self.nf4_absmax(), (self.out_features, self.in_features), self.block_size,
                              dtype, self.pairs)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        return (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= KERNEL_MAX_ROWS
                and not (x.requires_grad and torch.is_grad_enabled())
                and (self.scheme != "nf4" or (self.block_size == 64 and self.in_features % 64 == 0))
                and cpu_kernels_ready())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.uses_kernel(x):
            return DequantizedLinear.apply(x, self, bias)
        rows = x.reshape(-1, self.in_features).contiguous()
        ops = torch.ops.nanollm_quant
        if self.scheme == "int8":
            y = ops.int8_matvec(rows, self.qweight, self.scale)
        elif self.scheme == "nf4":
            y = ops.nf4_matvec(rows, self.qweight, self.nf4_absmax(), self.levels, self.out_features)
        else:
            y = ops.half_matvec(rows, self.qweight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def num_weights(self) -> int:
        """The weights (and biases) the layer stands for."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        extra = f", block_size={self.block_size}, double_quant={self.double_quant}" if self.scheme == "nf4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{extra}"


# ----------------------------------------------------------------------------- whole models
def quantize_model(model: nn.Module, scheme: str, head: bool | str = False, double_quant: bool = False,
                   block_size: int = 64) -> nn.Module:
    """Swap the model's nn.Linear layers for QuantLinear layers of `scheme` in place; returns the model.

    The embedding stays as it is (a lookup reads one row a token). The output head stays too unless head is
    True (quantised in `scheme`) or a scheme name (quantised in that one, e.g. INFERENCE_HEAD's); a head tied to
    the embedding is then quantised from a copy, and the embedding keeps its float weight. double_quant and
    block_size apply to nf4.
    """
    head_scheme = scheme if head is True else head
    for name in (scheme, head_scheme or scheme):
        if name not in SCHEMES:
            raise ValueError(f"unknown quantisation scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if quantization_of(model):
        raise ValueError(f"the model is already quantised ({quantization_of(model)['scheme']})")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (name == "lm_head" and not head_scheme):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer_scheme = head_scheme if name == "lm_head" else scheme
        setattr(parent, child, QuantLinear(module, layer_scheme, block_size, double_quant))
    return model


# Inference quantises the output head too (12% of minimind2-small's weights), but to 16 bits: its logits pick
# every greedy token, and on minimind2-small an int8 head alone made 2.5% of the greedy answers differ from
# float32's where a float16 head made 0.5% differ (README, Quantised weights).
INFERENCE_HEAD = {"int8": "fp16", "nf4": "fp16", "fp16": "fp16", "bf16": "bf16"}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Put plain float nn.Linear layers back in place of the QuantLinear ones (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_linear())
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's linear layers (quantised: what they store), a tied output head included: what
    decoding one token reads (for a Mixture-of-Experts model, every expert is counted)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def quantization_of(model: nn.Module) -> dict | None:
    """{"scheme", "head" (the output head's scheme, or False), "double_quant", "block_size"} of a model that
    quantize_model changed, else None."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    head = layers.get("lm_head")
    return {"scheme": first.scheme, "head": head.scheme if head else False, "double_quant": first.double_quant,
            "block_size": first.block_size}


def save_quantized(directory, model: nn.Module, tokenizer, run_info: dict) -> Path:
    """A checkpoint (checkpoint.save_checkpoint) of a quantised model, its scheme in the safetensors metadata."""
    info = quantization_of(model)
    if info is None:
        raise ValueError("save_quantized: the model is not quantised (quant.quantize_model first)")
    return save_checkpoint(directory, model, tokenizer, run_info, weights_metadata={QUANTIZATION_KEY: json.dumps(info)})


def check_scheme(recorded: dict | None, wanted: str | None, source) -> None:
    """Refuse to load a checkpoint quantised with one scheme as another (one line naming the file)."""
    if recorded and wanted and recorded["scheme"] != wanted:
        raise ValueError(f"{source}: quantised as {recorded['scheme']}, cannot load it as {wanted} "
                         f"(quantise the float checkpoint to {wanted} instead)")


def quantize_as(model: nn.Module, scheme: str | None, source, head: bool = True) -> nn.Module:
    """The model with its linear layers in `scheme` ('' or None: as it is); returns it. A float model is quantised
    (if head, its output head too, in INFERENCE_HEAD's scheme); a model loaded quantised must already be in that
    scheme (check_scheme, naming source)."""
    current = quantization_of(model)
    check_scheme(current, scheme, source)
    if scheme and current is None:
        quantize_model(model, scheme, head=head and INFERENCE_HEAD[scheme])
    return model
