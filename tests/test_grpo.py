"""GRPO policy-stage losses against hand-computed values (METHOD.md section 3, "Policy stage")."""

import math

import pytest
import torch

from ranke.algo.grpo import (
    clipped_surrogate_loss,
    group_advantages,
    grpo_policy_loss,
    kl_anchor,
    kl_anchor_k3,
    kl_anchor_squared,
    sequence_token_mean,
)


def test_group_advantages_sample_std_hand_case():
    # group [1, 2, 3, 4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # sample std sqrt(5 / 3) = 1.2909944 -> A = [-1.5, -0.5, 0.5, 1.5] / 1.2909944
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3)
    torch.testing.assert_close(advantages, expected)
    # population std sqrt(5 / 4) = 1.1180340
    population = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4, unbiased=False)
    torch.testing.assert_close(population, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 4))


def test_group_advantages_groups_are_independent_and_equal_group_is_zero():
    # group 0 all equal -> std 0 -> zeros (no NaN);
    # group 1 [0, 0, 0, 4]: mean 1, sample var (1 + 1 + 1 + 9) / 3 = 4, std 2 -> [-0.5, -0.5, -0.5, 1.5]
    rewards = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0]])
    advantages = group_advantages(rewards, group_size=4)
    assert advantages.shape == (2, 4)
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]]))
    # the flat [B*G] layout gives the same numbers, flat
    torch.testing.assert_close(group_advantages(rewards.flatten(), group_size=4), advantages.flatten())


def test_group_advantages_tiny_std_is_zero_and_outlier_is_clamped():
    # std of [1, 1 + 1e-6] is ~7e-7 < 1e-4 -> zeros
    assert torch.equal(group_advantages(torch.tensor([1.0, 1.0 + 1e-6]), group_size=2), torch.zeros(2))
    # 99 zeros and one 1: mean 0.01, sample var (99 * 0.01^2 + 0.99^2) / 99 = 0.99 / 99 = 0.01, std 0.1
    # -> outlier 0.99 / 0.1 = 9.9 clamped to 5, the others -0.01 / 0.1 = -0.1
    rewards = torch.zeros(100, dtype=torch.float64)
    rewards[7] = 1.0
    advantages = group_advantages(rewards, group_size=100)
    assert advantages[7].item() == pytest.approx(5.0)
    assert advantages[0].item() == pytest.approx(-0.1)


def test_group_advantages_single_rollout_groups_and_bad_sizes():
    assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), group_size=1), torch.zeros(2))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), group_size=4)


def test_sequence_token_mean_averages_within_then_across_sequences():
    values = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # sequence means [2, 5] -> 3.5 (a global token mean would give (1 + 3 + 5) / 3 = 3)
    assert sequence_token_mean(values, mask).item() == pytest.approx(3.5)
    assert sequence_token_mean(values).item() == pytest.approx((2.0 + 52.5) / 2)
    # an all-masked sequence contributes 0: (2 + 0) / 2
    assert sequence_token_mean(values, torch.tensor([[1, 1], [0, 0]])).item() == pytest.approx(1.0)


def test_surrogate_with_ratio_one_is_minus_mean_advantage():
    torch.manual_seed(0)
    logp = torch.randn(2, 3)
    advantages = torch.tensor([1.0, -2.0])
    loss, stats = clipped_surrogate_loss(logp.clone().requires_grad_(), logp, advantages)
    # rho = 1 everywhere -> -mean([1, -2]) = 0.5, no token clipped
    assert loss.item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["clip_fraction"].item() == 0.0


def test_surrogate_clipping_hand_case_and_gradient():
    # three one-token sequences, eps = 0.2:
    #   A = +1, rho = 1.5: min(1.5, 1.2) = 1.2    (clip cuts the gradient)
    #   A = -1, rho = 1.5: min(-1.5, -1.2) = -1.5 (unclipped term chosen, gradient flows)
    #   A = -1, rho = 0.5: min(-0.5, -0.8) = -0.8 (clip cuts the gradient)
    # loss = -(1.2 - 1.5 - 0.8) / 3 = 1.1 / 3; clip fraction 2 / 3; ratio mean (1.5 + 1.5 + 0.5) / 3
    logp_old = torch.zeros(3, 1)
    logp_new = torch.log(torch.tensor([[1.5], [1.5], [0.5]])).requires_grad_()
    loss, stats = clipped_surrogate_loss(logp_new, logp_old, torch.tensor([1.0, -1.0, -1.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(1.1 / 3)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(3.5 / 3)
    loss.backward()
    # d loss / d logp_new for the free token: -(A * rho) / 3 = 1.5 / 3
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0.0], [0.5], [0.0]]))


