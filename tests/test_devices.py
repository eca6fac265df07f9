"""devices.py: the precision picked for a GPU, and peak memory measured for this process alone."""

import subprocess
import sys

import torch

from devices import peak_rss_bytes, pick_dtype

CUDA = torch.device("cuda")


def test_gpus_that_only_emulate_bf16_train_in_fp16(monkeypatch):
    # T4 and V100 answer yes to is_bf16_supported() through emulation (slow), no with including_emulation=False.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype("auto", CUDA) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, 3090, ...
    assert pick_dtype("auto", CUDA) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16


def test_peak_memory_of_a_process_started_by_a_large_one_is_its_own():
    """getrusage's ru_maxrss keeps the peak across exec, so a child of a large process (bench.py's memory probes)
    would read its parent's size."""
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: resident
    code = "from devices import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_bytes() > 400 * 2**20 > child
