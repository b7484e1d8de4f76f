"""Precision, recall, density and coverage (`ranke.eval.manifold`): a 1-D case computed by hand,
agreement with the prdc package (Naeem et al.'s release) on fixed features, and bad inputs."""

from __future__ import annotations

import numpy as np
import prdc
import pytest

from ranke.eval.manifold import kth_neighbour_distances, manifold_metrics, pairwise_distances

# 1-D points. k = 1: real radii 1, 1, 2, 1, 1, 32 (0-1, 1-0, 3-1, 7-8, 8-7, 40-8), real balls
# [-1, 1], [0, 2], [1, 5], [6, 8], [7, 9], [8, 72]; fake radii 4.5, 4.5, 6, 9, fake balls
# [-4, 5], [0.5, 9.5], [5, 17], [11, 29].
REAL = np.array([[0.0], [1.0], [3.0], [7.0], [8.0], [40.0]])
FAKE = np.array([[0.5], [5.0], [11.0], [20.0]])


def test_pairwise_distances_are_euclidean():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 0.0], [6.0, 8.0], [3.0, 0.0]])
    np.testing.assert_allclose(pairwise_distances(a, b), [[0.0, 10.0, 3.0], [5.0, 5.0, 4.0]], atol=1e-12)
    assert (pairwise_distances(a, a).diagonal() == 0).all()  # round-off below 0 is clipped, not a NaN


def test_kth_neighbour_distances_by_hand():
    np.testing.assert_array_equal(kth_neighbour_distances(REAL, 1), [1, 1, 2, 1, 1, 32])
    # k = 2: the second nearest other point, e.g. 1 -> 2 (0 at 1, 3 at 2), 40 -> 33 (8 at 32, 7 at 33)
    np.testing.assert_array_equal(kth_neighbour_distances(REAL, 2), [3, 2, 3, 4, 5, 33])


def test_one_dimensional_case_by_hand():
    """k = 1. Fakes in real balls: 0.5 in 2 ([-1, 1], [0, 2]), 5 in 1 ([1, 5], on its edge), 11 and
    20 in 1 each (the outlier 40's [8, 72]) -> precision 4/4, density 5/4. Reals in fake balls: all
    but 40 -> recall 5/6. Real balls holding a fake: those of 0, 1, 3 (5 on the edge) and 40 -> 4/6."""
    metrics = manifold_metrics(REAL, FAKE, nearest_k=1)
    assert metrics == pytest.approx({"precision": 1.0, "recall": 5 / 6, "density": 5 / 4, "coverage": 4 / 6}, abs=1e-12)


def test_one_dimensional_case_without_the_outlier():
    """Without 40 (and its large ball) 11 and 20 leave the real manifold: precision 2/4, density 3/4;
    recall 5/5; coverage 3/5 (the balls of 7 and 8 hold no fake)."""
    metrics = manifold_metrics(REAL[:5], FAKE, nearest_k=1)
    assert metrics == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 3 / 4, "coverage": 3 / 5}, abs=1e-12)


def _features(seed: int, n: int, shift: float, scale: float, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(shift, scale, size=(n, d))


@pytest.mark.parametrize("nearest_k", [3, 5])
@pytest.mark.parametrize("shift, scale, n_fake", [(0.0, 1.0, 300), (0.4, 0.7, 250), (0.0, 1.5, 120)])
def test_matches_the_prdc_package(nearest_k, shift, scale, n_fake):
    real, fake = _features(0, 300, 0.0, 1.0), _features(1, n_fake, shift, scale)
    expected = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=nearest_k)
    assert manifold_metrics(real, fake, nearest_k) == pytest.approx(expected, abs=1e-12)


def test_one_distribution_scores_near_one_and_a_narrow_one_loses_diversity():
    real = _features(0, 400, 0.0, 1.0, d=8)
    same = manifold_metrics(real, _features(1, 400, 0.0, 1.0, d=8))
    assert all(0.9 < same[key] < 1.1 for key in ("precision", "recall", "density", "coverage")), same
    narrow = manifold_metrics(real, _features(1, 400, 0.0, 0.3, d=8))  # samples only near the mode
    assert narrow["precision"] == 1.0 and narrow["density"] > 2.5  # on the manifold, in its dense part
    assert narrow["recall"] < 0.1 and narrow["coverage"] < 0.6  # many real images have no sample near them


def test_bad_inputs_are_one_clear_error():
    real, fake = _features(0, 6, 0.0, 1.0), _features(1, 5, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"at least nearest_k \+ 1 = 6 fake features .* got 5"):
        manifold_metrics(real, fake, nearest_k=5)
    with pytest.raises(ValueError, match=r"at least nearest_k \+ 1 = 7 real features .* got 6"):
        manifold_metrics(real, real, nearest_k=6)
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        manifold_metrics(real, fake[:, :3], nearest_k=2)
    with pytest.raises(ValueError, match="nearest_k must be positive"):
        manifold_metrics(real, fake, nearest_k=0)
