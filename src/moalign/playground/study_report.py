"""The study's report: tables with intervals, paired comparisons, learning curves, a video grid.

Reads every run's study.json (`moalign/playground/study.py`) and writes OUT/study/report.md, curves.png and
side_by_side.gif. Video metrics are (seeds x prompts) tables; run metrics have one value per seed. Intervals
and tests come from `moalign/evaluation/stats.py`: `seeds_prompts_ci` (two-way bootstrap over seeds and
prompts) and `paired_comparison` (same seeds, same prompts: differences, Wilcoxon over prompts, t-test over
seeds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moalign.alignment import MODE_TITLES
from moalign.evaluation.stats import bootstrap_ci, paired_comparison, seeds_prompts_ci
from moalign.playground.study import VIDEO_METRICS
from moalign.run.atomic import atomic_path, write_text
from moalign.stage1 import epe_ratio_text

TITLES = {
    "joint": "Joint (%)",
    "sa": "SA (%)",
    "pc": "PC (%)",
    "motion": "flow motion (px/frame)",
    "frechet_motion": "Fréchet motion distance",
    "heldout_loss": "held-out diffusion loss",
    "probe_motion_r2": "probe R² to motion tokens",
    "probe_flow_r2": "probe R² to flow",
}
PERCENT = ("joint", "sa", "pc")
LOWER_IS_BETTER = ("frechet_motion", "heldout_loss")
NEUTRAL = ("motion",)  # more motion is not better by itself: compare with the reference clips' row


def _video_table(results: dict[int, dict], metric: str) -> np.ndarray:
    """(seeds, prompts) values of one per-video metric ("motion": the DIS flow motion of `moalign evaluate`)."""
    key = "flow_motion" if metric == "motion" else metric
    return np.array([[v[key] for v in results[s]["videos"]] for s in sorted(results)], dtype=np.float64)


def _run_values(results: dict[int, dict], metric: str, block: int) -> np.ndarray:
    """(seeds,) values of one per-run metric at the final step."""
    out = []
    for s in sorted(results):
        r = results[s]
        final = r["probes"][max(r["probes"], key=int)]["mean"]
        out.append(
            {
                "frechet_motion": r["frechet"].get("motion", float("nan")),
                "heldout_loss": final["diffusion"],
                "probe_motion_r2": final["motion_r2"][block],
                "probe_flow_r2": final["flow_r2"][block],
            }[metric]
        )
    return np.array(out, dtype=np.float64)


def _table(results: dict[int, dict], metric: str, block: int) -> np.ndarray:
    """Always 2-D (seeds, prompts); run metrics are (seeds, 1)."""
    if metric in VIDEO_METRICS:
        return _video_table(results, metric)
    return _run_values(results, metric, block)[:, None]


def _fmt(metric: str, mean: float, low: float | None = None, high: float | None = None) -> str:
    scale = 100.0 if metric in PERCENT else 1.0
    digits = 1 if metric in PERCENT else (2 if metric == "motion" else (3 if "r2" in metric else 4))
    text = f"{scale * mean:.{digits}f}"
    if low is not None:
        text += f" [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"
    return text


def _verdict(metric: str, c: dict[str, Any]) -> str:
    """ "higher" / "lower" (with "better" or "worse") when the interval excludes 0, else no difference."""
    if c["low"] <= 0 <= c["high"]:
        return "no difference resolved"
    higher = c["low"] > 0
    if metric in NEUTRAL:
        return "higher" if higher else "lower"
    better = higher != (metric in LOWER_IS_BETTER)
    return f"{'higher' if higher else 'lower'} ({'better' if better else 'worse'})"


def _curves(path: Path, results: dict[str, dict[int, dict]], block: int) -> None:
    """Held-out loss and probe R^2 at the aligned block against step: per arm the mean over seeds, a band from
    the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for arm, runs in results.items():
        steps = sorted({int(k) for r in runs.values() for k in r["probes"]})
        for ax, get in zip(
            axes,
            (lambda p: p["mean"]["diffusion"], lambda p: p["mean"]["motion_r2"][block]),
            strict=True,
        ):
            ys = np.array([[get(r["probes"][str(t)]) for t in steps] for r in runs.values()])
            ax.plot(steps, ys.mean(0), label=arm)
            ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.2)
    axes[0].set(title="held-out diffusion loss (mean over noise levels)", xlabel="step")
    axes[1].set(title=f"probe R² to motion tokens, block {block}", xlabel="step")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_study_report(study: Any, prompts: list[str]) -> dict[str, Any]:
    """report.md, curves.png and side_by_side.gif in OUT/study; returns the figures (summary.json)."""
    from moalign.playground.demo import write_side_by_side

    cfg, root, block = study.cfg, study.root, study.aligned_block
    names = ("base", *cfg.arms)
    results = {
        n: {s: json.loads((study.run(n, s) / "study.json").read_text()) for s in cfg.seeds} for n in names
    }
    metrics = (cfg.primary_metric, *[m for m in TITLES if m != cfg.primary_metric])
    rows, figures = [], {}
    reference = json.loads((study.eval_data / "judge.json").read_text())["videos"]
    ceiling = json.loads((root / "vae_ceiling" / "judge.json").read_text())["videos"]
    measured = study.run("base", cfg.seeds[0]) / "videos" / "evaluation" / "evaluation.json"
    ref_motion = json.loads(measured.read_text())["reference_aggregate"]["motion"]
    for label, videos in (("held-out clips (reference)", reference), ("clips through the base VAE", ceiling)):
        cells = [_fmt(m, *bootstrap_ci([v[m] for v in videos])) if m in PERCENT else "" for m in metrics]
        if label.startswith("held-out"):  # the clips' own DIS flow motion, as measured for every run
            cells[metrics.index("motion")] = _fmt("motion", ref_motion["mean"], *ref_motion["ci95"])
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    for n in names:
        figures[n] = {
            m: seeds_prompts_ci(_table(results[n], m, block), samples=cfg.bootstrap_samples) for m in metrics
        }
        title = "start model" if n == "base" else f"{n}: {MODE_TITLES[n]}"
        rows.append(f"| {title} | " + " | ".join(_fmt(m, *figures[n][m]) for m in metrics) + " |")
    pairs = [(a, "none") for a in cfg.arms if a != "none"]
    if {"moalign", "trd"} <= set(cfg.arms):
        pairs.append(("moalign", "trd"))
    comparisons, lines, findings, resolved = {}, [], [], []
    for a, b in pairs:
        for m in metrics:
            c = paired_comparison(
                _table(results[a], m, block), _table(results[b], m, block), samples=cfg.bootstrap_samples
            )
            comparisons[f"{a} - {b}: {m}"] = c
            p = c["p_wilcoxon"] if m in ("joint", "sa", "pc", "motion") else c["p_seeds"]
            per_seed = ", ".join(_fmt(m, v) for v in c["per_seed"])
            lines.append(
                f"| {a} - {b} | {TITLES[m]} | {_fmt(m, c['diff'], c['low'], c['high'])} | {p:.3f} | "
                f"{per_seed} | {_verdict(m, c)} |"
            )
            if m == cfg.primary_metric:
                findings.append(
                    f"- {a} against {b}: {_verdict(m, c)}, {_fmt(m, c['diff'], c['low'], c['high'])}."
                )
            elif not c["low"] <= 0 <= c["high"]:
                interval = _fmt(m, c["diff"], c["low"], c["high"])
                resolved.append(f"{a} - {b}: {TITLES[m]} {interval}, {_verdict(m, c)}")
    _curves(root / "curves.png", {n: results[n] for n in cfg.arms}, block)
    write_side_by_side(
        root / "side_by_side.gif",
        {n: study.run(n, cfg.seeds[0]) / "videos" for n in names},
        study.eval_data,
        cfg.grid_prompts,
    )
    top = max(figures[n][cfg.primary_metric][0] for n in names)
    ceiling_joint = float(np.mean([v["joint"] for v in ceiling]))
    if cfg.primary_metric == "joint" and top < 0.05:
        findings.append(
            f"- The primary metric cannot rank the arms at this scale: no run reaches 5% Joint (the best "
            f"{100 * top:.1f}%), and the held-out clips drawn through the base model's VAE reach "
            f"{100 * ceiling_joint:.1f}%: the comparison rests on the continuous metrics below."
        )
    findings.append("- Other differences whose 95% interval excludes 0:" + ("" if resolved else " none."))
    findings += [f"  - {r}" for r in resolved]
    write_text(root / "report.md", _report(study, prompts, metrics, rows, lines, findings))
    return {
        "primary_metric": cfg.primary_metric,
        "arms": {n: {m: list(v) for m, v in f.items()} for n, f in figures.items()},
        "comparisons": comparisons,
        "aligned_block": block,
        "reference_joint": float(np.mean([v["joint"] for v in reference])),
        "vae_ceiling_joint": ceiling_joint,
    }


