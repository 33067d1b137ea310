"""`moalign evaluate`: weight-free metrics of every video in a folder, with or without a manifest.

Outputs (in ``--out``, default VIDEOS/evaluation/): ``metrics.csv`` (one row per video: `video.VideoMetrics`),
``evaluation.json`` (the aggregate: mean with a 95% bootstrap interval per metric, the share of near-static
videos; the reference set's when given; Fréchet distances when a teacher is given), ``report.md`` and
``motion.png`` (the per-video motion distribution). Metric definitions: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from moalign.errors import MoalignError
from moalign.evaluation.frechet import frechet_distance
from moalign.evaluation.stats import bootstrap_ci
from moalign.evaluation.video import VideoMetrics, video_metrics
from moalign.run import console
from moalign.run.atomic import atomic_path, write_json, write_text

logger = console.get_logger(__name__)

SUMMARISED = ("motion", "motion_top", "flicker", "warp_error", "occluded", "flow_acceleration", "smoothness")


def find_videos(folder: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """(video path, caption or None) for each video of a folder, in the dataset's order.

    The folder is read as a dataset (`moalign.data.manifest.open_manifest`, every layout: metadata.jsonl /
    .csv, prompts.txt / prompt.txt / captions.txt / caption.txt + videos.txt / video.txt, a train/ split,
    sidecar .txt captions). Captions are optional here: a folder of bare videos gives every video below it
    (`manifest.VIDEO_SUFFIXES`, hidden files and folders left out, sorted by path) with caption None, and so
    does a video without its sidecar .txt or a manifest row without a caption column.

    Raises:
        MoalignError: the folder does not exist, holds no videos and no manifest, or its manifest is
            malformed (the message names the file and line).
    """
    from moalign.data.manifest import VIDEO_SUFFIXES, NoManifestError, open_manifest

    root = Path(folder)
    if not root.is_dir():
        raise MoalignError(f"{root} is not a folder of videos: pass --videos / --reference DIR")
    try:
        manifest = open_manifest(root, missing_captions_ok=True)
    except NoManifestError as err:  # a malformed manifest is not caught: it is the user's to fix
        raise MoalignError(
            f"{root} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no manifest: pass the folder the videos "
            "are in as --videos / --reference"
        ) from err
    missing = set(manifest.missing_captions)
    return [(r.video, None if i in missing else r.caption) for i, r in enumerate(manifest.records)]


def _measure(videos: list[tuple[Path, str | None]], skip_bad: bool, progress: bool, desc: str, estimator):
    """Per-video rows and the skipped videos with their reasons."""
    from moalign.data.video_io import read_video

    rows, skipped = [], []
    for path, caption in console.progress(videos, enabled=progress, desc=desc, unit="video"):
        try:
            frames, _ = read_video(path)
            if len(frames) < 2:
                raise MoalignError(f"{path} has {len(frames)} frame(s): motion metrics need at least 2")
        except MoalignError as err:
            if not skip_bad:
                hint = (
                    ""
                    if "--skip-bad-videos" in str(err)
                    else " (or pass --skip-bad-videos to skip such videos, counted)"
                )
                raise MoalignError(f"{err}{hint}") from err
            skipped.append({"video": str(path), "reason": str(err)})
            continue
        metrics: VideoMetrics = video_metrics(frames, estimator)
        rows.append({"video": str(path), "caption": caption, **metrics.as_dict()})
    return rows, skipped


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% percentile-bootstrap interval (`moalign/evaluation/stats.py`, 2,000 seeded resamples) of
    every metric over videos, and the share of near-static videos."""
    out: dict[str, Any] = {
        "num_videos": len(rows),
        "static_share": float(np.mean([r["static"] for r in rows])),
    }
    for key in SUMMARISED:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            out[key] = None
            continue
        mean, low, high = bootstrap_ci(values)
        out[key] = {"mean": mean, "ci95": [low, high]}
    return out


