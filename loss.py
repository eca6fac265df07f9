"""Training losses: the language-model loss, the distillation divergence (generalised JSD), the preference losses
(DPO, the reward model's), and the reinforcement-learning losses with their advantage estimators (GRPO, PPO with
GAE).

The language-model and DPO losses take the log-softmax of the logits in float32 (with bf16/fp16 logits the
log-sum-exp over the vocabulary loses precision). That float32 copy is the largest tensor of a step at a large
vocabulary (16 x 1024 positions x 50k tokens = 3.3 GB, and as much again for its log-softmax and its gradient), so
when the logits are larger than LOGITS_CHUNK values it is made one chunk of positions at a time, each chunk
recomputed in the backward pass (activation checkpointing): the float32 tensors then never exist for the whole
sequence. GRPO and PPO take the logits of the completion tokens only (GPT.forward's logits_to_keep), and
distillation those of the trained tokens only, in one piece.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOGITS_CHUNK = 2**25  # values of a float32 chunk (128 MiB); smaller logits are taken in one piece


def chunk_sum(fn, logits: torch.Tensor, *aligned: torch.Tensor) -> torch.Tensor:
    """fn(logits, *aligned) summed over chunks of positions (dim 1) of at most LOGITS_CHUNK logits each.

    fn must be a sum over positions. Under autograd each chunk is checkpointed: its float32 intermediates are
    freed after its forward and recomputed for its backward, so they exist one chunk at a time.
    """
    batch, length, vocab = logits.shape
    step = max(1, LOGITS_CHUNK // (batch * vocab))
    if step >= length:
        return fn(logits, *aligned)
    total = 0
    # split, not slices: one backward node gathers the chunks' gradients (a slice's would be a whole-size tensor)
    for pieces in zip(*(t.split(step, dim=1) for t in (logits, *aligned))):
        total = total + (checkpoint(fn, *pieces, use_reentrant=False) if logits.requires_grad else fn(*pieces))
    return total


def _weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
    return (losses * weights.reshape(-1)).sum()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, averaged over the tokens that count.

    logits (B, T, V) and targets (B, T) are already aligned: targets[:, t] is the token after position t
    (the dataset shifts once, the loss never shifts again). loss_mask (B, T) is 0 where the target is not
    trained on and otherwise the token's weight, 1 for a plain token: the loss is sum(weight * CE) / (number of
    trained tokens), so weights of 1 give the plain mean and a weight W > 1 adds W - 1 times more of that
    token's loss, as MiniMind weights its reasoning tags. Targets equal to IGNORE_INDEX never count either.
    """
    weights = (targets != IGNORE_INDEX).float() if loss_mask is None else loss_mask.float()
    targets = targets.masked_fill(weights == 0, IGNORE_INDEX)
    return chunk_sum(_weighted_cross_entropy_sum, logits, targets, weights) / (targets != IGNORE_INDEX).sum()


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability (B, T) of each label under the logits (B, T, V), aligned as in lm_loss, in float32."""
    # cross_entropy is log_softmax + gather in one kernel, without keeping a (B, T, V) log-prob tensor.
    return -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")


def _masked_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (token_logps(logits, labels) * loss_mask).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (B,) of each row's labels where loss_mask is 1 (the response tokens only).

    Labels are aligned with the logits as in lm_loss. Masked positions (prompt, padding) add exactly 0:
    their label is replaced by a valid id before the gather and their term is zeroed, not just down-weighted.
    """
    return chunk_sum(_masked_logps, logits, labels.masked_fill(loss_mask == 0, 0), loss_mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask (its shape) is not 0, over dim or over everything; 0 where there
    are none. A masked position counts as nothing, whatever x holds there (NaN and inf too)."""
    keep = mask != 0
    x = x.masked_fill(~keep, 0)
    if dim is None:
        return x.sum() / keep.sum().clamp(min=1)
    return x.sum(dim) / keep.sum(dim).clamp(min=1)


# ----------------------------------------------------------------------------- distillation
def token_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) at each position (...,).

    student_logps and teacher_logps are log-probabilities over the last dimension. With the mixture
    M = beta * teacher + (1 - beta) * student:  JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M).
    JSD_beta vanishes at beta 0 and 1, so there (as in GKD and trl) beta = 0 means the forward KL(teacher ||
    student) and beta = 1 the reverse KL(student || teacher). The mixture is formed in log space (logsumexp),
    so that tiny probabilities do not underflow.
    """
    def kl(p_logps, q_logps):  # KL(p || q) = sum_v p_v (log p_v - log q_v)
        return (p_logps.exp() * (p_logps - q_logps)).sum(-1)

    if beta == 0:
        return kl(teacher_logps, student_logps)
    if beta == 1:
        return kl(student_logps, teacher_logps)
    mixture_logps = torch.logsumexp(torch.stack([teacher_logps + math.log(beta),
                                                 student_logps + math.log(1 - beta)]), dim=0)
    return beta * kl(teacher_logps, mixture_logps) + (1 - beta) * kl(student_logps, mixture_logps)


def check_beta(beta: float) -> None:
    if not 0 <= beta <= 1:
        raise ValueError(f"the divergence's beta must be in [0, 1] (0 forward KL, 1 reverse KL), not {beta}")


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalised JSD (token_jsd) between the student's and the teacher's next-token distributions at
    `temperature`, averaged over the positions where loss_mask is not 0. Logits (B, T, V) with loss_mask (B, T),
    or any other leading shape, e.g. (N, V) with (N,) for the trained positions alone.

    Equals trl's GKDTrainer.generalized_jsd_loss with labels -100 where the mask is 0 (reduction "batchmean").
    """
    check_beta(beta)
    student_logps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logps = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return masked_mean(token_jsd(student_logps, teacher_logps, beta), loss_mask)


def topk_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (..., K + 1) at `temperature` of the K tokens `ids` (..., K) and, last, of all other
    tokens together: the distribution seen through a teacher's top K (a distribution over K + 1 outcomes)."""
    logps = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids)
    # log(1 - sum of the K probabilities), kept above 0 so that a teacher-sure token does not give log 0.
    rest = (-torch.expm1(torch.logsumexp(logps, -1, keepdim=True))).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.cat([logps, rest.log()], dim=-1)


