"""Comparison tables for judged arms: means with bootstrap confidence intervals over prompts.

Each arm is a `moalign judge` result ({"videos": [{video, sa, pc, joint, motion}], ...}). Videos are paired
across arms by position (the same prompt list and seeds), so the table compares like with like.
"""

from __future__ import annotations

from moalign.evaluation.stats import bootstrap_ci

METRICS = ("sa", "pc", "joint", "motion")


def arm_table(arms: dict[str, dict], level: float = 0.95, seed: int = 0) -> str:
    """A markdown table: one row per arm, SA / PC / Joint (%) and motion (px/frame), mean [CI]."""
    lines = [
        "| arm | SA (%) | PC (%) | Joint (%) | motion (px/frame) | videos |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in arms.items():
        videos = result["videos"]
        cells = []
        for m in METRICS:
            mean, lo, hi = bootstrap_ci([v[m] for v in videos], level, seed=seed)
            scale = 1.0 if m == "motion" else 100.0
            cells.append(f"{mean * scale:.1f} [{lo * scale:.1f}, {hi * scale:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(videos)} |")
    lines.append("")
    lines.append(f"Brackets: {int(level * 100)}% percentile-bootstrap intervals of the mean over prompts.")
    return "\n".join(lines)
