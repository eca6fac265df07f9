"""Mixture-of-Experts feed-forward in the style of DeepSeek-MoE and MiniMind-MoE (`--use_moe`).

Each token goes to its top-k of `n_routed_experts` SwiGLU experts, picked by a softmax router, and
always through the `n_shared_experts`. The output is the router-weighted sum of the experts it visited.
Dispatch groups the (token, expert) assignments by expert so each expert runs once, on all of its tokens.

While training, each layer also computes the load-balancing loss that keeps the router from sending
every token to the same few experts; the Trainer collects it with `collect_moe_stats` and adds
`aux_loss_alpha` times it to the stage's loss.
"""

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn

from configs import ModelConfig


def load_balancing_loss(scores: torch.Tensor, experts: torch.Tensor, groups: int) -> torch.Tensor:
    """DeepSeek-MoE's expert-balance loss, sum_e f_e * P_e averaged over groups; 1.0 when balanced.

    scores (N, E): router probabilities; experts (N, k): the chosen experts. The N tokens are split into
    `groups` equal groups (one per sequence, or 1 for the whole batch) and the loss is computed in each.
    f_e: share of the group's assignments that went to expert e, times E (1 for every e when uniform);
    P_e: mean router probability of e. Gradients flow through P_e only (f_e counts discrete choices).
    """
    n_experts = scores.shape[-1]
    scores = scores.view(groups, -1, n_experts)
    experts = experts.view(groups, -1)
    counts = torch.zeros(groups, n_experts, device=scores.device).scatter_add_(
        1, experts, torch.ones(experts.shape, device=scores.device))
    f = counts * n_experts / experts.shape[1]  # experts.shape[1]: the group's tokens times k
    return (f * scores.mean(1)).sum(-1).mean()


class MoEStats:
    """What the MoE layers record during one forward pass under `collect_moe_stats`."""

    def __init__(self):
        self.aux_losses: list[torch.Tensor] = []  # one per layer (and per forward pass)
        self.expert_counts: list[torch.Tensor] = []  # (E,) assignments per expert, one per layer

    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss over the recorded layers."""
        return torch.stack(self.aux_losses).mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        """The aux loss and each expert's share of the routed tokens, averaged over layers, plus the
        largest share any expert took in any layer (near 1 means the router collapsed onto it)."""
        counts = torch.stack(self.expert_counts).float()  # (layers, E)
        shares = counts / counts.sum(-1, keepdim=True)
        return {"moe_aux_loss": self.aux_loss().detach(), "moe_max_share": shares.max(),
                **{f"moe_share_e{e}": s for e, s in enumerate(shares.mean(0))}}


@contextmanager
def collect_moe_stats(model: nn.Module):
    """Within the block, the MoE layers of model record into the yielded MoEStats while training.

    Only what runs under this context counts: a second model (DPO's frozen reference) or evaluation
    adds nothing, and outside it nothing is kept (no autograd graph outlives its step).
    """
    stats = MoEStats()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        layer.stats = stats
    try:
        yield stats
    finally:
        for layer in layers:
            layer.stats = None


class MoE(nn.Module):
    """Routed top-k experts plus always-on shared experts; a drop-in replacement for the model's MLP.

    `expert` builds one expert from the config: model.py passes its SwiGLU `MLP` class.
    """

    def __init__(self, config: ModelConfig, expert: Callable[[ModelConfig], nn.Module]):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.dim, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(expert(config) for _ in range(config.n_routed_experts))
        self.shared_experts = nn.ModuleList(expert(config) for _ in range(config.n_shared_experts))
        self.stats: MoEStats | None = None  # set by collect_moe_stats

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E), and the top-k weights and expert ids (N, k) of tokens x (N, D)."""
        scores = self.router(x).float().softmax(dim=-1)  # float32: the softmax of a bf16 logit is coarse
        weights, experts = scores.topk(self.config.num_experts_per_tok, dim=-1)
        if self.config.norm_topk_prob and self.config.num_experts_per_tok > 1:  # k = 1 would make every weight 1
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights, experts

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) for every token n, one batched call per expert.

        With capacity_factor > 0 an expert takes at most ceil(capacity_factor * N * k / E) assignments,
        first come (in token order) first served; the rest are dropped (the residual carries the token).
        """
        n_tokens, k = experts.shape
        n_experts = len(self.experts)
        flat = experts.flatten()  # assignment a belongs to token a // k
        order = flat.argsort(stable=True)  # assignments grouped by expert, token order kept inside a group
        counts = torch.bincount(flat, minlength=n_experts)
        if self.config.capacity_factor > 0:
            capacity = math.ceil(self.config.capacity_factor * n_tokens * k / n_experts)
            group_start = counts.cumsum(0) - counts
            place_in_queue = torch.arange(len(order), device=x.device) - group_start[flat[order]]
            order = order[place_in_queue < capacity]
            counts = counts.clamp(max=capacity)
        tokens = order // k
        chunks = x[tokens].split(counts.tolist())
        # Every expert runs, even on zero tokens, so that all parameters take part in backward (DDP needs it).
        out = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        out = out * weights.flatten()[order, None]
        return x.new_zeros(x.shape).index_add(0, tokens, out.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        scores, weights, experts = self.route(x)
        out = self.dispatch(x, weights, experts)
        for shared in self.shared_experts:
            out = out + shared(x)
        # The aux loss is computed whenever a backward pass may follow (the same ops in a recomputed
        # gradient-checkpointing forward), and zero work at inference.
        if self.training and torch.is_grad_enabled():
            aux = load_balancing_loss(scores, experts, B if self.config.seq_aux else 1)
            if self.stats is not None:
                self.stats.aux_losses.append(aux)
                self.stats.expert_counts.append(torch.bincount(experts.flatten(), minlength=len(self.experts)))
        return out.view(B, T, D)

    def num_inactive_params(self) -> int:
        """Parameters of the routed experts a token does not visit."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.config.n_routed_experts - self.config.num_experts_per_tok) * per_expert
