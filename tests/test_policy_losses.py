"""Dr. GRPO, DAPO and GSPO (ranke.algo.policy_losses) against hand-computed values, and their
choice by name."""

import math

import pytest
import torch

from ranke.algo.grpo import clipped_terms, group_advantages, grpo_policy_loss
from ranke.algo.policy_losses import (
    POLICY_LOSSES,
    batch_token_mean,
    dapo_policy_loss,
    dr_grpo_policy_loss,
    fixed_length_mean,
    group_centred_advantages,
    gspo_policy_loss,
    policy_advantages,
    policy_loss,
    sequence_ratio,
    spread_groups,
)


def test_group_centred_advantages_by_hand():
    # [1, 2, 3, 4]: mean 2.5 -> [-1.5, -0.5, 0.5, 1.5], not divided by the std
    torch.testing.assert_close(
        group_centred_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4), torch.tensor([-1.5, -0.5, 0.5, 1.5])
    )
    # groups independent, [B, G] layout kept: [5, 5] -> 0; [0, 4]: mean 2 -> [-2, 2]
    rewards = torch.tensor([[5.0, 5.0], [0.0, 4.0]], dtype=torch.float64)
    centred = group_centred_advantages(rewards, 2)
    assert centred.dtype == torch.float32 and centred.shape == (2, 2)
    torch.testing.assert_close(centred, torch.tensor([[0.0, 0.0], [-2.0, 2.0]]))
    # no clamp: an outlier of 100 in [0, 0, 0, 100] keeps 100 - 25 = 75
    assert group_centred_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), 4)[3].item() == 75.0
    with pytest.raises(ValueError, match="4 rewards do not split into groups of 3"):
        group_centred_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_centred_advantages(torch.ones(4), 0)


