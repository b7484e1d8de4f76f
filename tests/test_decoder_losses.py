"""Decoder-stage terms against hand-computed values (METHOD.md section 3, "Decoder stage")."""

import math

import pytest
import torch

from ranke.algo.decoder import (
    DecoderTerms,
    DecoderWeights,
    consistency_weight,
    cosine_tau,
    decoder_consistency_loss,
    decoder_objective,
    optional_reward_backprop_loss,
    rank_gan_loss,
    rank_weights,
    reconstruction_anchor_loss,
    reward_backprop_loss,
    select_top_k,
    soft_codes,
    soft_token_consistency_loss,
)


def test_select_top_k_orders_best_first_with_stable_ties():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 1.0, 2.0, 0.0]])
    # row 0: the two 0.9 tie -> lower index (1) first, then 3, then 0.5 at index 2
    assert select_top_k(rewards, 3).tolist() == [[1, 3, 2], [0, 2, 1]]
    assert select_top_k(rewards, 1).tolist() == [[1], [0]]
    with pytest.raises(ValueError):
        select_top_k(rewards, 5)


def test_rank_weights_hand_case_mean_one():
    # softmax([0, ln 3]) = [1/4, 3/4], times k = 2 -> [0.5, 1.5]; tau = 2 on doubled rewards is the same
    top = torch.tensor([[0.0, math.log(3.0)]])
    torch.testing.assert_close(rank_weights(top, tau=1.0), torch.tensor([[0.5, 1.5]]))
    torch.testing.assert_close(rank_weights(top * 2, tau=2.0), torch.tensor([[0.5, 1.5]]))
    torch.manual_seed(0)
    weights = rank_weights(torch.randn(5, 4), tau=0.7)
    torch.testing.assert_close(weights.mean(dim=1), torch.ones(5))


def test_rank_weights_limits():
    torch.manual_seed(0)
    # K = 1 (released best-of-G): softmax over one element is 1, times 1
    assert torch.equal(rank_weights(torch.randn(4, 1), tau=1.0), torch.ones(4, 1))
    # K = G with tau -> inf: uniform
    torch.testing.assert_close(rank_weights(torch.randn(4, 8), tau=1e9), torch.ones(4, 8))
    assert torch.equal(rank_weights(torch.randn(4, 8), tau=1.0, uniform=True), torch.ones(4, 8))
    with pytest.raises(ValueError):
        rank_weights(torch.randn(2, 2), tau=0.0)


def test_cosine_tau_schedule():
    # 1000 steps, ratio 0.15 -> anneal over 150 steps
    assert cosine_tau(0, 1000) == pytest.approx(4.0)
    # step 50: progress 1/3, cos(pi/3) = 0.5 -> 1 + 3 * 0.75 = 3.25
    assert cosine_tau(50, 1000) == pytest.approx(3.25)
    assert cosine_tau(75, 1000) == pytest.approx(2.5)
    assert cosine_tau(150, 1000) == 1.0
    assert cosine_tau(999, 1000) == 1.0
    assert cosine_tau(0, 0) == 1.0


def test_rank_gan_loss_weights_per_sample_patch_means():
    # sample 0 patches all 1 -> mean 1; sample 1 patches [0, 2, 4, 6] -> mean 3
    logits = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 2.0], [4.0, 6.0]]]], requires_grad=True)
    weights = torch.tensor([0.5, 1.5])
    loss = rank_gan_loss(logits, weights)
    # -(0.5 * 1 + 1.5 * 3) / 2 = -2.5
    assert loss.item() == pytest.approx(-2.5)
    loss.backward()
    # d loss / d logit = -w / (B * patches): -0.5 / 8 and -1.5 / 8
    assert logits.grad[0].unique().tolist() == [-0.0625]
    assert logits.grad[1].unique().tolist() == [-0.1875]


def _squared_distance(x, y):
    return ((x - y) ** 2).flatten(1).mean(dim=1)


def test_consistency_loss_value_and_no_gradient_to_ema_branch():
    online = torch.zeros(2, 1, 2, 2, requires_grad=True)
    ema = torch.ones(2, 1, 2, 2, requires_grad=True)  # stands for a decode that carries a graph
    loss = decoder_consistency_loss(_squared_distance, online, ema)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert ema.grad is None
    # d/d online of mean over 2 samples of mean over 4 pixels of (online - 1)^2 = 2 * (0 - 1) / 8
    assert online.grad.unique().tolist() == [-0.25]