def topk_jsd(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor,
             loss_mask: torch.Tensor, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """generalized_jsd against a teacher stored as its top K: teacher_ids (..., K) and teacher_logps (..., K + 1)
    from topk_logps of the teacher. Both distributions are compared over the same K + 1 outcomes
    (the K tokens and 'any other'), which is exact for that coarser view and equals generalized_jsd when K
    covers the vocabulary."""
    check_beta(beta)
    teacher_logps = teacher_logps.float().log_softmax(-1)  # stored in float16: sum to 1 again
    return masked_mean(token_jsd(topk_logps(student_logits, teacher_ids, temperature), teacher_logps, beta),
                       loss_mask)


# ----------------------------------------------------------------------------- preferences
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DPOLoss:
    """Direct preference optimisation losses on summed response log-probabilities (as in trl's DPOTrainer).

    With the log-ratios c = policy_chosen - reference_chosen and r = policy_rejected - reference_rejected:
      sigmoid  -(1 - ε)·log σ(β(c - r)) - ε·log σ(-β(c - r))   DPO; ε = label_smoothing > 0 is conservative DPO
      ipo      (c/n_c - r/n_r - 1/(2β))²                          IPO on per-token log-ratios (n = response tokens)
      hinge    max(0, 1 - β(c - r))                               SLiC
    The implicit rewards β·c and β·r are returned for logging (detached).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, not {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), not {label_smoothing}")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only, not to {loss_type!r}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def __call__(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                 chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss averaged over the pairs, chosen rewards (B,), rejected rewards (B,)).

        chosen_lengths / rejected_lengths (response token counts) are needed by ipo only.
        """
        chosen = policy_chosen_logps.float() - reference_chosen_logps.float()
        rejected = policy_rejected_logps.float() - reference_rejected_logps.float()
        if self.loss_type == "sigmoid":
            logits = self.beta * (chosen - rejected)
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * (chosen - rejected))
        else:  # ipo: log-ratios per response token, so the squared target does not scale with response length
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths")
            delta = chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        return losses.mean(), self.beta * chosen.detach(), self.beta * rejected.detach()


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, as trl's RewardTrainer: -log σ(r_chosen - r_rejected - margin),
    averaged over the pairs. margin (B,) asks for a larger gap where a pair's preference is stronger; with
    center_rewards_coefficient c, c · mean((r_chosen + r_rejected)²) is added, which keeps the rewards near 0
    (Eisenstein et al., 2023) since the loss itself only sees their differences."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards.float() + rejected_rewards.float()) ** 2).mean()
    return loss


# ----------------------------------------------------------------------------- reinforcement learning
def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss: -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A), with the
    importance ratio ρ = exp(log_ratio) of the policy being trained to the one that sampled. Also returns ρ."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                   epsilon_high: float) -> dict[str, torch.Tensor]:
    """Share of the completion tokens whose ratio the clip holds back (the low side where A < 0, the high side
    where A > 0): how far the policy has moved from the one that sampled."""
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"clip_ratio/low_mean": masked_mean(low.float(), mask),
            "clip_ratio/high_mean": masked_mean(high.float(), mask),
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask)}


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


