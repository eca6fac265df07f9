"""The reward-model, GRPO and PPO losses and advantages against trl's code and hand-computed values."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from loss import GRPOLoss, PPOLoss, gae, group_advantages, nanstd, reward_loss, whiten


def random_rollout(seed: int, rows: int = 6, width: int = 9):
    """Per-token log-probs now, at sampling time and under the reference, advantages and a completion mask with
    rows of different lengths (one of a single token)."""
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, width, generator=gen) * 3
    old = logps + torch.randn(rows, width, generator=gen) * 0.3  # ratios well outside 1 ± 0.2: clipping happens
    ref = logps + torch.randn(rows, width, generator=gen) * 0.5
    advantages = torch.randn(rows, generator=gen)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[0] = 1
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return logps, old, ref, advantages, mask


# ----------------------------------------------------------------------------- the reward model's loss
def trl_reward_loss(chosen, rejected, margin, center):
    """trl's RewardTrainer.compute_loss on given rewards, with a stub trainer and model."""
    from trl import RewardTrainer

    stub = SimpleNamespace(model=SimpleNamespace(training=False),
                           args=SimpleNamespace(center_rewards_coefficient=center),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
    outputs = SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, lambda **kwargs: outputs, inputs)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_trl(with_margin, center):
    gen = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(7, generator=gen) * 2, torch.randn(7, generator=gen) * 2
    margin = torch.rand(7, generator=gen) if with_margin else None
    expected = trl_reward_loss(chosen, rejected, margin, center)
    assert reward_loss(chosen, rejected, margin, center).item() == pytest.approx(expected.item(), abs=1e-6)


# ----------------------------------------------------------------------------- GRPO
def trl_grpo_loss(logps, old, ref, advantages, mask, beta, epsilon, epsilon_high, loss_type, max_completion_length):
    """trl's GRPOTrainer._compute_loss on given per-token log-probs: a stub trainer whose model 'computes' them."""
    from trl import GRPOTrainer

    metrics = defaultdict(list)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, _metrics={"train": metrics},
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x))
    rows, width = mask.shape
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref if beta else None}
    return GRPOTrainer._compute_loss(stub, None, inputs), {k: v[0] for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_and_gradient_match_trl(loss_type, beta, epsilon_high):
    logps, old, ref, advantages, mask = random_rollout(seed=0)
    ours_logps, trl_logps = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss_fn = GRPOLoss(beta, 0.2, epsilon_high, loss_type, max_completion_length=12)
    loss, metrics = loss_fn(ours_logps, old, ref if beta else None, advantages, mask)
    expected, trl_metrics = trl_grpo_loss(trl_logps, old, ref, advantages, mask, beta, 0.2, epsilon_high, loss_type, 12)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name
    assert metrics["clip_ratio/region_mean"] > 0  # the case exercises the clip


def test_grpo_loss_first_pass_and_bad_options():
    logps, _, _, advantages, mask = random_rollout(seed=2)
    logps.requires_grad_()
    loss, metrics = GRPOLoss()(logps, None, None, advantages, mask)  # one pass: the sampling policy is this one
    expected, _ = trl_grpo_loss(logps, logps.detach(), None, advantages, mask, 0.0, 0.2, None, "grpo", None)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["clip_ratio/region_mean"] == 0
    for kwargs in ({"loss_type": "dapo"}, {"loss_type": "dr_grpo"}, {"beta": -1}, {"epsilon": 0}):
        with pytest.raises(ValueError):
            GRPOLoss(**kwargs)
    with pytest.raises(ValueError, match="reference"):
        GRPOLoss(beta=0.1)(logps, None, None, advantages, mask)


def test_group_advantages_normalise_within_groups_and_survive_bad_rewards():
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   # a group with signal
                            0.5, 0.5, 0.5, 0.5,   # all equal: no signal, advantage 0
                            2.0, float("nan"), 0.0, 1.0,  # a failed reward: left out, advantage 0
                            float("nan")] * 1 + [float("nan")] * 3)  # a group with no valid reward at all
    advantages, no_signal = group_advantages(rewards, 4, "group")
    grouped = rewards.view(-1, 4)
    expected = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (trl_nanstd(grouped, dim=1)[:, None] + 1e-4)
    expected = torch.nan_to_num(expected.view(-1), nan=0.0)
    torch.testing.assert_close(advantages, expected)
    assert torch.isfinite(advantages).all()
    assert advantages[4:8].abs().max() == 0 and advantages[9] == 0 and advantages[12:].abs().max() == 0
    assert no_signal.view(-1, 4)[:, 0].tolist() == [False, True, False, True]
    batch, _ = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, torch.nan_to_num((grouped - torch.nanmean(grouped, 1, keepdim=True)).view(-1)
                                                       / (trl_nanstd(rewards) + 1e-4), nan=0.0))
    none, _ = group_advantages(rewards, 4, "none")
    assert none[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert nanstd(torch.tensor([1.0, float("nan"), 3.0])).item() == pytest.approx(2 ** 0.5)


# ----------------------------------------------------------------------------- PPO
def test_gae_by_hand():
    # One row of three tokens and one of two (then padding), γ = 0.9, λ = 0.8.
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.5, 2.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 1 - 0.6 = 0.4; δ1 = -0.1 + 0.9·0.6 - 0.4 = 0.04; δ0 = 0 + 0.9·0.4 - 0.2 = 0.16
    #        A2 = 0.4; A1 = 0.04 + 0.72·0.4 = 0.328; A0 = 0.16 + 0.72·0.328 = 0.39616
    # row 1: the padded step's reward and value are ignored: δ1 = 2 - (-1) = 3; δ0 = 0.5 + 0.9·(-1) - 1 = -1.4
    #        A1 = 3; A0 = -1.4 + 0.72·3 = 0.76
    torch.testing.assert_close(advantages, torch.tensor([[0.39616, 0.328, 0.4], [0.76, 3.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.59616, 0.728, 1.0], [1.76, 2.0, 0.0]]))


def test_ppo_loss_by_hand():
    logps, old, _, _, mask = random_rollout(seed=3)
    gen = torch.Generator().manual_seed(4)
    values, old_values = torch.randn(logps.shape, generator=gen), torch.randn(logps.shape, generator=gen)
    advantages, returns = torch.randn(logps.shape, generator=gen), torch.randn(logps.shape, generator=gen)
    loss, metrics = PPOLoss(cliprange=0.2, cliprange_value=0.3, vf_coef=0.5)(logps, old, values, old_values,
                                                                           advantages, returns, mask)
    m = mask.bool()
    ratio = torch.exp(logps - old)[m]
    a = advantages[m]
    policy = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
    v, v_old, r = values[m], old_values[m], returns[m]
    v_clipped = v_old + (v - v_old).clamp(-0.3, 0.3)
    value = 0.5 * torch.maximum((v - r) ** 2, (v_clipped - r) ** 2).mean()
    assert metrics["policy_loss"].item() == pytest.approx(policy.item(), abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(value.item(), abs=1e-6)
    assert loss.item() == pytest.approx(policy.item() + 0.5 * value.item(), abs=1e-6)
    assert 0 < metrics["value_clip_frac"] < 1 and 0 < metrics["clip_ratio/region_mean"] < 1


def test_whiten_over_the_mask_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0, abs=1e-6)
    assert kept.pow(2).mean().item() == pytest.approx(1, abs=1e-4)
    assert w[:, 2].abs().max() == 0
