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


CPU = Plan("tiny", {"pretrain": {"max_tokens": 1_200_000}, "sft": {"epochs": 1.2}, "lora": {"epochs": 1.0},
                    "dpo": {"epochs": 0.1}},
           "no GPU: the tiny model, with budgets that train all three stages in about 19 minutes on 2 cores")
PLANS = {
    "cpu": CPU,
    "mps": Plan(CPU.preset, CPU.budgets, "Apple GPU: the CPU plan (a model this small runs no faster on MPS)"),
    # Unmeasured so far (no GPU was at hand): ten times the CPU's data, in batches a GPU fills (README).
    "cuda": Plan("tiny", {"pretrain": {"max_tokens": 12_000_000, "batch_size": 32}, "sft": {"epochs": 8.0},
                          "lora": {"epochs": 8.0}, "dpo": {"epochs": 1.0}},
                 "a CUDA GPU: the tiny model with about ten times the CPU's data, in bigger batches"),
}


def plan_for(device_type: str) -> Plan:
    """The plan for a torch device type ('cpu', 'cuda', 'mps'); other types get the CPU plan."""
    return PLANS.get(device_type, CPU)
