"""A toy VideoPhy2 judge for the playground: semantic adherence (SA), physical commonsense (PC), Joint.

VideoPhy2 asks human-calibrated judges two questions about a generated video: does it show what the
prompt says (SA), and does it obey physics (PC); a video counts when both are good (Joint). This module
answers the same questions with hand-written rules for the playground's world (playground/scenes.py), so the
whole pipeline can be scored without downloading a judge model. Everything is numpy + OpenCV; one 17-frame
64x64 clip takes a few milliseconds.

SA (semantic adherence), the product of three scores in [0, 1]
    ``presence``: per colour named in the caption ("a/an <colour> ball", parsed with the playground's
    caption grammar), the fraction of frames where exactly one ball of that colour is seen, divided by
    0.8 and capped at 1 (seen in 80 % of the frames is enough); the mean over named colours.
    ``extraneous``: 1 minus the largest fraction of frames in which a palette colour the caption does
    not name is seen (a persistent extra or wrong-coloured ball drives it to 0).
    ``motion``: per named ball the product of the checks its motion words ask for, then the mean over
    balls. ``falls``: the ball goes down by 0.1 H (partial credit below). ``bounces``: at least one
    bounce is seen (the ball comes down to a lowest point within reach of the floor, then rises again
    by at least 0.5 px; tiny late bounces are not countable through compression, so the count is not
    checked). ``thrown`` / ``rolls to the left/right``: the ball travels 0.15 W that way (partial credit
    below) and further that way than the other way; a rolling ball also stays on the floor (bottom
    within 2 px of it). ``rest(s) on the floor``: the ball never moves more than 1.5 px from where it
    starts (linearly penalised to 0 at 1.5 px + 0.05 H) and stays on the floor. ``collide``: the two
    balls come within their radii sum + 3 px at an interior frame, having been at least 3 px further
    apart before, and separate (by 1 px) afterwards; ``hits the <colour> ball`` asks for the same
    contact, without the separation. Other words (walls, "slows down", "stops") are not checked.
    A wrong colour therefore scores presence 0 (and extraneous 0); a static clip of a moving prompt
    scores motion 0.

PC (physical commonsense), the product of five scores in [0, 1]
    ``size``: the fraction of a ball's frames whose area is within a factor 1.6 of its median area.
    ``count``: the fraction of frame transitions in which no ball appears or vanishes away from the
    image border (a blob within its radius + 2 px of the border may enter or leave).
    ``teleport``: the fraction of consecutive-frame steps shorter than 0.35 max(H, W).
    ``floor``: the fraction of ball frames whose bottom (centroid + equivalent radius) is at most
    ``max(1, r / 4)`` px below the floor surface.
    ``acceleration``: the fraction of frames whose acceleration (second difference of the centroid,
    px/frame^2) is explained. Gravity g is the median vertical acceleration of the frames with no floor,
    wall or other ball within reach (reach: the frame's largest speed component, capped at 0.15
    max(H, W), plus 2 px) and must point down (``g >= 0.1 H / 64``). Airborne frames must match it
    (``|a_y - g| <= tol`` and ``|a_x| <= tol``, ``tol = 1.2 + 0.3 g``: 1.2 px/frame^2 is the noise of a
    second difference of compressed centroids); frames on the floor must have ``|a_x|, |a_y| <= 1.2``.
    Contacts explain the rest: within reach of the floor an upward kick (``a_y < g``), within reach of
    a wall a horizontal kick away from it, within reach of another ball a kick (``a - g``) pointing away
    from it. The score is ``1 - 1.5 * (1 - fraction)``, floored at 0 (a third of the frames unexplained
    halves it): time-shuffled clips fail here (and at ``teleport``).
    The product, not the mean, so one broken law is enough to fail. A video with no tracked ball has
    PC 0 (nothing to judge is not a pass).

Joint
    1.0 when ``sa >= 0.5`` and ``pc >= 0.5`` (`JOINT_THRESHOLD`), else 0.0: VideoPhy2's "both judged
    good" rule; the mean over videos is the Joint rate.

motion
    The mean per-frame displacement of the tracked centroids, in pixels per frame (not normalised): 0 for
    a static video; the playground's moving clips score about 1 to 6 at 64x64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moalign.data.manifest import text_lines
from moalign.errors import MoalignError
from moalign.playground.captions import BallClaim, parse_caption
from moalign.playground.tracking import Track, estimate_floor_y, track_balls
from moalign.run.atomic import write_json

JOINT_THRESHOLD = 0.5  # a video counts (Joint = 1) when both SA and PC reach this


# PC constants (pixels and frames)
_TELEPORT_FRAC = 0.35  # a step longer than this fraction of max(H, W) is a teleport


_SIZE_FACTOR = 1.6  # area within [median / f, median * f]


_ACC_TOL = 1.2  # px/frame^2: noise of a second difference of centroids after compression


_ACC_REL = 0.3  # plus this fraction of gravity


_ACC_PENALTY = 1.5  # acceleration score = 1 - 1.5 * unexplained fraction


def _segments(present: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive present frames as (start, stop) half-open intervals."""
    out, start = [], None
    for t, p in enumerate(list(present) + [False]):
        if p and start is None:
            start = t
        elif not p and start is not None:
            out.append((start, t))
            start = None
    return out


