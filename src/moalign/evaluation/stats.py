"""Statistics shared by every report: the demo's arm tables, `moalign evaluate`'s aggregates, `moalign study`'s
comparisons (seeds x prompts tables, paired against a baseline arm)."""

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


def seeds_prompts_ci(
    values: np.ndarray, level: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of a (seeds, prompts) table: a two-way percentile bootstrap that resamples the seeds
    and, independently, the prompts (both with replacement) and averages the cells they pick, so the interval
    carries the spread between training seeds and between prompts (a crossed design: every seed saw every
    prompt). With one seed it is the bootstrap over prompts. With one prompt (a metric measured once per run)
    it is Student's t interval over the seeds instead (scipy): a bootstrap over 3 values has 10 distinct
    resamples and is far too narrow; nan with one seed, the mean itself with no spread."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty (seeds, prompts) table, got shape {x.shape}")
    if x.shape[1] == 1:
        return t_interval(x[:, 0], level)
    rng = np.random.default_rng(seed)
    s = rng.integers(0, x.shape[0], size=(samples, x.shape[0]))
    p = rng.integers(0, x.shape[1], size=(samples, x.shape[1]))
    # mean over the picked cells = mean over picked seeds of (mean over picked prompts)
    means = np.stack([x[s[i]][:, p[i]].mean() for i in range(samples)])
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of a few values (seeds), scipy.stats.t."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64).ravel()
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    sem = float(x.std(ddof=1) / np.sqrt(x.size))
    if sem == 0.0:
        return mean, mean, mean
    low, high = stats.t.interval(level, x.size - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def paired_comparison(
    arm: np.ndarray, baseline: np.ndarray, level: float = 0.95, samples: int = 2000, seed: int = 0
) -> dict[str, float | list[float]]:
    """An arm against a baseline on the same (seeds, prompts) cells: same seeds, same prompts, same noise.

    Returns:
        diff (mean of arm - baseline), low / high (`seeds_prompts_ci` of the differences: the two-way bootstrap
        for (seeds, prompts) tables, Student's t over seeds for one value per seed), per_seed (the mean
        difference of each seed), p_wilcoxon (two-sided Wilcoxon signed-rank test, scipy, on the per-prompt
        differences averaged over seeds; zero differences split between the signs; 1.0 when every difference
        is zero) and p_seeds (two-sided one-sample t-test of the per-seed differences, scipy; nan with fewer
        than 2 seeds or no spread).
    """
    from scipy import stats

    a, b = np.asarray(arm, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"arm and baseline tables differ in shape: {a.shape} vs {b.shape}")
    d = a.reshape(a.shape[0], -1) if a.ndim == 2 else a.reshape(-1, 1)
    d = d - (b.reshape(b.shape[0], -1) if b.ndim == 2 else b.reshape(-1, 1))
    mean, low, high = seeds_prompts_ci(d, level, samples, seed)
    per_prompt = d.mean(0)
    p_wilcoxon = 1.0
    if d.shape[1] > 1 and np.any(per_prompt != 0):
        p_wilcoxon = float(stats.wilcoxon(per_prompt, zero_method="zsplit").pvalue)
    per_seed = d.mean(1)
    p_seeds = float("nan")
    if len(per_seed) > 1 and np.ptp(per_seed) > 0:
        p_seeds = float(stats.ttest_1samp(per_seed, 0.0).pvalue)
    return {
        "diff": mean, "low": low, "high": high, "per_seed": per_seed.tolist(),
        "p_wilcoxon": p_wilcoxon, "p_seeds": p_seeds,
    }  # fmt: skip
