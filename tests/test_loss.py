"""The losses taken in chunks of positions (large logits) equal the one-piece losses, without a whole float32 copy."""

import pytest
import torch

import loss as loss_module
from loss import lm_loss, sequence_logps

B, T, V = 3, 40, 50


@pytest.mark.parametrize("name", ["lm_loss", "sequence_logps"])
def test_chunked_losses_equal_one_piece_and_keep_no_whole_float32_copy(monkeypatch, name):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen).bfloat16().requires_grad_()  # as under bf16 autocast
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) < 0.7).long()

    def run():
        """The loss, its gradient, and the float32 tensors autograd saved for the backward pass."""
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            value = lm_loss(logits, labels, mask) if name == "lm_loss" else sequence_logps(logits, labels, mask)
        value.sum().backward()
        grad, logits.grad = logits.grad, None
        return value, grad, [t for t in saved if t.dtype == torch.float32 and t.numel() >= B * T * V]

    whole, whole_grad, whole_saved = run()
    assert whole_saved  # in one piece, the float32 log-softmax of every position waits for the backward pass
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK", B * 7 * V)  # 7 positions a chunk: 6 chunks, the last of 5
    chunked, chunked_grad, chunked_saved = run()
    assert not chunked_saved
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad, whole_grad)
