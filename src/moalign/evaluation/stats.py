"""Statistics shared by every report: the demo's arm tables, `moalign evaluate`'s aggregates."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values: list[float] | np.ndarray, level: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over the given values (prompts,
    videos); no spread gives the mean itself as both ends."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))