def test_kl_anchors_hand_cases():
    logp_new = torch.tensor([[0.0, -1.0]])
    logp_ref = torch.tensor([[0.0, 1.0]])
    # squared: 0.5 * (0^2 + (-2)^2) / 2 tokens = 1.0
    assert kl_anchor_squared(logp_new, logp_ref).item() == pytest.approx(1.0)
    # k3 with d = ref - new = [0, 2]: (0 + e^2 - 2 - 1) / 2 = (7.3890561 - 3) / 2
    assert kl_anchor_k3(logp_new, logp_ref).item() == pytest.approx((math.exp(2) - 3) / 2)
    assert kl_anchor("squared") is kl_anchor_squared and kl_anchor("k3") is kl_anchor_k3
    with pytest.raises(ValueError, match="squared, k3"):
        kl_anchor("k2")


def test_kl_anchors_vanish_with_zero_gradient_when_new_equals_ref():
    torch.manual_seed(1)
    logp = torch.randn(3, 4)
    for anchor in (kl_anchor_squared, kl_anchor_k3):
        logp_new = logp.clone().requires_grad_()
        value = anchor(logp_new, logp)
        value.backward()
        assert value.item() == 0.0
        assert torch.equal(logp_new.grad, torch.zeros_like(logp))


def test_grpo_policy_loss_composes_surrogate_and_anchor():
    logp = torch.tensor([[0.0, -1.0]])
    logp_ref = torch.tensor([[0.0, 1.0]])
    advantages = torch.tensor([2.0])
    # surrogate -2 (rho = 1), squared anchor 1.0 -> -2 + 0.05 * 1.0
    loss, stats = grpo_policy_loss(logp.clone().requires_grad_(), logp, logp_ref, advantages, beta=0.05)
    assert loss.item() == pytest.approx(-1.95)
    assert stats["surrogate"].item() == pytest.approx(-2.0)
    assert stats["kl"].item() == pytest.approx(1.0)
    assert set(stats) == {"surrogate", "kl", "clip_fraction", "ratio_mean"}
    # k3 anchor (e^2 - 3) / 2
    loss_k3, _ = grpo_policy_loss(logp, logp, logp_ref, advantages, beta=0.05, kl_kind="k3")
    assert loss_k3.item() == pytest.approx(-2.0 + 0.05 * (math.exp(2) - 3) / 2)


def test_grpo_policy_loss_without_reference():
    logp = torch.zeros(1, 2)
    loss, stats = grpo_policy_loss(logp, logp, None, torch.tensor([1.0]), beta=0.0)
    assert loss.item() == pytest.approx(-1.0)
    assert "kl" not in stats
    with pytest.raises(ValueError):
        grpo_policy_loss(logp, logp, None, torch.tensor([1.0]), beta=0.05)


