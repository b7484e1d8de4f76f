"""Frechet and kernel distances between two image sets in the feature space of a fixed network.

FID (Heusel et al. 2017) fits a Gaussian to each set's features and measures

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

The formula, the unbiased covariance and the singular-product fallback follow clean-fid, which
the paper uses with Inception-v3 on MS-COCO. KID (Binkowski et al. 2018) is the unbiased MMD^2
with a cubic polynomial kernel (`kernel_distance`): no Gaussian assumption, and an unbiased
estimate at any set size, so small evaluations can be compared with it. The network is pluggable (`FeatureExtractor`): the
toy world uses its own independently trained feature network, the real world Inception.
Image folders (`folder_distance`) also get precision, recall, density and coverage
(`ranke.eval.manifold`): FD taken apart into fidelity and diversity.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ranke.data import center_crop_resize
from ranke.eval.manifold import MIN_FEATURES, NEAREST_K, manifold_metrics
from ranke.runtime import UserError, progress, select_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FEATURE_KINDS = ("toy", "inception")
# Images per folder the manifold metrics use at most: they compare all pairs (three [n, n] float64
# matrices, 200 MB each at 5000), so a larger folder gives a seeded random subset of this many.
MANIFOLD_IMAGES = 5000


class FeatureExtractor(Protocol):
    """A frozen network mapping images to one feature vector each.

    Input: [N, 3, H, W], either uint8 in [0, 255] or float in [0, 1]; the extractor does its own
    resizing and normalisation. Output: float features [N, D] as a NumPy array.
    """

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


def extract_features(
    extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 64, desc: str | None = None
) -> np.ndarray:
    """Features [N, D] (float64) of uint8 images [N, H, W, 3], fed to `extractor` in batches as [B, 3, H, W].

    With `desc`, a progress bar counts the batches."""
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in starts if desc is None else progress(starts, desc=desc):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)  # copies: inputs may be read-only
        chunks.append(np.asarray(extractor(batch), dtype=np.float64))
    return np.concatenate(chunks)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    The matrix square root of S1 S2 is taken with scipy. When the product is singular (fewer
    samples than dimensions) the square root is not finite; `eps` is then added to both
    diagonals, as clean-fid does. A small imaginary part from round-off is dropped; a large one
    means the covariances are broken and raises.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product, adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def kernel_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 10,
    max_subset_size: int = 1000,
    seed: int = 0,
    paired: bool = False,
) -> tuple[float, float | None]:
    """KID between feature sets [N1, D] and [N2, D] -> (kid, standard error).

    With the kernel k(x, y) = (x.y / D + 1)^3, the unbiased MMD^2 of independent sets X, Y of m
    each is (clean-fid's estimator)

        sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.

    `paired`: row i of both sets belongs together (e.g. an image and the real image of the same
    prompt), so x_i and y_i are not independent and the m pairs (x_i, y_i) would bias the cross
    term; they are left out of it (Gretton et al.'s MMD^2_u, the cross sum over i != j divided
    by m (m - 1)), and the subsets keep the pairs together.

    Each set is split at random (a generator seeded with `seed`) into `num_subsets` disjoint
    subsets of m = min(N1 // num_subsets, N2 // num_subsets, max_subset_size) features; KID is
    the mean of the subsets' MMD^2 and, the subsets being independent draws, its standard error
    is their std / sqrt(num_subsets) (None for one subset: undefined). One subset of the whole
    sets gives the full-set estimate.
    """
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"need features [N1, D] and [N2, D], got shapes {features1.shape} and {features2.shape}")
    if paired and len(features1) != len(features2):
        raise ValueError(f"paired feature sets must have one row each per pair, got {len(features1)} and {len(features2)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    m = min(len(features1) // num_subsets, len(features2) // num_subsets, max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per subset: {len(features1)} and {len(features2)} "
                         f"features in {num_subsets} subsets")  # fmt: skip
    dim = features1.shape[1]
    rng = np.random.default_rng(seed)
    order1 = rng.permutation(len(features1))
    order2 = order1 if paired else rng.permutation(len(features2))
    values = []
    for subset in range(num_subsets):
        x = features1[order1[subset * m : (subset + 1) * m]]
        y = features2[order2[subset * m : (subset + 1) * m]]
        within = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        across = (x @ y.T / dim + 1) ** 3
        if paired:
            cross = (across.sum() - np.trace(across)) / (m * (m - 1))
        else:
            cross = across.sum() / m**2
        values.append((within.sum() - np.trace(within)) / (m * (m - 1)) - 2 * cross)
    standard_error = float(np.std(values, ddof=1) / np.sqrt(num_subsets)) if num_subsets > 1 else None
    return float(np.mean(values)), standard_error


def image_paths(directory: str | Path) -> list[Path]:
    """The PNG/JPEG files of `directory`, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"image folder '{directory}' not found")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no PNG/JPEG images in '{directory}'")
    return paths


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """One image as uint8 [H, W, 3]; with `size`, center-cropped to a square and resized to
    `size` x `size` with PIL bicubic (the paper crops and resizes both FID sides to the model
    resolution). An unreadable or truncated file is one line naming it."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated or corrupt data
        raise UserError(f"image '{path}' cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if size is not None:
        image = center_crop_resize(image, size)
    return np.asarray(image, dtype=np.uint8)


def image_batches(paths: list[Path], size: int | None = None, batch_size: int = 64):
    """uint8 batches [B, H, W, 3] of the images at `paths`, read as they are needed. Without
    `size` all images must share the first one's shape."""
    shape = None
    for start in range(0, len(paths), batch_size):
        batch = [read_image(path, size) for path in paths[start : start + batch_size]]
        for path, image in zip(paths[start : start + batch_size], batch):
            shape = shape or image.shape
            if image.shape != shape:
                raise UserError(
                    f"images in '{path.parent}' have different sizes ({path.name} is {image.shape[1]}x{image.shape[0]}, "
                    f"the first {shape[1]}x{shape[0]}); pass --size to resize them"
                )
        yield np.stack(batch)


def load_image_folder(directory: str | Path, size: int | None = None) -> np.ndarray:
    """All PNG/JPEG images of `directory` (sorted by name) as uint8 [N, H, W, 3] (`read_image`);
    for small sets: Frechet distances of folders stream them instead (`folder_statistics`)."""
    paths = image_paths(directory)
    return np.concatenate(list(image_batches(paths, size, len(paths))))


class FeatureMoments:
    """Running mean and unbiased covariance of feature batches, in float64, in memory [D, D]
    whatever the number of images. Sums are taken about the first batch's mean (the shifted
    formula), which keeps the covariance as accurate as `np.cov` of all features at once."""

    def __init__(self):
        self.count, self.shift, self.total, self.outer = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = features.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((len(self.shift), len(self.shift)))
        centred = features - self.shift
        self.count += len(features)
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D], as `feature_statistics` of all features."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        return self.shift + mean, (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def folder_statistics(
    extractor: FeatureExtractor, directory: str | Path, size: int | None = None, batch_size: int = 64,
    desc: str | None = None, keep: int = MANIFOLD_IMAGES,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(mean, covariance, number of images, kept features) of the features of a folder's images,
    streamed batch by batch from the files: memory does not grow beyond `keep` feature vectors.
    The kept features [min(n, keep), D] (float64, in file order) are those of a random subset of
    the images (seeded with 0, so the same folder keeps the same images): all of them up to `keep`."""
    paths = image_paths(directory)
    if len(paths) < MIN_FEATURES:
        raise UserError(f"'{directory}' holds {len(paths)} image{'s' if len(paths) != 1 else ''}; the Frechet distance and "
                        f"precision / recall ({NEAREST_K} nearest neighbours) need at least {MIN_FEATURES} per side")  # fmt: skip
    kept_rows = np.sort(np.random.default_rng(0).permutation(len(paths))[:keep])
    moments, kept, start = FeatureMoments(), [], 0
    batches = image_batches(paths, size, batch_size)
    total = (len(paths) + batch_size - 1) // batch_size
    for batch in batches if desc is None else progress(batches, total=total, desc=desc):
        features = np.asarray(extractor(torch.from_numpy(batch).permute(0, 3, 1, 2)), dtype=np.float64)
        moments.add(features)
        rows = kept_rows[(kept_rows >= start) & (kept_rows < start + len(features))]
        kept.append(features[rows - start])
        start += len(features)
    return *moments.statistics(), len(paths), np.concatenate(kept)


def build_feature_extractor(
    kind: str, inception_weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """`toy`: the committed toy feature network; `inception`: clean-fid's Inception-v3 (local weights)."""
    if kind == "toy":
        from ranke.assets import asset_path
        from ranke.rewards.toy_features import load_toy_features

        return load_toy_features(asset_path("features"), device)
    if kind == "inception":
        from ranke.eval.inception import InceptionExtractor

        return InceptionExtractor(inception_weights, device)
    raise UserError(f"unknown feature network '{kind}' (one of: {', '.join(FEATURE_KINDS)})")


