"""Latent Covariate Shift measures: histograms, smoothed KL, per-position KL, entropy, round-trip
token agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ranke.eval.shift import (
    code_histogram,
    per_position_kl,
    roundtrip_agreement,
    token_agreement,
    token_entropy_bits,
    token_kl,
)
from ranke.models.vq import VectorQuantizer


def test_code_histogram_counts_every_entry_and_checks_range():
    codes = torch.tensor([[0, 2, 2], [3, 2, 0]])
    np.testing.assert_array_equal(code_histogram(codes, 5), [2, 0, 3, 1, 0])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        code_histogram(codes, 3)


def test_kl_of_identical_histograms_is_zero():
    counts = np.array([5, 0, 3, 9])
    assert token_kl(counts, counts) == 0.0


def test_hand_computed_three_code_example():
    # Add-one smoothing: p = (3, 2, 2) / 7, q = (2, 2, 3) / 7
    # KL = 3/7 ln(3/2) + 2/7 ln 1 + 2/7 ln(2/3) = ln(1.5) / 7.
    assert token_kl([2, 1, 1], [1, 1, 2]) == pytest.approx(math.log(1.5) / 7, rel=1e-12)
    # Tiny smoothing recovers the plain KL of (1/2, 1/4, 1/4) || (1/4, 1/4, 1/2) = ln(2) / 4.
    assert token_kl([2, 1, 1], [1, 1, 2], smoothing=1e-9) == pytest.approx(math.log(2) / 4, rel=1e-6)


def test_kl_is_finite_with_codes_the_reference_never_uses():
    policy, real = np.array([4, 4, 0, 0]), np.array([8, 0, 0, 0])
    # p = (5, 5, 1, 1) / 12, q = (9, 1, 1, 1) / 12; the code unused by both adds 0.
    expected = 5 / 12 * math.log(5 / 9) + 5 / 12 * math.log(5)
    assert token_kl(policy, real) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="smoothing"):
        token_kl(policy, real, smoothing=0.0)


def test_per_position_kl_averages_positions_and_sees_misplaced_codes():
    real = np.array([[0, 1], [0, 1], [1, 0], [1, 0]])
    shuffled = real[:, ::-1].copy()  # same codes per row: marginal histogram unchanged
    assert token_kl(code_histogram(shuffled, 2), code_histogram(real, 2)) == 0.0
    assert per_position_kl(shuffled, real, 2) == 0.0  # each position still sees codes 0 and 1 twice
    policy = np.array([[0, 1], [0, 1], [0, 1], [0, 1]])
    # Position 0: policy counts (4, 0) vs real (2, 2) -> p = (5, 1) / 6, q = (3, 3) / 6; position 1 mirrored.
    per_position = 5 / 6 * math.log(5 / 3) + 1 / 6 * math.log(1 / 3)
    assert per_position_kl(policy, real, 2) == pytest.approx(per_position, rel=1e-12)
    assert token_kl(code_histogram(policy, 2), code_histogram(real, 2)) == 0.0


def test_entropy_in_bits():
    assert token_entropy_bits([7, 7, 7, 7]) == pytest.approx(2.0)
    assert token_entropy_bits([3, 0, 0, 0, 0]) == 0.0
    assert token_entropy_bits([2, 1, 1, 0]) == pytest.approx(1.5)


def test_token_agreement_counts_equal_positions_per_row():
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 2]])
    recoded = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [1, 1]]])  # [N, h, w]: rows compared in row-major order
    assert torch.equal(token_agreement(codes, recoded), torch.tensor([0.75, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same rows .* and tokens per row"):
        token_agreement(codes, recoded[:, :1])
    with pytest.raises(ValueError, match="same rows .* and tokens per row"):
        token_agreement(codes, recoded[:1])
    with pytest.raises(ValueError, match="at least one"):
        token_agreement(codes[:0], recoded[:0])


def _one_dimensional_tokenizer():
    """A tokenizer whose encode and decode are known: one-channel 2 x 2 "images" whose pixels are
    code values, quantised by ranke's VectorQuantizer with the codebook 0, 1, 2, 3 (1-d codes)."""
    quantizer = VectorQuantizer(codebook_size=4, embed_dim=1, beta=0.25, l2_norm=False).eval()
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.arange(4.0)[:, None])

    def encode(images: torch.Tensor) -> torch.Tensor:  # [N, 1, 2, 2] -> codes [N, 2, 2]
        return quantizer(images)[2]

    def decode(codes: torch.Tensor, flaw: dict[int, float] | None = None) -> torch.Tensor:  # [N, 4] -> [N, 1, 2, 2]
        values = quantizer.codebook()[codes][..., 0]  # each code rendered as its own value
        for code, rendered in (flaw or {}).items():
            values = torch.where(codes == code, torch.tensor(rendered), values)
        return values.reshape(len(codes), 1, 2, 2)

    return encode, decode


def test_roundtrip_agreement_by_hand():
    """A faithful decoder gives every token back; one that renders code 3 as 1.4 (which the frozen
    quantizer reads as 1) loses each 3: row [0, 1, 2, 3] keeps 3 of 4, row [3, 3, 0, 2] 2 of 4;
    rendering 0 as 0.4 (still nearest 0) loses nothing."""
    encode, decode = _one_dimensional_tokenizer()
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 2]])
    with torch.no_grad():
        assert torch.equal(roundtrip_agreement(codes, decode, encode), torch.tensor([1.0, 1.0], dtype=torch.float64))
        flawed = roundtrip_agreement(codes, lambda c: decode(c, {3: 1.4, 0: 0.4}), encode)
    assert torch.equal(flawed, torch.tensor([0.75, 0.5], dtype=torch.float64))
