"""Precision, recall, density and coverage: fidelity and diversity of generated images, apart.

A Frechet distance folds two failures into one number: samples unlike any real image (fidelity)
and real images unlike any sample (diversity). The k-nearest-neighbour manifold estimates take
them apart (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"; Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
Models"). In a feature space, around every real feature x_i lies the ball B(x_i, r_i) whose
radius r_i is the distance to its k-th nearest other real feature, and around every fake feature
y_j the ball B(y_j, s_j), s_j its k-th nearest other fake feature's distance. With N real and M
fake features:

* precision = (1/M) sum_j 1[y_j lies in some B(x_i, r_i)]: the share of samples on the real
  manifold (fidelity);
* recall = (1/N) sum_i 1[x_i lies in some B(y_j, s_j)]: the share of real images on the samples'
  manifold (diversity);
* density = (1/(k M)) sum_j sum_i 1[y_j lies in B(x_i, r_i)]: how many real balls hold a sample,
  over k; about 1 when both sets come from one distribution, above 1 when samples crowd into
  dense real regions, and unbounded; unlike precision, one outlying real image (with its large
  ball) does not make the space around it count as real;
* coverage = (1/N) sum_i 1[some y_j lies in B(x_i, r_i)]: the share of real balls that hold a
  sample; recall built on the real balls only, so outlying samples cannot inflate it.

Balls are closed (distance <= radius), as both papers define them; the prdc package compares with
`<`, which differs only where a distance equals a radius exactly (a tie continuous features do
not have). Distances are Euclidean between all pairs (an [N, M] matrix: 2 MB for 500 x 500 in
float64). All four depend on k and on N and M, so compare only values of the same k and sizes.
"""

from __future__ import annotations

import numpy as np

NEAREST_K = 5  # Naeem et al.'s recommended k (prdc's examples use it too)
MIN_FEATURES = NEAREST_K + 1  # per set, with the default k: each feature's k-th nearest other one


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [N, M] between the rows of a [N, D] and b [M, D], in float64.

    From ||a||^2 + ||b||^2 - 2 a.b (one matrix product), round-off below 0 clipped to 0; in place,
    so the [N, M] matrix is held once."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    distances = a @ b.T
    distances *= -2.0
    distances += (a * a).sum(axis=1)[:, None]
    distances += (b * b).sum(axis=1)[None, :]
    np.maximum(distances, 0.0, out=distances)
    return np.sqrt(distances, out=distances)


def kth_neighbour_distances(features: np.ndarray, k: int) -> np.ndarray:
    """Per row of features [N, D], the distance to its k-th nearest other row (N >= k + 1).

    The row itself is at distance 0, the smallest of its own distances, so the k-th nearest other
    row is the (k+1)-th smallest entry of its row of `pairwise_distances`."""
    distances = pairwise_distances(features, features)
    return np.partition(distances, k, axis=1)[:, k]


def _check(real: np.ndarray, fake: np.ndarray, nearest_k: int) -> tuple[np.ndarray, np.ndarray]:
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need real and fake features [N, D] and [M, D], got shapes {real.shape} and {fake.shape}")
    if nearest_k < 1:
        raise ValueError(f"nearest_k must be positive, got {nearest_k}")
    for name, features in (("real", real), ("fake", fake)):
        if len(features) < nearest_k + 1:
            raise ValueError(f"precision, recall, density and coverage need at least nearest_k + 1 = {nearest_k + 1} "
                             f"{name} features (each one's k-th nearest other), got {len(features)}")  # fmt: skip
    return real, fake


def manifold_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """{precision, recall, density, coverage} of fake features [M, D] against real features
    [N, D], with k = `nearest_k` (see the module docstring); both sets need k + 1 rows or more."""
    real, fake = _check(real, fake, nearest_k)
    real_radii = kth_neighbour_distances(real, nearest_k)  # r_i
    fake_radii = kth_neighbour_distances(fake, nearest_k)  # s_j
    distances = pairwise_distances(real, fake)  # [N, M]
    in_real_ball = distances <= real_radii[:, None]  # [i, j]: y_j in B(x_i, r_i)
    in_fake_ball = distances <= fake_radii[None, :]  # [i, j]: x_i in B(y_j, s_j)
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": float(in_fake_ball.any(axis=1).mean()),
        "density": float(in_real_ball.sum(axis=0).mean() / nearest_k),
        "coverage": float(in_real_ball.any(axis=1).mean()),
    }