def folder_distance(
    dir_a: str | Path,
    dir_b: str | Path,
    features: str = "toy",
    inception_weights: str | Path | None = None,
    size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> dict:
    """`ranke fid`: Frechet distance between the images of two folders -> {fd, n_a, n_b, features,
    precision, recall, density, coverage, nearest_k, manifold_n_a, manifold_n_b}.

    `size` center-crops and resizes both sides first (`read_image`), as the paper does at the
    model resolution; the feature network then applies its own input convention. Images are
    read and featurised batch by batch (`folder_statistics`). B is the reference (real) side of
    the manifold metrics (`ranke.eval.manifold.manifold_metrics`): precision is the share of A's
    images on B's manifold. They use at most `MANIFOLD_IMAGES` images of each folder
    (manifold_n_a, manifold_n_b: how many).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if size is not None and size < 1:
        raise UserError(f"--size must be a positive number of pixels, got {size}")
    extractor = build_feature_extractor(features, inception_weights, select_device(device))
    mu_a, sigma_a, n_a, kept_a = folder_statistics(extractor, dir_a, size, batch_size, desc=f"{features} features A")
    mu_b, sigma_b, n_b, kept_b = folder_statistics(extractor, dir_b, size, batch_size, desc=f"{features} features B")
    return {
        "fd": frechet_distance(mu_a, sigma_a, mu_b, sigma_b), "n_a": n_a, "n_b": n_b, "features": features,
        **manifold_metrics(kept_b, kept_a, NEAREST_K), "nearest_k": NEAREST_K,
        "manifold_n_a": len(kept_a), "manifold_n_b": len(kept_b),
    }  # fmt: skip