def test_reward_backprop_loss_and_optional_zero():
    rewards = torch.tensor([1.0, 3.0], requires_grad=True)
    weights = torch.tensor([0.5, 1.5])
    # -(0.5 * 1 + 1.5 * 3) / 2 = -2.5
    loss = reward_backprop_loss(rewards, weights)
    assert loss.item() == pytest.approx(-2.5)
    loss.backward()
    torch.testing.assert_close(rewards.grad, torch.tensor([-0.25, -0.75]))
    assert optional_reward_backprop_loss(rewards, weights).item() == pytest.approx(-2.5)
    # a non-differentiable reward, or values without a graph, contribute exactly zero
    assert optional_reward_backprop_loss(rewards, weights, differentiable=False).item() == 0.0
    assert optional_reward_backprop_loss(rewards.detach(), weights).item() == 0.0


def test_soft_codes_one_hot_equals_hard_lookup():
    torch.manual_seed(0)
    codebook = torch.randn(16, 3)
    indices = torch.stack([torch.randperm(16)[:4] for _ in range(2 * 5)]).reshape(2, 5, 4)
    logits = torch.full((2, 5, 4), float("-inf"))
    logits[..., 0] = 0.0  # all the probability on the first candidate
    assert torch.equal(soft_codes(logits, indices, codebook), codebook[indices[..., 0]])


def test_soft_codes_equal_logits_average_codes():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    # softmax([0, 0]) = [0.5, 0.5] over codes 0 and 1 -> [0.5, 0.5]
    soft = soft_codes(torch.zeros(1, 1, 2), torch.tensor([[[0, 1]]]), codebook)
    torch.testing.assert_close(soft, torch.tensor([[[0.5, 0.5]]]))


def test_soft_token_consistency_loss_stops_hard_gradient():
    soft = torch.tensor([1.0, 2.0], requires_grad=True)
    hard = torch.zeros(2, requires_grad=True)
    loss = soft_token_consistency_loss(soft, hard)
    assert loss.item() == pytest.approx(2.5)  # (1 + 4) / 2
    loss.backward()
    assert hard.grad is None
    torch.testing.assert_close(soft.grad, torch.tensor([1.0, 2.0]))  # 2 * (soft - 0) / 2


def test_consistency_weight_schedules():
    assert consistency_weight(0) == 10.0
    ramp = dict(start_step=100, end_step=200, start_value=0.0, end_value=10.0)
    assert consistency_weight(50, "linear", **ramp) == 0.0
    assert consistency_weight(150, "linear", **ramp) == pytest.approx(5.0)
    assert consistency_weight(200, "linear", **ramp) == 10.0
    assert consistency_weight(300, "linear", **ramp) == 10.0
    # cosine at t = 1/4: 10 * (1 - cos(pi / 4)) / 2 = 1.4644661
    assert consistency_weight(125, "cosine", **ramp) == pytest.approx(5 * (1 - math.cos(math.pi / 4)))
    assert consistency_weight(150, "cosine", **ramp) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="none, linear, cosine"):
        consistency_weight(0, "step")
    # an empty ramp span is refused rather than silently meaning "no ramp"
    with pytest.raises(ValueError, match="start_step < end_step"):
        consistency_weight(0, "linear", start_step=0, end_step=0)
    # from 0 to lambda_c = 5 (the Janus preset) over steps 0..40: a ramp up, never above 5
    janus = dict(start_step=0, end_step=40, start_value=0.0, end_value=5.0)
    assert [consistency_weight(step, "linear", **janus) for step in (0, 10, 20, 40, 99)] == [0.0, 1.25, 2.5, 5.0, 5.0]


def test_reconstruction_anchor_loss_composition():
    pixel, perceptual, generator = torch.tensor(0.2), torch.tensor(0.3), torch.tensor(-1.0)
    # nll 0.5, + 0.5 * 1 * 2.0 * (-1) = -0.5
    assert reconstruction_anchor_loss(pixel, perceptual, generator, 2.0).item() == pytest.approx(-0.5)
    # discriminator not started yet: only nll
    assert reconstruction_anchor_loss(pixel, perceptual, generator, 2.0, disc_factor=0.0).item() == pytest.approx(0.5)
    # perceptual weight 2: 0.2 + 0.6
    value = reconstruction_anchor_loss(pixel, perceptual, generator, 2.0, perceptual_weight=2.0, disc_factor=0.0)
    assert value.item() == pytest.approx(0.8)