def _frac(ok: list[bool]) -> float:
    return float(np.mean(ok)) if ok else 1.0


def _physics_scores(tracks: list[Track], floor_y: float, h: int, w: int) -> dict[str, float]:
    """PC sub-scores (see the module docstring) for the tracked balls."""
    size_ok, count_ok, jump_ok, floor_ok = [], [], [], []
    step_max = _TELEPORT_FRAC * max(h, w)
    for tr in tracks:
        p = tr.present
        if not p.any():
            continue
        med = float(np.nanmedian(tr.area))
        a = tr.area[p]
        size_ok += list((a <= med * _SIZE_FACTOR) & (a >= med / _SIZE_FACTOR))
        r = tr.radius
        bottom = tr.centre[p, 1] + r[p]
        floor_ok += list(bottom <= floor_y + np.maximum(1.0, 0.25 * r[p]))
        for t in range(len(p) - 1):
            if p[t] and p[t + 1]:
                jump_ok.append(bool(np.linalg.norm(tr.centre[t + 1] - tr.centre[t]) < step_max))
            if p[t] != p[t + 1]:  # appears or vanishes: fine only at the image border
                s = t if p[t] else t + 1
                x, y = tr.centre[s]
                m = r[s] + 2.0
                count_ok.append(bool(x < m or y < m or x > w - 1 - m or y > h - 1 - m))
    t_len = len(tracks[0].present) if tracks else 0
    transitions = max(1, t_len - 1) * max(1, len(tracks))
    count = 1.0 - (len(count_ok) - sum(count_ok)) / transitions
    return {
        "size": _frac(size_ok),
        "count": max(0.0, count),
        "teleport": _frac(jump_ok),
        "floor": _frac(floor_ok),
        "acceleration": _acceleration_score(tracks, floor_y, h, w),
    }


def _acceleration_score(tracks: list[Track], floor_y: float, h: int, w: int) -> float:
    """Fraction of frames whose acceleration is gravity, rest or a contact kick, mapped by `_ACC_PENALTY`.

    Two passes: gravity g is the median vertical acceleration of the frames free of any contact (no
    floor, wall or other ball within reach); then every frame is judged against it.
    """
    reach_cap = 0.15 * max(h, w)
    rows = []  # (ax, ay, on_floor, near_floor, wall_sign, away_from_other or None)
    for tr in tracks:
        r = tr.radius
        for s, e in _segments(tr.present):
            for t in range(s + 1, e - 1):
                c0, c1, c2 = tr.centre[t - 1], tr.centre[t], tr.centre[t + 1]
                v_in, v_out = c1 - c0, c2 - c1
                ax, ay = (v_out - v_in).tolist()
                reach = min(float(max(np.abs(v_in).max(), np.abs(v_out).max())), reach_cap) + 2.0
                gaps = [floor_y - (tr.centre[k, 1] + r[k]) for k in (t - 1, t, t + 1)]
                x = tr.centre[t, 0]
                # +1: the left wall can push right, -1: the right wall can push left, 0: no wall in reach
                wall = 1 if x - r[t] <= -0.5 + reach else (-1 if x + r[t] >= w - 0.5 - reach else 0)
                away = None
                for o in tracks:
                    if o is tr:
                        continue
                    for k in (t - 1, t, t + 1):
                        if o.present[k]:
                            gap = np.linalg.norm(o.centre[k] - tr.centre[k]) - r[k] - o.radius[k]
                            if gap <= reach:
                                away = tr.centre[k] - o.centre[k]  # a contact pushes along this
                rows.append((ax, ay, max(gaps) <= 1.5, min(gaps) <= reach, wall, away))
    if not rows:
        return 1.0
    free = [ay for ax, ay, on_f, near_f, wall, away in rows if not near_f and not wall and away is None]
    g = float(np.median(free)) if free else None
    g_ok = g is not None and g >= 0.1 * h / 64.0  # airborne balls must fall
    tol = _ACC_TOL + _ACC_REL * abs(g or 0.0)
    verdicts = []
    for ax, ay, on_floor, near_floor, wall, away in rows:
        ax_ok = abs(ax) <= tol or (wall != 0 and ax * wall > 0)  # a wall only pushes away from itself
        if on_floor:
            ok = abs(ay) <= _ACC_TOL and (abs(ax) <= _ACC_TOL or (wall != 0 and ax * wall > 0))
        else:
            ok = g is not None and g_ok and abs(ay - g) <= tol and ax_ok
            if near_floor and not ok:  # a bounce inside the interval: the floor pushes up, less than g
                ok = ay < (g if g is not None else 0.0) and ax_ok
        if away is not None and not ok:  # a ball-ball contact pushes each ball away from the other
            kick = np.array([ax, ay - (g if g is not None and not on_floor else 0.0)])
            ok = float(kick @ away) > 0.0
        verdicts.append(bool(ok))
    return max(0.0, 1.0 - _ACC_PENALTY * (1.0 - float(np.mean(verdicts))))


