"""Training-curve PNGs (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from moalign.run.atomic import atomic_path


def plot_curves(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    ylabel: str = "loss",
    hlines: dict[str, float] | None = None,
    logy: bool = False,
) -> None:
    """Write a line plot of named (steps, values) series, with optional labelled horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, (xs, ys) in series.items():
        if len(xs):
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 12 else None, linewidth=1.4)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1.0)
        ax.annotate(
            name, xy=(0.01, y), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey"
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
