"""`moalign synth`: write a playground dataset (videos, exact flow, captions, manifest).

Files (`write_playground`)
    ``videos/clip_{i:05d}.mp4`` (H.264), ``flow/clip_{i:05d}.safetensors`` (``flow`` float32 (T-1, H, W, 2),
    x then y, pixels; ``valid`` uint8 (T-1, H, W)), ``metadata.jsonl`` (one row per clip, states inline)
    and ``playground.json`` (the resolved config). Same config, same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moalign.data.video_io import write_video
from moalign.errors import MoalignError
from moalign.playground.render import exact_flow, render_scene
from moalign.playground.scenes import SynthConfig, simulate_scene
from moalign.run import console
from moalign.run.atomic import save_safetensors, write_json, write_jsonl
from moalign.run.serialize import to_dict


@dataclass
class Clip:
    """One rendered clip with its exact flow and ground truth."""

    frames: np.ndarray  # uint8 (T, H, W, 3)
    flow: np.ndarray  # float32 (T-1, H, W, 2): forward flow frame t -> t+1, pixels, x then y
    valid: np.ndarray  # bool (T-1, H, W)
    states: list[list[dict]]  # per frame, per object: id, shape, colour, rgb, x, y, vx, vy, radius, on_floor
    caption: str
    meta: dict  # motion, num_balls, colours, bounces, collisions, events, physics, draw_order, seed, index


def make_clip(cfg: SynthConfig, index: int) -> Clip:
    """Simulate, render and compute the exact flow of clip `index`.

    Args:
        cfg: the playground config.
        index: clip number; the clip depends on (cfg.seed, index) only, not on cfg.num_clips or other clips.

    Returns:
        The `Clip` (uint8 frames, exact flow and validity, per-frame states, caption, metadata).
    """
    scene = simulate_scene(cfg, index)
    render = render_scene(scene)
    flow, valid = exact_flow(scene, render.labels)
    frames = np.rint(render.frames * 255.0).astype(np.uint8)  # (T, H, W, 3)
    return Clip(
        frames=frames, flow=flow, valid=valid, states=scene.states, caption=scene.caption, meta=scene.meta
    )


def _manifest_row(cfg: SynthConfig, index: int, scene_meta: dict, caption: str, states: list) -> dict:
    name = f"clip_{index:05d}"
    meta = scene_meta
    return {
        "id": name,
        "video": f"videos/{name}.mp4",
        "flow": f"flow/{name}.safetensors",
        "caption": caption,
        "motion": meta["motion"],
        "num_frames": cfg.num_frames,
        "fps": cfg.fps,
        "height": cfg.height,
        "width": cfg.width,
        "seed": cfg.seed,
        "index": index,
        "num_balls": meta["num_balls"],
        "colours": meta["colours"],
        "bounces": meta["bounces"],
        "collisions": meta["collisions"],
        "physics": meta["physics"],
        "events": meta["events"],
        "states": states,
    }


def _check_folder(out_dir: Path, cfg: SynthConfig) -> None:
    """Refuse to mix clips of different configs in one folder (a resume must see the same config)."""
    cfg_path = out_dir / "playground.json"
    if cfg_path.is_file():
        try:
            stored = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MoalignError(
                f"{cfg_path} is unreadable ({err}). Use a new --out folder or delete {out_dir}."
            ) from err
        new = to_dict(cfg)
        # clip i does not depend on num_clips, so a folder can grow or be reused for fewer clips
        diff = sorted(k for k in set(stored) | set(new) if k != "num_clips" and stored.get(k) != new.get(k))
        if diff:
            raise MoalignError(
                f"{out_dir} already holds a playground written with a different config (differs in: "
                f"{', '.join(diff)}). Use a new --out folder or delete {out_dir}."
            )
    elif (out_dir / "metadata.jsonl").exists():
        raise MoalignError(
            f"{out_dir} holds a metadata.jsonl but no playground.json, so it is not a playground folder this "
            f"code wrote. Use a new --out folder or delete {out_dir}."
        )


def write_playground(out_dir: str | os.PathLike, cfg: SynthConfig, progress: bool = True) -> list[dict]:
    """Write `cfg.num_clips` clips: mp4 videos, exact flow files and a caption manifest.

    Files (relative to `out_dir`): ``videos/clip_{i:05d}.mp4``, ``flow/clip_{i:05d}.safetensors``
    (``flow`` float32 (T-1, H, W, 2), ``valid`` uint8 (T-1, H, W)), ``metadata.jsonl`` (one row per clip:
    id, video, flow, caption, motion, num_frames, fps, height, width, seed, index, num_balls, colours,
    bounces, collisions, physics, events, states) and ``playground.json`` (the resolved config). Every
    write is atomic and the same config gives byte-identical files. A folder written earlier with the
    same config is resumed: clips whose video and flow files exist are not rendered again.

    Args:
        out_dir: output folder (created if missing).
        cfg: the playground config.
        progress: show a progress bar (on the main process).

    Returns:
        The manifest rows, in clip order.

    Raises:
        MoalignError: `out_dir` holds a playground written with a different config (num_clips aside).
    """
    import torch

    out_dir = Path(out_dir)
    cfg = cfg.resolved()
    _check_folder(out_dir, cfg)
    # written first, so an interrupted run can be resumed (and checked) later
    write_json(out_dir / "playground.json", to_dict(cfg))
    rows = []
    for i in console.progress(range(cfg.num_clips), desc="playground", unit="clip", enabled=progress):
        video = out_dir / "videos" / f"clip_{i:05d}.mp4"
        flow_path = out_dir / "flow" / f"clip_{i:05d}.safetensors"
        if video.is_file() and flow_path.is_file():  # atomic writes: a file that exists is complete
            scene = simulate_scene(cfg, i)
            rows.append(_manifest_row(cfg, i, scene.meta, scene.caption, scene.states))
            continue
        clip = make_clip(cfg, i)
        write_video(video, clip.frames, fps=cfg.fps, crf=cfg.crf)
        save_safetensors(
            flow_path,
            {"flow": torch.from_numpy(clip.flow), "valid": torch.from_numpy(clip.valid.astype(np.uint8))},
        )
        rows.append(_manifest_row(cfg, i, clip.meta, clip.caption, clip.states))
    write_jsonl(out_dir / "metadata.jsonl", rows)
    return rows
