"""Frechet distance and KID: agreement with clean-fid and an independent formula, hand-computed cases,
image folders, and the Inception extractor against clean-fid's own feature pipeline."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ranke.eval.fid import (
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    FeatureMoments,
    folder_distance,
    folder_statistics,
    kernel_distance,
    load_image_folder,
)
from ranke.eval.manifold import manifold_metrics
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


def _clean_fid_function(name: str):
    """clean-fid's own function `name` of cleanfid/fid.py (`frechet_distance`, `kernel_distance`).

    `cleanfid.fid` imports torchvision at module level (for extractors we do not use), and no
    torchvision on the package registry loads beside the CPU-only torch. Then the function is
    compiled from the installed cleanfid/fid.py itself, unchanged, in a namespace holding the two
    module-level names they use (`np`, `linalg`): the code under comparison is clean-fid's.
    """
    try:
        import cleanfid.fid

        return getattr(cleanfid.fid, name)
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
    from scipy import linalg

    source = Path(importlib.util.find_spec("cleanfid").origin).with_name("fid.py").read_text()
    tree = ast.parse(source)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "cleanfid/fid.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes sqrtm's deprecated `disp`
def test_matches_clean_fid():
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    clean_fid_distance = _clean_fid_function("frechet_distance")
    stats1, stats2 = feature_statistics(_features(0)), feature_statistics(_features(1))
    expected = clean_fid_distance(stats1[0], stats1[1], stats2[0], stats2[1])
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


def test_streamed_moments_equal_the_statistics_of_all_features():
    rng = np.random.default_rng(8)
    features = rng.normal(50.0, 0.1, size=(301, 6)) + rng.normal(size=6)  # a large mean: the shifted sums matter
    moments = FeatureMoments()
    for start in range(0, len(features), 64):
        moments.add(features[start : start + 64])
    mean, covariance = moments.statistics()
    expected_mean, expected_covariance = feature_statistics(features)
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=1e-9, atol=1e-15)


def test_folder_statistics_stream_the_same_features_as_the_whole_folder(tmp_path):
    rng = np.random.default_rng(9)
    for index in range(7):
        _save(tmp_path / f"{index:05d}.png", rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))

    def channel_means(batch: torch.Tensor) -> np.ndarray:
        return batch.double().mean(dim=(2, 3)).numpy()

    mean, covariance, count, kept = folder_statistics(channel_means, tmp_path, size=4, batch_size=3)
    features = extract_features(channel_means, load_image_folder(tmp_path, size=4))
    expected = feature_statistics(features)
    assert count == 7
    np.testing.assert_allclose(mean, expected[0], rtol=1e-12)
    np.testing.assert_allclose(covariance, expected[1], rtol=1e-9)
    np.testing.assert_array_equal(kept, features)  # 7 images, fewer than `keep`: all of them, in order
    # keep 4: the same 4 distinct images (seeded), in file order, whatever the batch size
    subset = folder_statistics(channel_means, tmp_path, size=4, batch_size=3, keep=4)[3]
    rows = [next(i for i, row in enumerate(features) if np.array_equal(row, kept_row)) for kept_row in subset]
    assert len(subset) == 4 and rows == sorted(set(rows))
    np.testing.assert_array_equal(folder_statistics(channel_means, tmp_path, size=4, batch_size=2, keep=4)[3], subset)
    for path in sorted(tmp_path.glob("*.png"))[5:]:
        path.unlink()
    with pytest.raises(UserError, match=r"holds 5 images; the Frechet distance and precision / recall \(5 nearest neighbours\) "
                                        "need at least 6 per side"):  # fmt: skip
        folder_statistics(channel_means, tmp_path)


def test_folder_distance_takes_fidelity_and_diversity_apart_with_b_as_the_reference(tmp_path):
    """FD and the manifold metrics of folder A against folder B in the toy feature space."""
    from ranke.assets import asset_path
    from ranke.rewards.toy_features import load_toy_features

    rng = np.random.default_rng(10)
    for side, count in (("a", 9), ("b", 11)):
        (tmp_path / side).mkdir()
        for index in range(count):
            _save(tmp_path / side / f"{index:05d}.png", rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    result = folder_distance(tmp_path / "a", tmp_path / "b", "toy", batch_size=4, device="cpu")
    extractor = load_toy_features(asset_path("features"))
    features_a = extract_features(extractor, load_image_folder(tmp_path / "a"))
    features_b = extract_features(extractor, load_image_folder(tmp_path / "b"))
    assert result["fd"] == pytest.approx(frechet_distance_from_features(features_a, features_b), rel=1e-6)
    expected = manifold_metrics(features_b, features_a, nearest_k=5)  # B real, A fake
    assert expected != manifold_metrics(features_a, features_b, nearest_k=5)  # the order matters
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert (result["n_a"], result["n_b"], result["nearest_k"], result["manifold_n_a"], result["manifold_n_b"]) == (9, 11, 5, 9, 11)


def test_unreadable_or_truncated_images_are_one_line(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    png = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(UserError, match="b.png' cannot be read"):
        load_image_folder(tmp_path)
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(UserError, match="b.png' cannot be read"):
        load_image_folder(tmp_path)


def test_extract_features_batches_channels_first():
    images = np.random.default_rng(4).integers(0, 256, size=(5, 3, 2, 3), dtype=np.uint8)

    def channel_means(batch: torch.Tensor) -> np.ndarray:
        assert batch.shape[1] == 3 and batch.dtype == torch.uint8
        return batch.double().mean(dim=(2, 3)).numpy()

    features = extract_features(channel_means, images, batch_size=2)
    np.testing.assert_allclose(features, images.astype(np.float64).mean(axis=(1, 2)))


class _InceptionStandIn(torch.nn.Module):
    """A small TorchScript network with the interface of clean-fid's inception-2015-12-05.pt:
    `layers` maps standardised [B, 3, 299, 299] pixels to [B, 2048, 1, 1] features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048), torch.nn.Unflatten(1, (2048, 1, 1))
        )

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def inception_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_InceptionStandIn()).save(str(path))
    return path