def test_group_advantages_boundaries_by_hand():
    # a group of two: mean 0.5, sample std sqrt(0.5) -> A = -+0.5 / sqrt(0.5) = -+sqrt(0.5)
    pair = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(group_advantages(pair, 2), torch.tensor([-1.0, 1.0]) * math.sqrt(0.5))
    # a std exactly at std_eps still counts as spread
    at_eps = group_advantages(pair, 2, std_eps=float(pair.std()))
    torch.testing.assert_close(at_eps, torch.tensor([-1.0, 1.0]) * math.sqrt(0.5))
    # [0, 0, 0, -1]: mean -0.25, sample std 0.5 -> [0.5, 0.5, 0.5, -1.5], clamped below at -1
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 0.0, 0.0, -1.0]), 4, clamp=1.0),
                               torch.tensor([0.5, 0.5, 0.5, -1.0]))  # fmt: skip
    # float32 advantages whatever the rewards' dtype, single rollouts included
    assert group_advantages(torch.ones(4, dtype=torch.float64), 1).dtype == torch.float32
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_advantages(torch.ones(4), 0)
    with pytest.raises(ValueError, match="4 rewards do not split into groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_clip_fraction_counts_only_tokens_whose_gradient_is_cut():
    """The clip cuts rho > 1 + eps with A > 0 and rho < 1 - eps with A < 0, strictly: a ratio on
    the bound or a zero advantage is not cut. With eps = 0 and ratios exactly 1 nothing is cut."""
    logp = torch.zeros(4, 1)
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.5])
    _, stats = clipped_surrogate_loss(logp, logp, advantages, clip_eps=0.0)
    assert stats["clip_fraction"].item() == 0.0
    # ratios e (above 1 + eps) and 1/e (below 1 - eps), eps = 0.2, for each advantage sign and zero
    logp_new = torch.tensor([[1.0], [1.0], [-1.0], [-1.0], [1.0], [-1.0]])
    advantages = torch.tensor([1.0, -1.0, -1.0, 0.5, 0.0, 0.0])
    _, stats = clipped_surrogate_loss(logp_new, torch.zeros(6, 1), advantages)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 6)  # rows 0 and 2 only


def test_default_clip_and_kl_coefficient():
    """clip_eps 0.2 and beta 0.05 when not given: a ratio of e with A = 1 is clipped to 1.2, and the
    squared anchor of a log-ratio of 1 is 0.5."""
    logp_new = torch.ones(1, 1)
    zero = torch.zeros(1, 1)
    surrogate, _ = clipped_surrogate_loss(logp_new, zero, torch.ones(1))
    assert surrogate.item() == pytest.approx(-1.2)
    loss, _ = grpo_policy_loss(logp_new, zero, zero, torch.ones(1))
    assert loss.item() == pytest.approx(-1.2 + 0.05 * 0.5)


def test_masked_policy_loss_and_statistics_by_hand():
    """The mask reaches every term and statistic. Two sequences of two tokens, the second token of
    the first masked out; log-ratios new - old [[ln 2, 0], [0, ln 0.5]], A = [1, -1], eps = 0.2,
    reference = old."""
    logp_old = torch.zeros(2, 2)
    logp_new = torch.tensor([[math.log(2.0), 0.0], [0.0, math.log(0.5)]])
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, stats = grpo_policy_loss(logp_new, logp_old, logp_old, advantages, beta=0.1, mask=mask)
    # min(rho A, clip(rho) A): sequence 0: min(2, 1.2) = 1.2; sequence 1: (min(-1, -1), min(-0.5, -0.8)) -> -0.9
    surrogate = -(1.2 + -0.9) / 2
    # rho cut: sequence 0 token 0 (2 > 1.2, A > 0), sequence 1 token 1 (0.5 < 0.8, A < 0): (1 + 0.5) / 2
    assert stats["clip_fraction"].item() == pytest.approx(0.75)
    assert stats["ratio_mean"].item() == pytest.approx((2.0 + (1.0 + 0.5) / 2) / 2)
    squared = (0.5 * math.log(2.0) ** 2 + (0.0 + 0.5 * math.log(0.5) ** 2) / 2) / 2
    assert stats["surrogate"].item() == pytest.approx(surrogate)
    assert stats["kl"].item() == pytest.approx(squared)
    assert loss.item() == pytest.approx(surrogate + 0.1 * squared)
    # k3 on d = old - new: exp(d) - d - 1 -> sequence 0: 0.5 + ln 2 - 1; sequence 1: (0, 2 + ln 0.5 - 1) / 2
    _, stats = grpo_policy_loss(logp_new, logp_old, logp_old, advantages, kl_kind="k3", mask=mask)
    k3 = ((0.5 + math.log(2.0) - 1.0) + (2.0 + math.log(0.5) - 1.0) / 2) / 2
    assert stats["kl"].item() == pytest.approx(k3)


def test_missing_reference_with_anchor_is_named():
    logp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="^grpo_policy_loss needs logp_ref when beta != 0$"):
        grpo_policy_loss(logp, logp, None, torch.ones(1), beta=0.1)
