"""Training losses. The language-model loss lives here; the preference losses join it in later stages."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, averaged over the tokens that count.

    logits (B, T, V) and targets (B, T) are already aligned: targets[:, t] is the token after position t
    (the dataset shifts once, the loss never shifts again). loss_mask (B, T) is 1 where the target is
    trained on; targets equal to IGNORE_INDEX never count either.
    """
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask == 0, IGNORE_INDEX)
    # Cross entropy in float32: with bf16/fp16 logits the log-sum-exp over the vocabulary loses precision.
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
