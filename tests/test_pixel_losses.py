"""VA-π's pixel-alignment terms (ranke.algo.pixel) against hand-computed values."""

import math

import pytest
import torch

from ranke.algo.pixel import (
    corrupted_context,
    image_distance,
    likelihood_regulariser,
    pixel_reconstruction_reward,
    with_likelihood_regulariser,
)
from ranke.algo.vqgan import pixel_error


def test_corrupted_context_replaces_exactly_the_marked_codes():
    codes = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    replace = torch.tensor([[True, False, False, True], [False, False, True, False]])
    random_codes = torch.tensor([[7, 7, 7, 7], [8, 8, 8, 8]])
    assert corrupted_context(codes, replace, random_codes).tolist() == [[7, 1, 4, 7], [5, 9, 8, 6]]


def test_image_distance_is_one_mean_per_image():
    real = torch.zeros(2, 1, 1, 2)
    prediction = torch.tensor([[[[1.0, -3.0]]], [[[0.5, 0.5]]]])
    # l2: (1 + 9) / 2 = 5 and (0.25 + 0.25) / 2 = 0.25; l1: (1 + 3) / 2 = 2 and 0.5
    torch.testing.assert_close(image_distance(prediction, real), torch.tensor([5.0, 0.25]))
    torch.testing.assert_close(image_distance(prediction, real, "l1"), torch.tensor([2.0, 0.5]))
    # the mean runs over channels too: 3 channels of (0, 2) -> l2 (0 + 4) / 2 = 2
    three = torch.tensor([0.0, 2.0]).expand(1, 3, 1, 2)
    torch.testing.assert_close(image_distance(three, torch.zeros(1, 3, 1, 2)), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'"):
        image_distance(prediction, real, "l3")


def test_pixel_error_is_elementwise_and_signed_right():
    x, x_hat = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0])
    assert pixel_error(x, x_hat, "l1").tolist() == [3.0, 2.0]
    assert pixel_error(x, x_hat, "l2").tolist() == [9.0, 4.0]


def test_pixel_reward_is_the_negated_weighted_reconstruction_loss():
    pixel, perceptual = torch.tensor([0.5, 2.0]), torch.tensor([0.25, 1.0])
    # VA-π's weights 1, 1: -(0.5 + 0.25), -(2 + 1)
    torch.testing.assert_close(pixel_reconstruction_reward(pixel, perceptual), torch.tensor([-0.75, -3.0]))
    # weights 2 and 0.5: -(1 + 0.125), -(4 + 0.5)
    torch.testing.assert_close(
        pixel_reconstruction_reward(pixel, perceptual, pixel_weight=2.0, perceptual_weight=0.5),
        torch.tensor([-1.125, -4.5]),
    )
    # a better reconstruction earns the higher reward
    reward = pixel_reconstruction_reward(pixel, perceptual)
    assert reward[0] > reward[1]


def test_likelihood_regulariser_is_the_cross_entropy_of_the_real_codes():
    # two sequences of two tokens; probabilities of the real codes 1/2, 1/4 and 1, 1/8
    logp_real = torch.tensor([[math.log(0.5), math.log(0.25)], [0.0, math.log(0.125)]])
    # -(1/2) [ (log 1/2 + log 1/4) / 2 + (0 + log 1/8) / 2 ] = (3 log 2 / 2 + 3 log 2 / 2) / 2 = 1.5 log 2
    torch.testing.assert_close(likelihood_regulariser(logp_real), torch.tensor(1.5 * math.log(2.0)))
    # masked: the second sequence keeps only its first token (log 1 = 0): ((3/2) log 2 + 0) / 2
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(likelihood_regulariser(logp_real, mask), torch.tensor(0.75 * math.log(2.0)))
    # equals torch's cross-entropy of logits whose log-softmax gives those log-probs
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    logp = logits.log_softmax(-1).gather(-1, codes[..., None])[..., 0]
    torch.testing.assert_close(
        likelihood_regulariser(logp), torch.nn.functional.cross_entropy(logits.reshape(-1, 7), codes.reshape(-1))
    )


def test_with_likelihood_regulariser_adds_weight_times_the_term():
    logp_real = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    loss, stats = with_likelihood_regulariser(torch.tensor(2.0), {"surrogate": torch.tensor(2.0)}, logp_real, 0.1)
    # 2 + 0.1 * log 2
    torch.testing.assert_close(loss, torch.tensor(2.0 + 0.1 * math.log(2.0)))
    torch.testing.assert_close(stats["likelihood"], torch.tensor(math.log(2.0)))
    assert stats["surrogate"].item() == 2.0 and not stats["likelihood"].requires_grad
    # the gradient raises the real codes' log-probs: d loss / d logp = -0.1 / 2 per token
    loss.backward()
    torch.testing.assert_close(logp_real.grad, torch.tensor([[-0.05, -0.05]]))
    masked, masked_stats = with_likelihood_regulariser(
        torch.tensor(0.0), {}, torch.tensor([[-1.0, -3.0]]), 1.0, mask=torch.tensor([[1.0, 0.0]])
    )
    assert masked.item() == 1.0 and masked_stats["likelihood"].item() == 1.0
