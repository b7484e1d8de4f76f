"""Frechet distance: agreement with an independent implementation, hand-computed cases, image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ranke.eval.fid import (
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    load_image_folder,
)
from ranke.runtime import UserError


def _reference_frechet(mu1, s1, mu2, s2) -> float:
    """Independent float64 formula: Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def _features(seed: int, n: int = 200, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_statistics_are_mean_and_unbiased_covariance():
    features = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])  # divided by N - 1 = 2


def test_matches_independent_eigenvalue_formula():
    f1, f2 = _features(0), _features(1)
    expected = _reference_frechet(*feature_statistics(f1), *feature_statistics(f2))
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_matches_clean_fid():
    cleanfid = pytest.importorskip("cleanfid.fid", reason="clean-fid (needs torchvision) is not importable")
    stats1, stats2 = feature_statistics(_features(0)), feature_statistics(_features(1))
    expected = cleanfid.frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-6)


def test_same_set_is_zero_and_mean_shift_adds_its_squared_norm():
    features = _features(2)
    scale = np.trace(feature_statistics(features)[1])
    assert abs(frechet_distance_from_features(features, features)) < 1e-8 * scale
    shift = np.linspace(-1.0, 2.0, features.shape[1])
    shifted = frechet_distance_from_features(features, features + shift)
    assert shifted == pytest.approx(float(shift @ shift), rel=1e-6)


def test_hand_computed_gaussians():
    # 1-D: N(0, 1) vs N(3, 4): 9 + 1 + 4 - 2 * sqrt(4) = 10.
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == pytest.approx(10.0)
    # Diagonal 2-D: per axis (sqrt(a) - sqrt(b))^2 -> (1 - 3)^2 + (2 - 2)^2 = 4.
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 4.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(4.0)


def test_fewer_samples_than_dimensions_stays_finite():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(6, 12)), rng.normal(size=(6, 12)) + 0.5
    value = frechet_distance_from_features(f1, f2)
    expected = _reference_frechet(*feature_statistics(f1), *feature_statistics(f2))
    assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-3)


def test_mismatched_statistics_are_rejected():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _save(path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def test_load_image_folder_sorts_crops_and_resizes(tmp_path):
    wide = np.zeros((4, 6, 3), np.uint8)
    wide[:, 0] = 255  # the outer columns are cropped away
    wide[:, 5] = 255
    wide[:, 1:5] = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    _save(tmp_path / "b.png", wide)
    _save(tmp_path / "a.png", np.full((8, 8, 3), 7, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path, size=4)
    assert images.shape == (2, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], 7)  # a.png first; a constant image stays constant
    np.testing.assert_array_equal(images[1], wide[:, 1:5])  # center crop, no resize needed
    expected = np.asarray(Image.fromarray(wide[:, 1:5]).resize((3, 3), Image.BICUBIC))
    np.testing.assert_array_equal(load_image_folder(tmp_path, size=3)[1], expected)


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="no PNG/JPEG"):
        load_image_folder(tmp_path)
    _save(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "b.jpg")
    with pytest.raises(UserError, match="different sizes"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=4).shape == (2, 4, 4, 3)


def test_extract_features_batches_channels_first():
    images = np.random.default_rng(4).integers(0, 256, size=(5, 3, 2, 3), dtype=np.uint8)

    def channel_means(batch: torch.Tensor) -> np.ndarray:
        assert batch.shape[1] == 3 and batch.dtype == torch.uint8
        return batch.double().mean(dim=(2, 3)).numpy()

    features = extract_features(channel_means, images, batch_size=2)
    np.testing.assert_allclose(features, images.astype(np.float64).mean(axis=(1, 2)))
