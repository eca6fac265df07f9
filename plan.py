"""What a run with no arguments trains on this device: the model preset and each stage's budget.

Budgets are amounts of data, not step counts: pretraining in tokens, fine-tuning in passes over the chats or
preference pairs. The steps follow from the batch, so a plan means the same training on any machine, and a
larger batch (or more GPUs under torchrun) takes fewer, bigger steps. A flag given on the command line wins:
--preset, --max_steps, --max_tokens or --epochs.

The CPU plan is the measured default (README, "What the default run gives"): pretraining, SFT and DPO of the
tiny model in about a quarter of an hour on 2 cores. A GPU gets ten times the data in less time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """A device's default run: the model preset, each stage's budget (config fields), and why."""

    preset: str
    budgets: dict[str, dict]  # stage -> {"max_tokens": N} or {"epochs": E}
    why: str


CPU = Plan("tiny", {"pretrain": {"max_tokens": 1_600_000}, "sft": {"epochs": 1.0}, "lora": {"epochs": 1.0},
                    "dpo": {"epochs": 0.1}},
           "no GPU: the tiny model and a budget that trains all three stages in about 15 minutes on 2 cores")
PLANS = {
    "cpu": CPU,
    "mps": Plan(CPU.preset, CPU.budgets, "Apple GPU: the CPU plan (MPS runs a model this small no faster)"),
    "cuda": Plan("tiny", {"pretrain": {"max_tokens": 16_000_000}, "sft": {"epochs": 4.0}, "lora": {"epochs": 4.0},
                          "dpo": {"epochs": 0.5}},
                 "a CUDA GPU: the tiny model with ten times the CPU's data (minutes on a 3090)"),
}


def plan_for(device_type: str) -> Plan:
    """The plan for a torch device type ('cpu', 'cuda', 'mps'); other types get the CPU plan."""
    return PLANS.get(device_type, CPU)