def _teacher_features(
    teacher_run: str | os.PathLike, videos, device: str, progress: bool, skipped: list | None = None
) -> dict[str, np.ndarray]:
    """Per video, the mean over tokens of the teacher's raw encoder tokens and motion tokens: (N, D_v), (N, D_m).
    Clips are sampled with the teacher's own data config (the geometry its M_psi was trained on); a video too
    short for it stops here, or with `skipped` (a list) is left out and listed there."""
    import torch

    from moalign.data.geometry import resize_center_crop
    from moalign.data.sampling import read_clip
    from moalign.encoder import VideoEncoder
    from moalign.teacher import load_motion_teacher

    teacher = load_motion_teacher(teacher_run)
    encoder = VideoEncoder.from_pretrained(teacher.encoder, torch_dtype=torch.float32).to(device)
    projector = teacher.projector.to(device)
    raw, motion = [], []
    with torch.no_grad():
        for path, _ in console.progress(videos, enabled=progress, desc="teacher features", unit="video"):
            try:
                frames, _, _ = read_clip(path, teacher.data)
            except MoalignError as err:
                reason = (
                    f"{path} cannot be read as the teacher reads clips ({teacher.data.num_frames} frames, the data "
                    f"config of {teacher_run}); is it shorter?"
                )
                if skipped is None:
                    raise MoalignError(
                        f"{reason} Fréchet distances need videos at least that long: generate longer videos, drop "
                        "--teacher, or pass --skip-bad-videos to leave such videos out of the distances (listed in "
                        "evaluation.json)"
                    ) from err
                skipped.append({"video": str(path), "reason": reason})
                continue
            frames = resize_center_crop(frames, teacher.data.height, teacher.data.width)
            tokens = encoder.encode(np.ascontiguousarray(frames)[None])  # (1, F'', H'', W'', D_v)
            raw.append(tokens.flatten(1, 3).mean(1)[0].cpu().numpy())
            motion.append(projector(tokens).flatten(1, 3).mean(1)[0].cpu().numpy())
    return {"encoder": np.stack(raw), "motion": np.stack(motion)}


