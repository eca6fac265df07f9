"""Training losses: the language-model loss, the distillation divergence (generalised JSD), the preference (DPO)
losses."""

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, averaged over the tokens that count.

    logits (B, T, V) and targets (B, T) are already aligned: targets[:, t] is the token after position t
    (the dataset shifts once, the loss never shifts again). loss_mask (B, T) is 0 where the target is not
    trained on and otherwise the token's weight, 1 for a plain token: the loss is sum(weight * CE) / (number of
    trained tokens), so weights of 1 give the plain mean and a weight W > 1 adds W - 1 times more of that
    token's loss, as MiniMind weights its reasoning tags. Targets equal to IGNORE_INDEX never count either.
    """
    # Cross entropy in float32: with bf16/fp16 logits the log-sum-exp over the vocabulary loses precision.
    logits, targets = logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    weights = loss_mask.reshape(-1).float()
    targets = targets.masked_fill(weights == 0, IGNORE_INDEX)
    token_losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")  # 0 if ignored
    return (token_losses * weights).sum() / (targets != IGNORE_INDEX).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (B,) of each row's labels where loss_mask is 1 (the response tokens only).

    Labels are aligned with the logits as in lm_loss. Masked positions (prompt, padding) add exactly 0:
    their label is replaced by a valid id before the gather and their term is zeroed, not just down-weighted.
    """
    safe_labels = labels.masked_fill(loss_mask == 0, 0)
    # cross_entropy is log_softmax + gather in one kernel, without keeping a (B, T, V) log-prob tensor.
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), safe_labels, reduction="none")
    return (token_logps * loss_mask).sum(-1)


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


def masked_mean(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The mean of values over the positions where loss_mask (the same shape) is not 0 (0 if there are none)."""
    keep = loss_mask != 0
    return values.masked_fill(~keep, 0).sum() / keep.sum().clamp(min=1)


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