def _stages(d: dict[str, Path]) -> str:
    """What the arms stand on: stage 1's held-out flow error (a teacher worse than zero flow is flagged), the
    VAE's reconstruction PSNR, the base transformer's final loss."""
    s1 = json.loads((d["stage1"] / "metrics.json").read_text())
    vae = json.loads((d["vae"] / "metrics.json").read_text())
    base = json.loads((d["base"] / "metrics.json").read_text())
    ratio = s1["val_epe_ratio"]
    warn = (
        " **(worse than predicting zero flow: the teacher holds no motion; train stage 1 longer)**"
        if ratio is not None and ratio >= 1
        else ""
    )
    return (
        "| step | result |\n|---|---|\n"
        f"| stage 1: val EPE / zero-flow EPE (px, held-out clips) | {s1['val_epe']:.4f} / {s1['zero_flow_epe']:.4f} "
        f"(ratio {epe_ratio_text(s1)}){warn} |\n"
        f"| base VAE | val PSNR {vae['val_psnr_db']:.1f} dB after {vae['steps']} steps |\n"
        f"| base transformer | diffusion loss {base.get('diffusion', float('nan')):.4f} after {base['steps']} steps |"
    )


def _report(study, prompts, metrics, rows, lines, findings) -> str:
    cfg, recipe = study.cfg, study.demo.recipe
    stages = _stages(study.demo.d)
    training = study.training("moalign", cfg.seeds[0])
    primary = TITLES[cfg.primary_metric]
    header = " | ".join(
        TITLES[m] + (f", block {study.aligned_block}" if m.startswith("probe") else "") for m in metrics
    )
    start = "the same random init (from scratch)" if cfg.from_scratch else "the same base model"
    return f"""# moalign study

**Primary metric, named before running: {primary}.** Arms: {", ".join(cfg.arms)}; seeds
{", ".join(str(s) for s in cfg.seeds)}; every arm starts from {start} and trains {training.steps} steps
(batch {training.batch_size}, lr {training.lr}, alignment at block {study.aligned_block} 0-based, lambda
{training.align.lam}); a seed fixes the clips, their order, the noise and the timesteps for every arm.
Evaluation: {len(prompts)} held-out playground prompts (seed {cfg.eval_seed}), one video per prompt, run and
seed (the same sampler seeds for every arm of a seed); probes and held-out loss on the same {len(prompts)}
clips at noise levels {", ".join(str(v) for v in cfg.noise_levels)}.

## What it shows (primary: {primary}; 95% intervals)

{chr(10).join(findings)}

## Teacher and base model

{stages}

## Arms

| run | {header} |
|---|{"---|" * len(metrics)}
{chr(10).join(rows)}

Brackets: 95% intervals: for video metrics a two-way bootstrap resampling seeds and prompts; for the
Fréchet distance, held-out loss and probes (one value per seed) Student's t over the seeds. The first two rows
are the judge's references: the held-out clips themselves, and the same clips encoded and decoded by the base
model's VAE (the decoder every generated video passes through: a base model that drew the clips well would
score near this row; PC alone can be higher for blobs the judge cannot see as balls). "start model": what
every arm starts from, before training.
Probe R²: held-out ridge probes from the block's tokens (`docs/evaluation.md`), final step.

## Each arm against its baseline (paired: same seeds, prompts and noise)

| comparison | metric | difference [95% CI] | p | per seed | reading |
|---|---|---|---|---|---|
{chr(10).join(lines)}

p: two-sided Wilcoxon signed-rank test on the per-prompt differences averaged over seeds (video metrics), or
a one-sample t-test on the per-seed differences (run metrics; nan without spread). The test ignores the spread
between seeds that the interval carries, so the two can disagree; "reading" follows the interval and names
the direction only when it excludes 0. For the Fréchet distance and the held-out loss, lower is better. With
{len(cfg.seeds)} seeds the run metrics' intervals are wide: read their per-seed values.

## Files

`curves.png` (held-out loss and probe R² against step, mean over seeds with a min-max band),
`side_by_side.gif` (rows: prompts; columns: the held-out clip, the start model, then the arms; seed
{cfg.seeds[0]}), `runs/ARM/seed-S/` (each run, its `videos/` with `judge.json` and `evaluation/`, and
`study.json`), `summary.json` (every figure above). Training data: {recipe.synth.num_clips} playground clips.
"""
