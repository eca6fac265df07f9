"""Training losses: the language-model loss and the preference (DPO) losses.

Both take the log-softmax of the logits in float32 (with bf16/fp16 logits the log-sum-exp over the vocabulary
loses precision). That float32 copy is the largest tensor of a step at a large vocabulary (16 x 1024 positions
x 50k tokens = 3.3 GB, and as much again for its log-softmax and its gradient), so when the logits are larger than
LOGITS_CHUNK values it is made one chunk of positions at a time, each chunk recomputed in the backward pass
(activation checkpointing): the float32 tensors then never exist for the whole sequence.
"""

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


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, averaged over the tokens that count.

    logits (B, T, V) and targets (B, T) are already aligned: targets[:, t] is the token after position t
    (the dataset shifts once, the loss never shifts again). loss_mask (B, T) is 1 where the target is
    trained on; targets equal to IGNORE_INDEX never count either.
    """
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask == 0, IGNORE_INDEX)
    if logits.numel() <= LOGITS_CHUNK:  # one piece: the mean directly
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    return chunk_sum(_cross_entropy_sum, logits, targets) / (targets != IGNORE_INDEX).sum()


def _masked_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    # cross_entropy is log_softmax + gather in one kernel, without keeping a (B, T, V) log-prob tensor.
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (token_logps * loss_mask).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (B,) of each row's labels where loss_mask is 1 (the response tokens only).

    Labels are aligned with the logits as in lm_loss. Masked positions (prompt, padding) add exactly 0:
    their label is replaced by a valid id before the gather and their term is zeroed, not just down-weighted.
    """
    return chunk_sum(_masked_logps, logits, labels.masked_fill(loss_mask == 0, 0), loss_mask)


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