def test_inception_extractor_matches_clean_fid_pipeline(inception_file):
    """Our extractor == clean-fid's "clean" path: its resizer per image, then its InceptionV3W
    wrapper (which standardises [0, 255] pixels itself) on the same TorchScript file."""
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    from ranke.eval.inception import InceptionExtractor

    images = np.random.default_rng(5).integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
    resize = build_resizer("clean")
    resized = torch.from_numpy(np.stack([resize(image) for image in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = InceptionV3W(str(inception_file.parent), download=False)(resized).double().numpy()
    features = InceptionExtractor(inception_file)(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert features.shape == (3, 2048) and features.dtype == np.float64
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)


def test_clean_resize_is_per_channel_float_bicubic():
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    from ranke.eval.inception import clean_resizer

    image = np.random.default_rng(6).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    resized = clean_resizer()(image)
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    green = Image.fromarray(image[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    np.testing.assert_array_equal(resized[:, :, 1], np.clip(np.asarray(green), 0, 255))
    assert not np.array_equal(resized, np.round(resized))  # no quantisation back to uint8


def test_float_images_are_scored_as_their_8_bit_version(inception_file):
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    from ranke.eval.inception import InceptionExtractor

    extractor = InceptionExtractor(inception_file)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    as_png = (pixels * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(extractor(pixels), extractor(as_png))


def test_inception_weights_come_from_argument_env_or_this_users_clean_fid_cache(inception_file, tmp_path, monkeypatch):
    from ranke.eval import inception

    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    assert inception.resolve_inception_weights(inception_file) == inception_file
    with pytest.raises(UserError, match="missing.pt.*--inception-weights.*nothing is downloaded"):
        inception.resolve_inception_weights(tmp_path / "missing.pt")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(inception_file))
    assert inception.resolve_inception_weights() == inception_file
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    cached = tmp_path / "cache" / inception.WEIGHTS_NAME
    monkeypatch.setattr(inception, "clean_fid_cache_path", lambda: cached)
    with pytest.raises(UserError, match="clean-fid's cache"):
        inception.resolve_inception_weights()
    cached.parent.mkdir()
    cached.write_bytes(inception_file.read_bytes())
    cached.chmod(0o644)
    assert inception.resolve_inception_weights() == cached  # this user's own copy
    cached.chmod(0o666)  # anyone on the machine could have replaced it
    with pytest.raises(UserError, match="writable by others; it is not loaded: pass --inception-weights"):
        inception.resolve_inception_weights()
    assert inception.resolve_inception_weights(inception_file) == inception_file  # a given path is the user's choice


def test_inception_rejects_a_file_that_is_not_torchscript(tmp_path):
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    from ranke.eval.inception import InceptionExtractor

    path = tmp_path / "weights.pt"
    path.write_text("not a network")
    with pytest.raises(UserError, match="not a TorchScript Inception network"):
        InceptionExtractor(path)


def test_kid_hand_computed():
    # D = 1, X = {0, 1}, Y = {1, 2}, k(x, y) = (x y + 1)^3:
    # XX off-diagonal 2 * 1 / 2 = 1; YY 2 * 27 / 2 = 27; XY (1 + 1 + 8 + 27) * 2 / 4 = 18.5 -> 9.5
    kid, se = kernel_distance(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), num_subsets=1)
    assert kid == pytest.approx(9.5) and se is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_kid_matches_clean_fid_on_the_full_sets():
    pytest.importorskip("cleanfid", reason="clean-fid is not installed (pip install --no-deps clean-fid requests)")
    clean_fid_kid = _clean_fid_function("kernel_distance")
    f1, f2 = _features(0, n=120), _features(1, n=120) * 0.9 + 0.3
    # one subset of all 120 features: clean-fid's random choice is then a permutation, and its value exact
    expected = clean_fid_kid(f1, f2, num_subsets=1, max_subset_size=500)
    assert kernel_distance(f1, f2, num_subsets=1, max_subset_size=500)[0] == pytest.approx(expected, rel=1e-9)


def test_kid_subsets_are_disjoint_random_splits_with_a_standard_error():
    f1, f2 = _features(0, n=103), _features(1, n=100)
    kid, se = kernel_distance(f1, f2, num_subsets=4, seed=7)
    assert (kid, se) == kernel_distance(f1, f2, num_subsets=4, seed=7)  # deterministic given the seed
    assert kid != kernel_distance(f1, f2, num_subsets=4, seed=8)[0]
    rng = np.random.default_rng(7)
    order1, order2 = rng.permutation(103), rng.permutation(100)  # 25 per subset, the 3 left over unused
    values = [kernel_distance(f1[order1[i * 25 : (i + 1) * 25]], f2[order2[i * 25 : (i + 1) * 25]], 1)[0] for i in range(4)]
    assert kid == pytest.approx(np.mean(values)) and se == pytest.approx(np.std(values, ddof=1) / 2)
    assert kernel_distance(f1, f2, num_subsets=4, max_subset_size=10, seed=7)[0] != pytest.approx(kid)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(5)
    same = [kernel_distance(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)), num_subsets=1)[0] for _ in range(200)]
    shifted = kernel_distance(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 1.0, num_subsets=1)[0]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(200)  # unbiased: the mean is 0 within its error
    assert min(same) < 0 < shifted  # an unbiased estimate can fall below 0
    assert shifted > 10 * np.std(same)


def test_paired_kid_leaves_the_pairs_out_of_the_cross_term():
    # X = {0, 1}, Y = {1, 2} paired row by row: cross over i != j only, k(0, 2) + k(1, 1) = 1 + 8,
    # times 2 / (2 * 1) -> 1 + 27 - 9 = 19
    kid, _ = kernel_distance(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), num_subsets=1, paired=True)
    assert kid == pytest.approx(19.0)
    # pairs that share a latent (an image and the real image of its prompt), same marginals: the
    # paired estimate is unbiased (mean 0), the unpaired one is pulled below 0 by the m close pairs
    rng = np.random.default_rng(6)
    paired, unpaired = [], []
    for _ in range(300):
        shared = rng.normal(size=(30, 4))
        x, y = shared + 0.3 * rng.normal(size=(30, 4)), shared + 0.3 * rng.normal(size=(30, 4))
        paired.append(kernel_distance(x, y, num_subsets=1, paired=True)[0])
        unpaired.append(kernel_distance(x, y, num_subsets=1)[0])
    assert abs(np.mean(paired)) < 3 * np.std(paired) / np.sqrt(300)
    assert np.mean(unpaired) < -3 * np.std(unpaired) / np.sqrt(300)
    # the subsets keep the pairs together: a paired split equals the paired estimate of its subsets
    x, y = _features(0, n=60), _features(0, n=60) + 0.1
    order = np.random.default_rng(2).permutation(60)
    values = [kernel_distance(x[order[i * 20 : (i + 1) * 20]], y[order[i * 20 : (i + 1) * 20]], 1, paired=True)[0] for i in range(3)]
    assert kernel_distance(x, y, num_subsets=3, seed=2, paired=True)[0] == pytest.approx(np.mean(values))
    with pytest.raises(ValueError, match="one row each per pair"):
        kernel_distance(x, y[:50], paired=True)


def test_kid_refuses_too_few_features():
    with pytest.raises(ValueError, match="at least 2 features per subset"):
        kernel_distance(np.zeros((5, 3)), np.zeros((5, 3)), num_subsets=3)
    with pytest.raises(ValueError, match="shapes"):
        kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))