class GRPOLoss:
    """Group relative policy optimisation (DeepSeekMath; trl's GRPOTrainer), on per-token log-probabilities.

    Per completion token: the clipped surrogate with ε (ε_high on the upper side, DAPO's clip-higher), plus
    β times the k3 estimate of the KL to the reference, exp(ref - logp) - (ref - logp) - 1. Normalised as
      grpo     mean over each completion's tokens, then over the completions
      bnpo     mean over all completion tokens of the batch
      dr_grpo  sum over the tokens / (completions × max_completion_length) (Dr. GRPO: no length bias)
    Returns (loss, metrics): the clip fractions, and the KL when β > 0.
    """

    def __init__(self, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "grpo", max_completion_length: int | None = None):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}")
        if loss_type == "dr_grpo" and not max_completion_length:
            raise ValueError("the dr_grpo loss needs max_completion_length")
        if beta < 0 or epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"beta must be >= 0 and epsilon, epsilon_high > 0 (got {beta}, {epsilon}, {epsilon_high})")
        self.beta, self.loss_type, self.max_completion_length = beta, loss_type, max_completion_length
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    def __call__(self, per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                 ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor,
                 completion_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """per_token_logps (B, T) of the policy being trained; old_per_token_logps (B, T) of the policy that
        sampled (None: the same, one optimisation pass per generation); ref_per_token_logps (B, T), None when
        β = 0; advantages (B,); completion_mask (B, T), 1 on the completion tokens."""
        mask = completion_mask.to(per_token_logps.dtype)
        old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        advantages = advantages.unsqueeze(1)
        per_token_loss, ratio = clipped_surrogate(per_token_logps - old, advantages, self.epsilon_low,
                                                  self.epsilon_high)
        metrics = clip_fractions(ratio.detach(), advantages, mask, self.epsilon_low, self.epsilon_high)
        if self.beta:
            if ref_per_token_logps is None:
                raise ValueError("beta > 0 needs the reference model's log-probabilities")
            delta = ref_per_token_logps - per_token_logps
            per_token_kl = torch.exp(delta) - delta - 1
            per_token_loss = per_token_loss + self.beta * per_token_kl
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        if self.loss_type == "grpo":
            loss = masked_mean(per_token_loss, mask, dim=-1).mean()
        elif self.loss_type == "bnpo":
            loss = masked_mean(per_token_loss, mask)
        else:
            loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * self.max_completion_length)
        return loss, metrics


SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages: each reward minus the mean of its group (the group_size completions of one prompt, which
    are consecutive), divided by the group's standard deviation ('group'), the batch's ('batch') or by nothing
    ('none'), + 1e-4. NaN rewards (a reward function that failed) are left out of the means and deviations and get
    advantage 0. Also returns, per completion, whether its group has no signal to learn from: all its rewards equal
    (or fewer than two valid ones)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = (grouped - mean).view(-1)
    if scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    elif scale_rewards == "group":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.nan_to_num(std, nan=0.0) < 1e-8


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation (with Bessel's correction) of the values that are not NaN; NaN with fewer than two."""
    keep = ~torch.isnan(x)
    count = keep.sum() if dim is None else keep.sum(dim)
    mean = torch.nanmean(x) if dim is None else torch.nanmean(x, dim=dim, keepdim=True)
    squares = torch.where(keep, (x - mean) ** 2, 0.0)
    total = squares.sum() if dim is None else squares.sum(dim)
    return torch.sqrt(total / (count - 1).clamp(min=1)).masked_fill(count < 2, float("nan"))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over each row's tokens: (advantages, returns).

    rewards and values (B, T) are per completion token; mask (B, T) is 1 on the tokens, which come first in
    each row (padding after them). Past the last token the value is 0 (the episode ends), so
    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γ·λ·A_{t+1}; returns = A + V, the critic's target.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x shifted and scaled to mean 0 and variance 1 over the positions where mask is 1 (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


class PPOLoss:
    """PPO's loss for a policy with a value head (InstructGPT; trl's PPOTrainer), per completion token.

    policy: the clipped surrogate with ε = cliprange on the (whitened GAE) advantages, averaged over the tokens;
    value: 0.5 · max((V - R)², (V_clipped - R)²) averaged over the tokens, where V_clipped is the new value kept
    within cliprange_value of the value at sampling time and R the GAE returns; loss = policy + vf_coef · value.
    """

    def __init__(self, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1):
        if cliprange <= 0 or cliprange_value <= 0 or vf_coef < 0:
            raise ValueError(f"cliprange and cliprange_value must be > 0 and vf_coef >= 0 "
                             f"(got {cliprange}, {cliprange_value}, {vf_coef})")
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef

    def __call__(self, logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
                 advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All (B, T) over the completion tokens: log-probabilities and values now and at sampling time, the
        advantages and returns, the mask. Returns (loss, metrics)."""
        mask = mask.to(logps.dtype)
        per_token_loss, ratio = clipped_surrogate(logps - old_logps, advantages, self.cliprange, self.cliprange)
        policy_loss = masked_mean(per_token_loss, mask)
        clipped_values = old_values + torch.clamp(values - old_values, -self.cliprange_value, self.cliprange_value)
        value_losses = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
        value_loss = 0.5 * masked_mean(value_losses, mask)
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                   "value_clip_frac": masked_mean(((values - old_values).abs() > self.cliprange_value).float(), mask),
                   **clip_fractions(ratio.detach(), advantages, mask, self.cliprange, self.cliprange)}
        return policy_loss + self.vf_coef * value_loss, metrics