def test_spread_groups_by_hand():
    # [5, 5, 5, 5]: std 0 -> dropped; [0, 0, 0, 4]: sample std 2 -> kept
    assert spread_groups(torch.tensor([5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 4.0]), 4).tolist() == [False, True]
    # [1, 1 + 1e-6]: std ~7e-7 < 1e-4 -> dropped; [0, 1]: std sqrt(0.5) -> kept, also with std_eps on it
    pairs = torch.tensor([[1.0, 1.0 + 1e-6], [0.0, 1.0]])
    assert spread_groups(pairs, 2).tolist() == [False, True]
    assert spread_groups(pairs, 2, std_eps=float(pairs[1].std())).tolist() == [False, True]
    assert spread_groups(pairs, 2, std_eps=1.0).tolist() == [False, False]


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Dr. GRPO: token sums [4, 5] / L = 2 -> [2, 2.5] -> 2.25 (GRPO's per-sequence mean: (2 + 5) / 2 = 3.5)
    assert fixed_length_mean(values, mask).item() == pytest.approx(2.25)
    # no mask: sums [4, 105] / 2 -> mean 27.25
    assert fixed_length_mean(values).item() == pytest.approx(27.25)
    # DAPO: (1 + 3 + 5) / 3 valid tokens = 3; no mask: 109 / 4 = 27.25; no valid token: 0
    assert batch_token_mean(values, mask).item() == pytest.approx(3.0)
    assert batch_token_mean(values).item() == pytest.approx(27.25)
    assert batch_token_mean(values, torch.zeros(2, 2)).item() == 0.0
    # a longer token dimension divides by its length: [[1, 3, 0, 0]] -> 4 / 4
    assert fixed_length_mean(torch.tensor([[1.0, 3.0, 0.0, 0.0]])).item() == pytest.approx(1.0)


def test_aggregation_differs_only_with_uneven_masks():
    """rho = 1, A = [1, -2], the second sequence with one valid token of three:
    GRPO   -(1 + -2) / 2                   = 0.5
    DrGRPO -(3 / 3 + -2 / 3) / 2           = -1/6
    DAPO   -(1 + 1 + 1 - 2) / 4 tokens     = -0.25"""
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    grpo, _ = grpo_policy_loss(logp, logp, None, advantages, beta=0.0, mask=mask)
    dr_grpo, _ = dr_grpo_policy_loss(logp, logp, None, advantages, mask=mask)
    dapo, stats = dapo_policy_loss(logp, logp, None, advantages, mask=mask)
    assert grpo.item() == pytest.approx(0.5)
    assert dr_grpo.item() == pytest.approx(-1 / 6)
    assert dapo.item() == pytest.approx(-0.25)
    assert stats["ratio_mean"].item() == pytest.approx(1.0) and stats["clip_fraction"].item() == 0.0
    # without a mask (fixed-length image tokens) all three are -mean(A) = 0.5
    for loss in (grpo_policy_loss, dr_grpo_policy_loss, dapo_policy_loss):
        assert loss(logp, logp, None, advantages, beta=0.0)[0].item() == pytest.approx(0.5)


def test_clipped_terms_asymmetric_by_hand():
    # eps_low 0.2, eps_high 0.28:
    #   A = +1, rho = 1.25: min(1.25, 1.25) = 1.25, not cut (the symmetric 0.2 clip would cut it at 1.2)
    #   A = +1, rho = 1.5 : min(1.5, 1.28)  = 1.28, cut
    #   A = -1, rho = 0.7 : min(-0.7, -0.8) = -0.8, cut
    #   A = -1, rho = 1.5 : min(-1.5, -1.28) = -1.5, not cut
    ratio = torch.tensor([1.25, 1.5, 0.7, 1.5])
    advantage = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms, cut = clipped_terms(ratio, advantage, 0.2, 0.28)
    torch.testing.assert_close(terms, torch.tensor([1.25, 1.28, -0.8, -1.5]))
    assert cut.tolist() == [False, True, True, False]
    symmetric, cut = clipped_terms(ratio, advantage, 0.2)
    torch.testing.assert_close(symmetric, torch.tensor([1.2, 1.2, -0.8, -1.5]))
    assert cut.tolist() == [True, True, True, False]
    # on a bound nothing is cut
    assert not clipped_terms(torch.tensor([1.28, 0.8]), torch.tensor([1.0, -1.0]), 0.2, 0.28)[1].any()


def test_dapo_clip_higher_and_gradient_by_hand():
    # the three one-token sequences of the case above (rho 1.25, 1.5, 0.7; A 1, 1, -1), defaults 0.2 / 0.28:
    # loss = -(1.25 + 1.28 - 0.8) / 3 tokens = -1.73 / 3; clip fraction 2 / 3; ratio mean 3.45 / 3
    logp_new = torch.log(torch.tensor([[1.25], [1.5], [0.7]])).requires_grad_()
    loss, stats = dapo_policy_loss(logp_new, torch.zeros(3, 1), None, torch.tensor([1.0, 1.0, -1.0]))
    assert loss.item() == pytest.approx(-1.73 / 3)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(3.45 / 3)
    assert stats["surrogate"].item() == pytest.approx(-1.73 / 3) and "kl" not in stats
    loss.backward()
    # only the free token has a gradient: -(A * rho) / 3 = -1.25 / 3
    torch.testing.assert_close(logp_new.grad, torch.tensor([[-1.25 / 3], [0.0], [0.0]]))


def test_sequence_ratio_by_hand():
    # log-ratios [[ln 2, 0], [2, -2]] -> s = [exp(ln 2 / 2), exp(0)] = [sqrt 2, 1]
    logp_new = torch.tensor([[math.log(2.0), 0.0], [2.0, -2.0]])
    torch.testing.assert_close(sequence_ratio(logp_new, torch.zeros(2, 2)), torch.tensor([math.sqrt(2.0), 1.0]))
    # masking the second token of the first sequence: s_0 = exp(ln 2 / 1) = 2
    mask = torch.tensor([[1, 0], [1, 1]])
    torch.testing.assert_close(sequence_ratio(logp_new, torch.zeros(2, 2), mask), torch.tensor([2.0, 1.0]))


def test_gspo_sequence_clip_and_gradient_by_hand():
    # log-ratios [[ln 2, 0], [2, -2]], A = [1, -1], eps 0.2 / 0.28:
    #   s_0 = sqrt 2 = 1.41421 > 1.28 with A > 0: min(1.41421, 1.28) = 1.28, cut
    #   s_1 = 1 (token ratios e^2 and e^-2 would both be clipped token by token): -1, free
    # loss = -(1.28 - 1) / 2 = -0.14; clip fraction 1/2; ratio mean (sqrt 2 + 1) / 2
    logp_new = torch.tensor([[math.log(2.0), 0.0], [2.0, -2.0]]).requires_grad_()
    loss, stats = gspo_policy_loss(logp_new, torch.zeros(2, 2), None, torch.tensor([1.0, -1.0]), 0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-0.14)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx((math.sqrt(2.0) + 1.0) / 2)
    loss.backward()
    # d/d logp_1t of -(s_1 A_1) / 2 = -(A_1 s_1 / 2 tokens) / 2 sequences = 0.25 per token; sequence 0 is cut
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0.0, 0.0], [0.25, 0.25]]))