def evaluate_folder(
    videos: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    reference: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    skip_bad_videos: bool = False,
    progress: bool = True,
    device: str = "cpu",
    flow: str = "dis",
    raft_weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a folder of videos (and optionally a reference folder of real clips); returns the aggregate
    written to OUT/evaluation.json. With `teacher` (a stage-1 run) and `reference`: Fréchet distances between
    the two sets in the teacher's motion space and in its encoder's raw space (FVD-style with our encoder; not
    comparable to I3D FVD numbers). `flow`: the optical-flow method ("dis" on CPU; "raft" with `raft_weights`
    on a GPU machine, as the paper's flow; "farneback").

    Raises:
        MoalignError: a missing or empty folder, an unreadable or 1-frame video (unless skipped), or fewer than 2
            videos per set for a Fréchet distance.
    """
    out = Path(out) if out is not None else Path(videos) / "evaluation"
    from moalign.data.flow import build_flow_estimator

    if flow == "exact":
        raise MoalignError(
            "--flow exact reads a dataset's ground truth; evaluate generated videos with dis or raft"
        )
    estimator = build_flow_estimator(flow, raft_weights=raft_weights, device=device)
    found = find_videos(videos)
    rows, skipped = _measure(found, skip_bad_videos, progress, "evaluate", estimator)
    if not rows:
        reasons = "; ".join(f"{Path(k['video']).name}: {k['reason'][:100]}" for k in skipped[:3])
        raise MoalignError(
            f"no readable video in {videos}: nothing to evaluate (skipped {len(skipped)}: {reasons})"
        )
    result: dict[str, Any] = {"videos": str(videos), "flow": estimator.config(), "aggregate": summarise(rows)}
    result["skipped"] = skipped
    if reference is not None:
        ref_found = find_videos(reference)
        ref_rows, ref_skipped = _measure(
            ref_found, skip_bad_videos, progress, "evaluate reference", estimator
        )
        result.update(
            reference=str(reference), reference_aggregate=summarise(ref_rows), reference_skipped=ref_skipped
        )
        if teacher is not None:
            if len(rows) < 2 or len(ref_rows) < 2:
                raise MoalignError(
                    "a Fréchet distance needs at least 2 videos in --videos and in --reference"
                )
            too_short = [] if skip_bad_videos else None
            ours = _teacher_features(
                teacher, [(Path(r["video"]), None) for r in rows], device, progress, too_short
            )
            theirs = _teacher_features(
                teacher, [(Path(r["video"]), None) for r in ref_rows], device, progress, too_short
            )
            if min(len(ours["motion"]), len(theirs["motion"])) < 2:
                raise MoalignError(
                    "a Fréchet distance needs at least 2 videos per set long enough for the teacher: "
                    f"{len(ours['motion'])} in --videos, {len(theirs['motion'])} in --reference"
                )
            result["frechet_skipped"] = too_short or []
            result["frechet"] = {
                space: frechet_distance(ours[space], theirs[space]) for space in ("motion", "encoder")
            }
            result["teacher"] = str(teacher)
    _write(out, rows, result, ref_rows if reference is not None else None)
    agg = result["aggregate"]
    logger.info(
        f"[evaluate] {agg['num_videos']} videos: motion {agg['motion']['mean']:.2f} px/frame, "
        f"{100 * agg['static_share']:.0f}% near-static, warping error {agg['warp_error']['mean']:.4f}"
        + (f", {len(skipped)} skipped (reasons in evaluation.json)" if skipped else "")
        + (
            f"; {len(result['frechet_skipped'])} left out of the Fréchet distances (too short)"
            if result.get("frechet_skipped")
            else ""
        )
        + f" -> {out}"
    )
    return result


def _write(out: Path, rows, result: dict[str, Any], ref_rows) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "evaluation.json", result)
    _plot_motion(out / "motion.png", rows, ref_rows)
    write_text(out / "report.md", _report(result))


def _plot_motion(path: Path, rows, ref_rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    sets = [("videos", rows)] + ([("reference", ref_rows)] if ref_rows else [])
    top = max(r["motion"] for _, rs in sets for r in rs) or 1.0
    for name, rs in sets:
        ax.hist([r["motion"] for r in rs], bins=20, range=(0, top * 1.05), alpha=0.6, label=name)
    ax.set_xlabel("motion (mean optical-flow magnitude, px/frame)")
    ax.set_ylabel("videos")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _report(result: dict[str, Any]) -> str:
    def cell(agg: dict[str, Any], key: str) -> str:
        v = agg.get(key)
        return "n/a" if v is None else f"{v['mean']:.4g} [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]"

    sets = [("videos", result["aggregate"])]
    if "reference_aggregate" in result:
        sets.append(("reference", result["reference_aggregate"]))
    lines = [
        f"# Evaluation of {result['videos']}",
        "",
        "Weight-free metrics (definitions: docs/evaluation.md); brackets: 95% bootstrap intervals over videos.",
        "",
        "| set | videos | near-static | " + " | ".join(SUMMARISED) + " |",
        "|---|---|---|" + "---|" * len(SUMMARISED),
    ]
    for name, agg in sets:
        cells = " | ".join(cell(agg, k) for k in SUMMARISED)
        lines.append(f"| {name} | {agg['num_videos']} | {100 * agg['static_share']:.0f}% | {cells} |")
    if "frechet" in result:
        f = result["frechet"]
        lines += [
            "",
            f"Fréchet distance to the reference (teacher {result['teacher']}; FVD-style with our own encoder, not "
            f"comparable to I3D FVD): motion space {f['motion']:.4g}, raw encoder space {f['encoder']:.4g}.",
        ]
    if result["skipped"]:
        lines += [
            "",
            f"Skipped {len(result['skipped'])} video(s) (unreadable, or too short for the metrics): see evaluation.json.",
        ]
    if result.get("frechet_skipped"):
        n = len(result["frechet_skipped"])
        lines += [
            "",
            f"Left out of the Fréchet distances: {n} video(s) too short for the teacher's clips (evaluation.json).",
        ]
    lines += ["", "![motion per video](motion.png)", ""]
    return "\n".join(lines)
