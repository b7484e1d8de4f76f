"""Frechet distance between two image sets in the feature space of a fixed network.

FID (Heusel et al. 2017) fits a Gaussian to each set's features and measures

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

The formula, the unbiased covariance and the singular-product fallback follow clean-fid, which
the paper uses with Inception-v3 on MS-COCO. The network is pluggable (`FeatureExtractor`): the
toy world uses its own independently trained feature network, the real world Inception.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ranke.runtime import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FeatureExtractor(Protocol):
    """A frozen network mapping images to one feature vector each.

    Input: [N, 3, H, W], either uint8 in [0, 255] or float in [0, 1]; the extractor does its own
    resizing and normalisation. Output: float features [N, D] as a NumPy array.
    """

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


def extract_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Features [N, D] (float64) of uint8 images [N, H, W, 3], fed to `extractor` in batches as [B, 3, H, W]."""
    chunks = []
    for start in range(0, len(images), batch_size):
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


def load_image_folder(directory: str | Path, size: int | None = None) -> np.ndarray:
    """All PNG/JPEG images of `directory` (sorted by name) as uint8 [N, H, W, 3].

    With `size`, each image is center-cropped to a square and resized to `size` x `size` with
    PIL bicubic (the paper crops and resizes both FID sides to the model resolution). Without
    it, all images must already share one shape.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"image folder '{directory}' not found")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no PNG/JPEG images in '{directory}'")
    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
        if size is not None:
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if side != size:
                image = image.resize((size, size), Image.BICUBIC)
        images.append(np.asarray(image, dtype=np.uint8))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"images in '{directory}' have different sizes {sorted(shapes)}; pass a size to resize them")
    return np.stack(images)