def test_gspo_paper_range_by_default():
    # s = e^0.001 = 1.0010005 > 1 + 4e-4 with A = 1 -> 1.0004; s = e^-0.001 = 0.9990005 < 1 - 3e-4 with A = -1 -> -0.9997
    logp_new = torch.tensor([[0.001, 0.001], [-0.001, -0.001]])
    loss, stats = gspo_policy_loss(logp_new, torch.zeros(2, 2), None, torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(-(1.0004 - 0.9997) / 2, abs=1e-7)  # float32 cancellation
    assert stats["clip_fraction"].item() == 1.0
    # log-ratios +-3.5e-4: s = 1.00035 inside the upper bound 1.0004 (A = 1, not cut);
    # s = 0.99965 below the lower bound 0.9997 (A = -1, cut) -> 1/2 (symmetric 3e-4: 1; symmetric 4e-4: 0)
    logp_new = torch.tensor([[3.5e-4], [-3.5e-4]])
    _, stats = gspo_policy_loss(logp_new, torch.zeros(2, 1), None, torch.tensor([1.0, -1.0]))
    assert stats["clip_fraction"].item() == 0.5


def test_new_losses_add_the_anchor_and_name_a_missing_reference():
    logp = torch.tensor([[0.0, -1.0]])
    logp_ref = torch.tensor([[0.0, 1.0]])
    # surrogate -2 (ratio 1, A = 2), squared anchor 0.5 * (0 + 4) / 2 = 1 -> -2 + 0.1 * 1
    for loss_fn, name in ((dr_grpo_policy_loss, "dr_grpo"), (dapo_policy_loss, "dapo"), (gspo_policy_loss, "gspo")):
        loss, stats = loss_fn(logp, logp, logp_ref, torch.tensor([2.0]), beta=0.1)
        assert loss.item() == pytest.approx(-1.9)
        assert stats["kl"].item() == pytest.approx(1.0) and stats["surrogate"].item() == pytest.approx(-2.0)
        assert set(stats) == {"surrogate", "kl", "clip_fraction", "ratio_mean"}
        # k3 on d = ref - new = [0, 2]: (e^2 - 3) / 2
        loss, _ = loss_fn(logp, logp, logp_ref, torch.tensor([2.0]), beta=0.1, kl_kind="k3")
        assert loss.item() == pytest.approx(-2.0 + 0.1 * (math.exp(2) - 3) / 2)
        # the papers train without the anchor: beta 0 by default, the reference ignored
        assert loss_fn(logp, logp, logp_ref, torch.tensor([2.0]))[0].item() == pytest.approx(-2.0)
        with pytest.raises(ValueError, match=f"^{name}_policy_loss needs logp_ref when beta != 0$"):
            loss_fn(logp, logp, None, torch.tensor([2.0]), beta=0.1)


def test_dr_grpo_clip_is_symmetric_unless_asked():
    # rho = 1.25, A = 1: clipped to 1.2 by default, kept with clip_eps_high 0.28; one token of L = 1
    logp_new = torch.log(torch.tensor([[1.25]]))
    assert dr_grpo_policy_loss(logp_new, torch.zeros(1, 1), None, torch.ones(1))[0].item() == pytest.approx(-1.2)
    loss, _ = dr_grpo_policy_loss(logp_new, torch.zeros(1, 1), None, torch.ones(1), clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25)
    loss, _ = grpo_policy_loss(logp_new, torch.zeros(1, 1), None, torch.ones(1), beta=0.0, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25)


def test_policy_loss_dispatches_by_name():
    torch.manual_seed(0)
    logp_new, logp_old, logp_ref = torch.randn(3, 4, 5).unbind(0)
    advantages = torch.randn(4)
    assert list(POLICY_LOSSES) == ["grpo", "dr_grpo", "dapo", "gspo"]
    for name, loss_fn in POLICY_LOSSES.items():
        dispatched, stats = policy_loss(name, logp_new, logp_old, logp_ref, advantages, 0.1, 0.3, 0.05, "k3")
        direct, direct_stats = loss_fn(logp_new, logp_old, logp_ref, advantages, 0.1, 0.05, "k3", None, 0.3)
        assert torch.equal(dispatched, direct) and stats.keys() == direct_stats.keys()
    # grpo with equal bounds is the release's loss, bit for bit
    grpo, _ = policy_loss("grpo", logp_new, logp_old, logp_ref, advantages, 0.2, 0.2, 0.05)
    assert torch.equal(grpo, grpo_policy_loss(logp_new, logp_old, logp_ref, advantages)[0])
    with pytest.raises(ValueError, match="^unknown policy loss 'ppo'; choose one of grpo, dr_grpo, dapo, gspo$"):
        policy_loss("ppo", logp_new, logp_old, logp_ref, advantages, 0.2, 0.2, 0.05)


def test_policy_advantages_by_name():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(policy_advantages("dr_grpo", rewards, 4), torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    for name in ("grpo", "dapo", "gspo"):
        assert torch.equal(policy_advantages(name, rewards, 4), group_advantages(rewards, 4))
    with pytest.raises(ValueError, match="unknown policy loss 'x'"):
        policy_advantages("x", rewards, 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_every_loss_and_its_anchor_ignore_masked_tokens(loss_type):
    """A masked token's log-probs (here far off) change neither the surrogate nor the KL anchor:
    the loss with a mask equals the loss on the unmasked tokens alone, and differs from no mask."""
    logp_old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logp_new = logp_old + torch.tensor([[0.1, -0.05, 3.0], [0.02, 0.03, -4.0]])
    logp_ref = logp_old - 0.1
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    settings = {"clip_eps": 0.2, "clip_eps_high": 0.28, "beta": 0.5}
    masked, masked_stats = policy_loss(loss_type, logp_new, logp_old, logp_ref, advantages, mask=mask, **settings)
    kept = policy_loss(loss_type, logp_new[:, :2], logp_old[:, :2], logp_ref[:, :2], advantages, **settings)[0]
    if loss_type == "dr_grpo":  # its constant L is the token dimension: 3 with the mask, 2 for the kept tokens alone
        surrogate = policy_loss(loss_type, logp_new[:, :2], logp_old[:, :2], None, advantages, **{**settings, "beta": 0.0})[0]
        kept = surrogate * 2 / 3 + settings["beta"] * masked_stats["kl"]
    unmasked = policy_loss(loss_type, logp_new, logp_old, logp_ref, advantages, **settings)[0]
    assert torch.allclose(masked, kept, atol=1e-6)
    assert not torch.allclose(masked, unmasked, atol=1e-3)
    anchor_alone = policy_loss(loss_type, logp_new[:, :2], logp_old[:, :2], logp_ref[:, :2], advantages, **settings)[1]["kl"]
    assert torch.allclose(masked_stats["kl"], anchor_alone, atol=1e-6)  # the anchor saw the mask too