def _motion_check(
    claim: BallClaim, tr: Track, tracks: dict[str, Track], floor_y: float, h: int, w: int
) -> dict:
    """The motion sub-scores one ball's caption words ask for, each in [0, 1]."""
    p = tr.present
    out: dict[str, float] = {}
    if not p.any():
        return {"seen": 0.0}
    c = tr.centre[p]
    r = tr.radius[p]
    x, y = c[:, 0], c[:, 1]
    gaps = floor_y - (y + r)
    if claim.action == "falls":
        out["falls"] = float(np.clip((y.max() - y[0]) / (0.1 * h), 0.0, 1.0))
    if claim.bounces > 0:
        out["bounces"] = 1.0 if _count_bounces(y, gaps) >= 1 else 0.0
    if claim.action in ("thrown", "rolls"):
        s = 1.0 if claim.direction == "right" else -1.0
        along = s * (x - x[0])
        progress, against = float(along.max()), float((-along).max())
        score = float(np.clip(progress / (0.15 * w), 0.0, 1.0))
        out[claim.action] = score if progress > against else 0.0
        if claim.action == "rolls":
            out["on_floor"] = float(np.mean(gaps <= 2.0))
    if claim.action == "rests":
        drift = float(np.linalg.norm(c - c[0], axis=1).max())
        out["rests"] = float(np.clip(1.0 - (drift - 1.5) / (0.05 * h), 0.0, 1.0))
        out["on_floor"] = float(np.mean(gaps <= 2.0))
    for other in claim.partners:
        if other in tracks:
            out[f"contact_{other}"] = _contact_score(
                tr, tracks[other], need_separation=claim.action == "collide"
            )
        else:
            out[f"contact_{other}"] = 0.0
    if not out:  # no motion word recognised: presence alone decides
        out["unchecked"] = 1.0
    return out


def _count_bounces(y: np.ndarray, gaps: np.ndarray) -> int:
    """Lowest points (largest y) within reach of the floor, reached going down and left going up >= 0.5 px."""
    n = 0
    for t in range(1, len(y) - 1):
        if y[t] >= y[t - 1] and y[t] > y[t + 1] and y[t] - y[t + 1 :].min() >= 0.5:
            speed = max(abs(y[t] - y[t - 1]), abs(y[t + 1] - y[t]))
            if gaps[t] <= speed + 2.0 and y[t] - y[:t].min() >= 0.5:  # came down to it
                n += 1
    return n


def _contact_score(a: Track, b: Track, need_separation: bool) -> float:
    """1 when balls a and b touch at an interior frame after approaching (and separate, if asked)."""
    both = a.present & b.present
    if both.sum() < 3:
        return 0.0
    idx = np.flatnonzero(both)
    d = np.linalg.norm(a.centre[idx] - b.centre[idx], axis=1)
    reach = a.radius[idx] + b.radius[idx] + 3.0
    for k in np.flatnonzero(d <= reach):  # the first contact that follows an approach counts
        if k == 0 or d[:k].max() < d[k] + 3.0:
            continue
        if need_separation and (k == len(d) - 1 or d[k + 1 :].max() < d[k] + 1.0):
            continue
        return 1.0
    return 0.0