def test_decoder_objective_by_hand():
    """Every term with its own weight, so dropping or reweighting any one changes the total."""
    terms = DecoderTerms(
        recon_anchor=torch.tensor(0.5), rank_gan=torch.tensor(-2.0), consistency=torch.tensor(0.3),
        reward=torch.tensor(-0.7), soft=torch.tensor(0.11),
    )  # fmt: skip
    weights = DecoderWeights(recon=2.0, rank_gan=3.0, disc_weight=0.5, disc_factor=1.0, consistency=7.0, reward=0.1, soft=0.25)
    total, parts = decoder_objective(terms, weights)
    # 2 * 0.5 = 1; 3 * 0.5 * 1 * -2 = -3; 7 * 0.3 = 2.1; 0.1 * -0.7 = -0.07; 0.25 * 0.11 = 0.0275
    expected = {"recon_anchor": 1.0, "rank_gan": -3.0, "consistency": 2.1, "reward": -0.07, "soft": 0.0275}
    assert {name: value.item() for name, value in parts.items()} == pytest.approx(expected, abs=1e-6)
    assert total.item() == pytest.approx(0.0575, abs=1e-6)
    # before the discriminator starts (disc_factor 0) the rank-GAN term contributes nothing
    total, parts = decoder_objective(terms, DecoderWeights(recon=2.0, rank_gan=3.0, disc_factor=0.0, consistency=7.0))
    assert parts["rank_gan"].item() == 0.0
    assert total.item() == pytest.approx(3.093, abs=1e-6)  # 1 + 2.1 - 0.007: reward 0.01 * -0.7, soft off (weight 0)


def test_decoder_objective_passes_gradients_to_each_term_with_its_weight():
    leaves = [torch.tensor(1.0, requires_grad=True) for _ in range(5)]
    weights = DecoderWeights(recon=2.0, rank_gan=3.0, disc_weight=0.5, disc_factor=1.0, consistency=7.0, reward=0.1, soft=0.25)
    total, _ = decoder_objective(DecoderTerms(*leaves), weights)
    total.backward()
    assert [leaf.grad.item() for leaf in leaves] == pytest.approx([2.0, 1.5, 7.0, 0.1, 0.25])


def test_selection_and_weights_work_on_the_last_axis_with_exact_errors():
    # [2, 1, 3] rewards: leading axes are batch axes; k = G is allowed
    rewards = torch.tensor([[[0.2, 0.7, 0.1]], [[0.0, -1.0, 3.0]]])
    assert select_top_k(rewards, 3).tolist() == [[[1, 0, 2]], [[2, 0, 1]]]
    with pytest.raises(ValueError, match=r"^top-k must be in \[1, 3\], got 4$"):
        select_top_k(rewards, 4)
    # 32 rollouts in two tied levels: the stable order keeps every tie in index order
    tied = torch.tensor([1.0, 0.0] * 16)
    assert select_top_k(tied, 16).tolist() == list(range(0, 32, 2))
    # softmax over the last axis: [0, ln 3] -> [0.5, 1.5] in every row of a [2, 1, 2] tensor
    top = torch.tensor([[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]])
    torch.testing.assert_close(rank_weights(top, tau=1.0), torch.tensor([[[0.5, 1.5]], [[1.5, 0.5]]]))
    assert rank_weights(top.double(), tau=1.0, uniform=True).dtype == torch.float32
    with pytest.raises(ValueError, match="^rank temperature tau must be > 0, got -1.0$"):
        rank_weights(top, tau=-1.0)


def test_losses_keep_the_dtype_of_their_values():
    """float32 rank weights do not promote float64 losses, nor do float64 weights float32 ones; a
    bf16 codebook gives bf16 soft codes; the zero reward term has the values' dtype."""
    weights64 = torch.ones(2, dtype=torch.float64)
    assert rank_gan_loss(torch.ones(2, 1, 2, 2), weights64).dtype == torch.float32
    assert reward_backprop_loss(torch.ones(2), weights64).dtype == torch.float32
    assert optional_reward_backprop_loss(torch.ones(2, dtype=torch.float64), torch.ones(2)).dtype == torch.float64
    codebook = torch.randn(4, 3, dtype=torch.bfloat16)
    assert soft_codes(torch.zeros(1, 1, 2), torch.tensor([[[0, 1]]]), codebook).dtype == torch.bfloat16


def test_consistency_ramp_defaults_and_a_nonzero_start():
    # defaults: from 0 at step 0; the span must be given for a ramp
    assert consistency_weight(1, "linear", end_step=4) == pytest.approx(2.5)
    assert consistency_weight(0, "linear", end_step=4) == 0.0
    with pytest.raises(ValueError, match="start_step < end_step"):
        consistency_weight(1, "linear")
    # from 2 to 10 over 0..4: half way is 6
    assert consistency_weight(2, "linear", start_step=0, end_step=4, start_value=2.0, end_value=10.0) == pytest.approx(6.0)


def test_reconstruction_anchor_loss_multiplies_the_generator_loss():
    # 0.2 + 0.3 + 0.5 * 1 * 2 * 4 = 4.5 (a product of every factor, not a ratio)
    value = reconstruction_anchor_loss(torch.tensor(0.2), torch.tensor(0.3), torch.tensor(4.0), 2.0)
    assert value.item() == pytest.approx(4.5)
