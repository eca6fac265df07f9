"""Where and how the model runs: device, precision, torch.compile with an eager fallback, peak memory.

Shared by the trainers, the chat demo and the benchmark, so none of them needs another's module.
"""

import platform
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

try:
    import resource  # not on Windows
except ImportError:
    resource = None


def pick_device(name: str) -> torch.device:
    """'auto' = cuda, then mps, then cpu; any other name is taken as given (cpu, cuda, cuda:1, mps), if this
    machine has it (else a one-line ValueError)."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available to this torch {torch.__version__}; use "
                             f"--device cpu (or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: Apple MPS is not available here; use --device cpu (or auto)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 (with a grad scaler); float32 on CPU and MPS.

    CPUs without bf16 instructions run bf16 autocast ~40x slower, and MPS has produced NaNs in half
    precision, so those stay in float32 unless asked. GPUs that only emulate bf16 (T4, V100) take fp16.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_compile(setting: str, device: torch.device) -> bool:
    """'auto' compiles on CUDA under Linux, where torch.compile is mature; 'true' and 'false' force it
    (configs.device_rules checked the setting)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda" and platform.system() == "Linux")


def autocast(device: torch.device, dtype: torch.dtype):
    """A new mixed-precision context for one region of code (none in float32).

    A new one each time: entering the same autocast object again while it is active leaves autocast
    switched on after both exit.
    """
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


# ----------------------------------------------------------------------------- torch.compile
def compile_failure(error: BaseException) -> str:
    """A one-line reason: the error's type and the first line of its message (compile errors run to pages)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


class EagerFallback:
    """Calls `compiled` until one of its calls fails, then `eager` for good, after a one-line message.

    torch.compile fails lazily: at the first call (no C++ compiler, MPS, Windows, an old torch), or later
    when new shapes make it recompile. The call that failed is repeated eagerly, so the caller sees no
    error; an error that the eager path raises as well is a real one and propagates.
    """

    def __init__(self, compiled, eager, what: str, log=print):
        self.compiled, self.eager, self.what, self.log = compiled, eager, what, log

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                self.log(f"torch.compile failed ({compile_failure(e)}); {self.what}")
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_or_eager(fn, enabled: bool, what: str, log=print, **compile_options):
    """fn itself, or with `enabled` fn through torch.compile, falling back to fn if a compiled call fails."""
    return EagerFallback(torch.compile(fn, **compile_options), fn, what, log) if enabled else fn


# ----------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far; None on Windows.

    Linux: VmHWM of /proc/self/status. getrusage's ru_maxrss there also counts the memory of the process that
    started this one (it keeps the peak across exec), so a probe started from a large process, such as bench.py's
    memory children, would read its parent's size. Elsewhere (macOS, BSD): ru_maxrss, in bytes on macOS.
    """
    status = Path("/proc/self/status")
    if status.exists():
        return 1024 * next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on the BSDs


def peak_memory() -> str:
    """'peak RSS N MiB' and, if CUDA was used, the peak GPU memory allocated."""
    rss = peak_rss_bytes()
    parts = [] if rss is None else [f"peak RSS {rss / 2**20:.0f} MiB"]
    if torch.cuda.is_initialized():
        parts.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return ", ".join(parts) or "peak memory: not measured on this platform"
