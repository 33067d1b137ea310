"""Fréchet distance between two sets of feature vectors (Heusel et al., NeurIPS 2017, as in FID / FVD).

``d^2 = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` with the sets' means and covariances. With our own
encoders as the feature extractor this is an FVD-style distance, not comparable to I3D FVD numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance d^2 between feature sets x (N, D) and y (M, D), N, M >= 2.

    `eps` is added to both covariances' diagonals when their product's square root is not finite (fewer
    samples than dimensions make the covariances singular).

    Raises:
        ValueError: not 2-D, different feature sizes, or fewer than 2 rows.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 videos per set, got {len(x)} and {len(y)}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # few videos: a singular product is expected, its root still finite
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_x @ cov_y)
        if not np.isfinite(root).all():
            offset = np.eye(len(cov_x)) * eps
            root = linalg.sqrtm((cov_x + offset) @ (cov_y + offset))
    root = root.real
    value = np.square(mu_x - mu_y).sum() + np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(root)
    return float(max(value, 0.0))