def judge_video(frames: np.ndarray, caption: str, fps: float = 8.0) -> dict[str, Any]:
    """Score one video against its prompt: SA, PC, Joint and motion amount (rules in the module docstring).

    Args:
        frames: uint8 (T, H, W, 3) RGB, T >= 1.
        caption: the prompt, in the playground's caption grammar.
        fps: frame rate, recorded in the details; every rule works in pixels and frames.

    Returns:
        ``{"sa", "pc", "joint", "motion", "details"}``: sa and pc in [0, 1], joint 0.0 or 1.0, motion in
        pixels per frame; details holds every sub-score, the named and seen colours and the floor line.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t_len, h, w, _ = frames.shape
    claims = parse_caption(caption)
    tracks = track_balls(frames)
    floor_y = estimate_floor_y(frames)
    named = [c.colour for c in claims]

    presence = []
    for colour in named:
        tr = tracks.get(colour)
        frac = float(np.mean(tr.present & (tr.blobs == 1))) if tr is not None else 0.0
        presence.append(min(1.0, frac / 0.8))
    presence_score = float(np.mean(presence)) if presence else 0.0
    extra = [float(tr.present.mean()) for name, tr in tracks.items() if name not in named]
    extraneous_score = 1.0 - max(extra, default=0.0)
    motion_checks = {}
    for claim in claims:
        if claim.colour in tracks:
            motion_checks[claim.colour] = _motion_check(claim, tracks[claim.colour], tracks, floor_y, h, w)
        else:
            motion_checks[claim.colour] = {"unknown_colour": 0.0}
    per_ball = [float(np.prod(list(v.values()))) for v in motion_checks.values()]
    motion_score = float(np.mean(per_ball)) if per_ball else 0.0
    sa = presence_score * extraneous_score * motion_score

    # every colour seen in at least a quarter of the frames is an object for PC
    seen = [
        tr for tr in tracks.values() if tr.present.mean() >= 0.25 or (tr.colour in named and tr.present.any())
    ]
    physics = _physics_scores(seen, floor_y, h, w)
    pc = float(np.prod(list(physics.values()))) if seen else 0.0

    steps = []
    for tr in seen:
        both = tr.present[1:] & tr.present[:-1]
        steps += list(np.linalg.norm(tr.centre[1:] - tr.centre[:-1], axis=1)[both])
    motion = float(np.mean(steps)) if steps else 0.0
    joint = 1.0 if sa >= JOINT_THRESHOLD and pc >= JOINT_THRESHOLD else 0.0
    details = {
        "named_colours": named,
        "seen_colours": [tr.colour for tr in seen],
        "presence": presence_score,
        "extraneous": extraneous_score,
        "motion_checks": motion_checks,
        "physics": physics,
        "floor_y": floor_y,
        "num_frames": t_len,
        "fps": fps,
    }
    return {"sa": float(sa), "pc": pc, "joint": joint, "motion": motion, "details": details}


def judge_folder(videos_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Judge every video of a folder against its caption and write the scores as JSON.

    Args:
        videos_dir: a folder with ``metadata.jsonl``: one JSON object a line with ``video`` (a path
            relative to the folder) and ``caption`` (a playground folder is one).
        out: where to write the JSON (atomically); default ``videos_dir/judge.json``.

    Returns:
        ``{"videos": [{"video", "sa", "pc", "joint", "motion"}, ...], "aggregate": {"sa", "pc", "joint",
        "motion", "num_videos"}}`` (aggregate values are means over videos; joint's mean is the Joint rate).

    Raises:
        MoalignError: the manifest is missing, not JSON lines or lacks a field, or a video is missing or
            cannot be decoded (the message names the file).
    """
    from moalign.data.video_io import read_video

    root = Path(videos_dir)
    manifest = root / "metadata.jsonl"
    if not manifest.is_file():
        raise MoalignError(
            f"{manifest} not found: judge needs a folder with a metadata.jsonl whose lines hold "
            '"video" (path relative to the folder) and "caption".'
        )
    rows = []
    for n, line in enumerate(text_lines(manifest), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoalignError(
                f"{manifest} line {n} is not valid JSON ({err}). Fix or remove that line."
            ) from err
        if not isinstance(row, dict) or "video" not in row or "caption" not in row:
            raise MoalignError(f'{manifest} line {n} needs "video" and "caption" fields. Add them.')
        rows.append(row)
    if not rows:
        raise MoalignError(f'{manifest} lists no videos. Add lines with "video" and "caption".')
    results = []
    for row in rows:
        path = root / row["video"]
        frames, fps = read_video(path)  # raises MoalignError naming the file
        scores = judge_video(frames, str(row["caption"]), fps=fps)
        results.append({"video": str(row["video"])} | {k: scores[k] for k in ("sa", "pc", "joint", "motion")})
    aggregate: dict[str, Any] = {
        k: float(np.mean([r[k] for r in results])) for k in ("sa", "pc", "joint", "motion")
    }
    aggregate["num_videos"] = len(results)
    report = {"videos": results, "aggregate": aggregate}
    write_json(Path(out) if out is not None else root / "judge.json", report)
    return report
