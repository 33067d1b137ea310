"""Video clip datasets: manifests, deterministic frame sampling, resize + centre crop, ground-truth flow.

One loader serves real data and the synthetic playground. A dataset is a folder with a manifest, found in
this order:

1. ``metadata.jsonl``: one JSON object a line (the format the playground writes);
2. ``metadata.csv``: the same columns, with a header row;
3. ``prompts.txt`` + ``videos.txt``: line-aligned captions and video paths (the diffusers / finetrainers
   convention).

Every clip is a deterministic window of ``num_frames`` frames (no random crops in time or space), so
cached teacher targets and flow fields stay aligned with the frames they were computed from. Frames are
resized so they cover the target size, then centre-cropped; ground-truth flow gets exactly the same
geometric transform (vectors scaled by the resize factor of each axis, then cropped).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from moalign.errors import MoalignError

logger = logging.getLogger(__name__)

VIDEO_COLUMNS = ("video", "video_path", "path", "file_name", "file")
CAPTION_COLUMNS = ("caption", "prompt", "text", "title")
FLOW_COLUMN = "flow"
WINDOWS = ("start", "center")

_SKIP_HINT = "or pass --skip-bad-videos (DataConfig.skip_bad_videos=True) to skip such videos and count them"


@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from videos.

    Args:
        num_frames: frames per clip; must be 4k+1 (what the CogVideoX / Wan VAEs accept).
        height, width: clip size after resize + centre crop; multiples of 16.
        fps: sample the window at this frame rate (nearest frames, fractional strides allowed);
            None takes consecutive frames at the video's native rate.
        window: "start" (first frames of the video) or "center" (middle of the video).
        skip_bad_videos: False: an unreadable or too-short video raises MoalignError naming the file;
            True: such videos are probed at dataset construction, dropped and recorded in `skipped`.
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    fps: float | None = None
    window: str = "start"
    skip_bad_videos: bool = False

    def __post_init__(self) -> None:
        n = self.num_frames
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or (n - 1) % 4:
            lo = max(1, (int(n) - 1) // 4 * 4 + 1) if isinstance(n, int | float) and n >= 1 else 1
            raise MoalignError(
                f"num_frames={n!r} is not of the form 4k+1, which the video VAEs need. "
                f"Use --num-frames {lo} or {lo + 4} (e.g. 17, 49 or 81)."
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or v % 16:
                near = max(16, int(round(v / 16)) * 16) if isinstance(v, int | float) and v > 0 else 64
                raise MoalignError(
                    f"{name}={v!r} is not a positive multiple of 16 (VAE downsampling x patch size). "
                    f"Use --{name} {near}."
                )
        if self.fps is not None and not (isinstance(self.fps, int | float) and math.isfinite(self.fps)):
            raise MoalignError(f"fps={self.fps!r} is not a number. Pass a positive --fps or leave it unset.")
        if self.fps is not None and self.fps <= 0:
            raise MoalignError(
                f"fps={self.fps!r} must be positive. Pass a positive --fps, or leave it unset for the "
                "native frame rate."
            )
        if self.window not in WINDOWS:
            raise MoalignError(
                f"window={self.window!r} is not one of {', '.join(WINDOWS)}. Pick one of those."
            )


@dataclass(frozen=True)
class ClipRecord:
    """One row of a manifest.

    Args:
        index: row number in the manifest (0-based, counting rows that hold a clip).
        video: absolute path of the video file.
        caption: the text prompt.
        flow: ground-truth flow safetensors (playground manifests have it), else None.
        extra: the rest of the row (e.g. the playground's 'states', 'motion', 'fps').
        source: where the row came from ("/data/metadata.jsonl:3"), for error messages.
    """

    index: int
    video: Path
    caption: str
    flow: Path | None = None
    extra: dict = field(default_factory=dict)
    source: str = ""


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike) -> list[ClipRecord]:
    """Read the clip list of a dataset folder.

    Looks, in this order, for ``metadata.jsonl``, ``metadata.csv``, then ``prompts.txt`` + ``videos.txt``.
    Video column: first of video, video_path, path, file_name, file; caption column: first of caption,
    prompt, text, title; optional ``flow`` column. Relative paths are relative to the manifest's folder.

    Args:
        root: the dataset folder, or the path of a ``.jsonl`` / ``.csv`` manifest itself.

    Returns:
        One ClipRecord per row, in manifest order, with absolute paths.

    Raises:
        MoalignError: no manifest, a malformed line, a missing column, an empty manifest, or
            prompts.txt and videos.txt of different lengths; the message names the file and line.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix == ".jsonl":
            return _read_jsonl(root.resolve())
        if root.suffix == ".csv":
            return _read_csv(root.resolve())
        raise MoalignError(
            f"{root} is not a dataset folder or a .jsonl/.csv manifest. Pass the folder that holds "
            "metadata.jsonl, metadata.csv or prompts.txt + videos.txt."
        )
    if not root.is_dir():
        raise MoalignError(f"dataset folder not found: {root}. Check the --data path.")
    root = root.resolve()
    if (root / "metadata.jsonl").is_file():
        return _read_jsonl(root / "metadata.jsonl")
    if (root / "metadata.csv").is_file():
        return _read_csv(root / "metadata.csv")
    prompts, videos = root / "prompts.txt", root / "videos.txt"
    if prompts.is_file() and videos.is_file():
        return _read_txt_pair(prompts, videos)
    if prompts.is_file() or videos.is_file():
        have, lack = (prompts, videos) if prompts.is_file() else (videos, prompts)
        raise MoalignError(
            f"{root} has {have.name} but no {lack.name}. Add {lack} (one line per clip, aligned with "
            f"{have.name}) or write a metadata.jsonl / metadata.csv instead."
        )
    raise MoalignError(
        f"no dataset manifest in {root}: looked for metadata.jsonl, metadata.csv, and prompts.txt + "
        "videos.txt. Add one of them (one clip per line/row with a video path and a caption), or point "
        "--data at the right folder."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MoalignError(f"{path} is not UTF-8 text ({err}). Re-save it as UTF-8.") from err


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _record(row: dict, index: int, source: str, base: Path) -> ClipRecord:
    """Turn one manifest row into a ClipRecord; errors name `source` (file:line)."""
    vkey = next((k for k in VIDEO_COLUMNS if k in row), None)
    if vkey is None:
        raise MoalignError(
            f"{source}: no video column. Accepted names: {', '.join(VIDEO_COLUMNS)}; the row has: "
            f"{', '.join(map(str, row)) or 'nothing'}. Rename the column holding the video path."
        )
    ckey = next((k for k in CAPTION_COLUMNS if k in row), None)
    if ckey is None:
        raise MoalignError(
            f"{source}: no caption column. Accepted names: {', '.join(CAPTION_COLUMNS)}; the row has: "
            f"{', '.join(map(str, row))}. Rename the column holding the caption."
        )
    video = row[vkey]
    if not isinstance(video, str) or not video.strip():
        raise MoalignError(
            f"{source}: empty or non-text video path in column '{vkey}' ({video!r}). Fix the row."
        )
    caption = row[ckey]
    caption = "" if caption is None else str(caption)
    flow = row.get(FLOW_COLUMN)
    if flow is not None and not isinstance(flow, str):
        raise MoalignError(f"{source}: the 'flow' column must be a path, got {flow!r}. Fix the row.")
    flow_path = _resolve(base, flow.strip()) if flow and flow.strip() else None
    extra = {k: v for k, v in row.items() if k not in (vkey, ckey, FLOW_COLUMN)}
    return ClipRecord(index, _resolve(base, video.strip()), caption, flow_path, extra, source)


def _empty(path: Path) -> MoalignError:
    return MoalignError(f"{path} lists no clips. Add one clip per line (a video path and a caption).")


def _read_jsonl(path: Path) -> list[ClipRecord]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoalignError(
                f"{source}: malformed JSON ({err.msg} at column {err.colno}). Each line of a .jsonl "
                "manifest must be one JSON object; fix or remove that line."
            ) from err
        if not isinstance(row, dict):
            raise MoalignError(
                f"{source}: expected a JSON object {{...}}, got {type(row).__name__}. Fix the line."
            )
        records.append(_record(row, len(records), source, path.parent))
    if not records:
        raise _empty(path)
    return records


def _read_csv(path: Path) -> list[ClipRecord]:
    reader = csv.DictReader(_read_text(path).splitlines())
    header = reader.fieldnames or []
    if not header:
        raise _empty(path)
    for names, what in ((VIDEO_COLUMNS, "video"), (CAPTION_COLUMNS, "caption")):
        if not any(n in header for n in names):
            raise MoalignError(
                f"{path}:1: the header has no {what} column. Accepted names: {', '.join(names)}; the header "
                f"is: {', '.join(header)}. Rename that column in the header row."
            )
    records = []
    for row in reader:
        source = f"{path}:{reader.line_num}"
        if None in row:
            raise MoalignError(
                f"{source}: the row has more fields than the header ({len(header)}). Quote fields that "
                'contain commas, e.g. "a red ball, then a blue one".'
            )
        if any(v is None for v in row.values()):
            raise MoalignError(
                f"{source}: the row has fewer fields than the header ({len(header)}). Fix the row."
            )
        records.append(_record(row, len(records), source, path.parent))
    if not records:
        raise _empty(path)
    return records


def _read_txt_pair(prompts: Path, videos: Path) -> list[ClipRecord]:
    def lines(p: Path) -> list[str]:
        out = _read_text(p).splitlines()
        while out and not out[-1].strip():
            out.pop()
        return out

    captions, paths = lines(prompts), lines(videos)
    if len(captions) != len(paths):
        raise MoalignError(
            f"{prompts} has {len(captions)} lines but {videos} has {len(paths)}: they must be line-aligned "
            "(line i of prompts.txt is the caption of the video on line i of videos.txt). Fix the files."
        )
    if not paths:
        raise _empty(videos)
    records = []
    for i, (caption, video) in enumerate(zip(captions, paths, strict=True)):
        if not video.strip():
            raise MoalignError(
                f"{videos}:{i + 1}: empty video path. Fill the line or remove it (and its prompt)."
            )
        source = f"{videos}:{i + 1}"
        records.append(
            ClipRecord(i, _resolve(videos.parent, video.strip()), caption.strip(), None, {}, source)
        )
    return records


# ---------------------------------------------------------------------------------------------------
# Sampling in time
# ---------------------------------------------------------------------------------------------------


def _offsets(native_fps: float, cfg: DataConfig, video: Any = None) -> np.ndarray:
    """Frame offsets of the window from its first frame: int64 (num_frames,)."""
    n = cfg.num_frames
    if cfg.fps is None:
        return np.arange(n, dtype=np.int64)
    where = f"{video}: " if video is not None else ""
    if not (native_fps > 0 and math.isfinite(native_fps)):
        raise MoalignError(
            f"{where}the video has no usable frame rate ({native_fps!r}), so it cannot be sampled at "
            f"fps={cfg.fps:g}. Leave --fps unset (native rate) or re-encode it with a frame rate."
        )
    stride = native_fps / cfg.fps
    # nearest frame, ties rounded up; the epsilon keeps k * stride = x.4999999 from flipping
    offsets = np.floor(np.arange(n) * stride + 0.5 + 1e-9).astype(np.int64)
    if n > 1 and np.any(np.diff(offsets) == 0):
        raise MoalignError(
            f"{where}fps={cfg.fps:g} is above the video's native {native_fps:g} fps: frames would repeat. "
            f"Use --fps {native_fps:g} or lower, or leave --fps unset for the native rate, {_SKIP_HINT}."
        )
    return offsets


def is_consecutive(native_fps: float, cfg: DataConfig) -> bool:
    """Whether `cfg` samples consecutive native frames (what exact ground-truth flow needs)."""
    return cfg.fps is None or bool(np.array_equal(_offsets(native_fps, cfg), np.arange(cfg.num_frames)))


def sample_indices(
    num_available: int, native_fps: float, cfg: DataConfig, *, video: str | os.PathLike | None = None
) -> np.ndarray:
    """Frame indices of the deterministic clip window of a video.

    With ``cfg.fps=None`` the window is ``num_frames`` consecutive frames; otherwise it strides through
    time by ``native_fps / cfg.fps`` frames (nearest frame, fractional strides allowed). ``cfg.window``
    places it at the start or the centre of the video.

    Args:
        num_available: frames in the video.
        native_fps: the video's frame rate.
        cfg: the data config (num_frames, fps, window).
        video: the video's path, only for error messages.

    Returns:
        int64 array (cfg.num_frames,), strictly increasing, all in [0, num_available).

    Raises:
        MoalignError: the video is too short for the window, or cfg.fps is above the native rate.
    """
    offsets = _offsets(native_fps, cfg, video)
    span = int(offsets[-1]) + 1
    if num_available < span:
        raise MoalignError(_too_short(video, num_available, native_fps, cfg, span))
    start = 0 if cfg.window == "start" else (num_available - span) // 2
    return start + offsets


def _too_short(video: Any, num_available: int, native_fps: float, cfg: DataConfig, span: int) -> str:
    name = video if video is not None else "the video"
    if cfg.fps is None:
        how = "at the native rate"
    else:
        how = f"sampled at {cfg.fps:g} fps (every {native_fps / cfg.fps:.3g} frames)"
    fits = [k for k in range(cfg.num_frames, 0, -4) if _span(native_fps, cfg, k) <= num_available]
    lower = f"--num-frames {fits[0]}" if fits else "a lower --num-frames (4k+1)"
    fps_hint = " or a lower --fps" if cfg.fps is not None else " or a lower --fps (subsampling in time)"
    return (
        f"{name} has {num_available} frames at {native_fps:g} fps, but a clip of {cfg.num_frames} frames "
        f"{how} needs {span}. Use {lower}{fps_hint}, {_SKIP_HINT}."
    )


def _span(native_fps: float, cfg: DataConfig, n: int) -> int:
    if cfg.fps is None:
        return n
    return int(math.floor((n - 1) * native_fps / cfg.fps + 0.5 + 1e-9)) + 1


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _decode_errors(path: Path) -> Iterator[None]:
    """Turn PyAV's many error types into one MoalignError that names the file and the fix."""
    try:
        yield
    except MoalignError:
        raise
    except Exception as err:  # PyAV raises many error types for corrupt data
        raise MoalignError(
            f"cannot decode video {path}: {type(err).__name__}: {err}. The file is corrupt or not a video: "
            f"re-encode it (e.g. to H.264 mp4) or remove it from the dataset, {_SKIP_HINT}."
        ) from err


def _open_stream(container: Any, path: Path) -> tuple[Any, int, float]:
    """The first video stream, its header frame count (0 when unknown) and frame rate (0.0 when unknown)."""
    if not container.streams.video:
        raise MoalignError(
            f"{path} has no video stream. Remove it from the dataset or re-encode it, {_SKIP_HINT}."
        )
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return stream, int(stream.frames or 0), float(rate) if rate else 0.0


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MoalignError(
            f"video file not found: {path}. Fix the path in the dataset manifest, {_SKIP_HINT}."
        )


def _probe(path: Path) -> tuple[int, float]:
    """(num_frames, fps) cheaply: the header's frame count plus one decoded frame; a full decode only when
    the header has no count."""
    import av

    _check_file(path)
    with _decode_errors(path), av.open(str(path)) as container:
        stream, count, fps = _open_stream(container, path)
        frames = container.decode(stream)
        if next(frames, None) is None:
            raise MoalignError(f"{path} decoded to zero frames. Re-encode it or remove it, {_SKIP_HINT}.")
        if count <= 0:
            count = 1 + sum(1 for _ in frames)
    return count, fps


def _take(path: Path, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decode up to the last wanted frame; return the wanted frames and how many frames were seen."""
    import av

    wanted, last, kept, seen = set(indices.tolist()), int(indices[-1]), {}, 0
    with av.open(str(path)) as container:
        stream, _, _ = _open_stream(container, path)
        for i, frame in enumerate(container.decode(stream)):
            seen = i + 1
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return kept, seen


def read_clip(path: str | os.PathLike, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode the clip window of one video at its source resolution.

    Decodes only up to the last frame of the window when the header gives the frame count (or the window
    sits at the start); otherwise counts the frames first.

    Args:
        path: the video file.
        cfg: the data config (num_frames, fps, window).

    Returns:
        frames: uint8 (num_frames, H, W, 3) RGB at the video's own size.
        indices: int64 (num_frames,) frame indices of the window.
        fps: the video's native frame rate (0.0 when the file has none).

    Raises:
        MoalignError: missing, unreadable or too-short video; the message names the file and the fix.
    """
    import av

    path = Path(path)
    _check_file(path)
    with _decode_errors(path):
        with av.open(str(path)) as container:
            _, count, fps = _open_stream(container, path)
        if count <= 0 and cfg.window != "start":
            count, fps = _probe(path)  # the centre needs the length: count by decoding
        if count > 0:
            indices = sample_indices(count, fps, cfg, video=path)
        else:
            indices = _offsets(fps, cfg, path)  # start window: the length only matters if it is too short
        kept, seen = _take(path, indices)
        if len(kept) < len(indices):  # the stream ended early: the header over-counted, or there was none
            if seen == 0:
                raise MoalignError(f"{path} decoded to zero frames. Re-encode it or remove it, {_SKIP_HINT}.")
            indices = sample_indices(seen, fps, cfg, video=path)  # raises when too short
            if not set(indices.tolist()) <= kept.keys():
                kept, seen = _take(path, indices)
            if not set(indices.tolist()) <= kept.keys():
                raise MoalignError(
                    f"{path} decodes to a different number of frames each time. Re-encode it, {_SKIP_HINT}."
                )
    frames = np.stack([kept[i] for i in indices.tolist()])
    return frames, indices, fps


# ---------------------------------------------------------------------------------------------------
# Geometry: resize to cover, centre crop; the same for flow
# ---------------------------------------------------------------------------------------------------


def cover_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Resize + centre-crop geometry: (resized_h, resized_w, top, left).

    The source is scaled uniformly by max(dst_h / H, dst_w / W) so it covers the target, sizes rounded to
    whole pixels, then the centre dst_h x dst_w window is kept. A source pixel centre x maps to
    (x + 0.5) * resized_w / W - 0.5 - left in the target (likewise for y).
    """
    h, w = src_hw
    th, tw = dst_hw
    scale = max(th / h, tw / w)
    rh, rw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
    return rh, rw, (rh - th) // 2, (rw - tw) // 2


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize frames so they cover height x width, then crop the centre.

    cv2 INTER_AREA when shrinking (anti-aliased), INTER_CUBIC when enlarging. Frames already at the
    target size are returned unchanged (the same array).

    Args:
        frames: uint8 (T, H, W, 3).
        height, width: target size.

    Returns:
        uint8 (T, height, width, 3).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    rh, rw, top, left = cover_geometry((h, w), (height, width))
    if (rh, rw) != (h, w):
        interp = cv2.INTER_AREA if rh < h else cv2.INTER_CUBIC
        frames = np.stack([cv2.resize(f, (rw, rh), interpolation=interp) for f in frames])
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights: exact area averaging when shrinking, bilinear (half-pixel centres,
    edges clamped, as cv2 and torch align_corners=False) when enlarging. Rows sum to 1."""
    if n_out < n_in:
        scale = n_in / n_out
        lo = np.arange(n_out)[:, None] * scale
        i = np.arange(n_in)[None, :]
        overlap = np.minimum(lo + scale, i + 1) - np.maximum(lo, i)
        return np.clip(overlap, 0.0, None) / scale
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _resample(field: ArrayT, height: int, width: int) -> ArrayT:
    """Resample a (..., H, W, C) float field to (..., height, width, C); an axis already at size is left as is."""
    h, w, c = field.shape[-3:]
    lead = field.shape[:-3]
    is_torch = isinstance(field, torch.Tensor)
    x = field.reshape(-1, h, w * c)
    if h != height:
        m = _resample_matrix(h, height)
        m = torch.as_tensor(m, dtype=x.dtype, device=x.device) if is_torch else m.astype(x.dtype)
        x = m @ x  # (N, height, W * C)
    if w != width:
        m = _resample_matrix(w, width)
        m = torch.as_tensor(m, dtype=x.dtype, device=x.device) if is_torch else m.astype(x.dtype)
        x = m @ x.reshape(-1, w, c)  # (N * height, width, C)
    return x.reshape(*lead, height, width, c)


def resize_flow(flow: ArrayT, height: int, width: int) -> ArrayT:
    """Resize a flow field and rescale its vectors to the new pixel grid.

    Area averaging when shrinking an axis, bilinear when enlarging it (each axis on its own). The same
    weights are used for numpy and torch inputs, so both give the same numbers; torch inputs keep their
    device, dtype and autograd graph.

    Args:
        flow: (..., H, W, 2) float, x then y, in pixels (numpy array or torch tensor).
        height, width: target size.

    Returns:
        (..., height, width, 2) of the input's type, vectors scaled by (width / W, height / H). Unchanged
        (the same object) when the size already matches.
    """
    h, w = flow.shape[-3:-1]
    if flow.shape[-1] != 2:
        raise ValueError(f"flow must be (..., H, W, 2), got {tuple(flow.shape)}")
    if (h, w) == (height, width):
        return flow
    if not (
        flow.dtype.is_floating_point
        if isinstance(flow, torch.Tensor)
        else np.issubdtype(flow.dtype, np.floating)
    ):
        raise ValueError(f"flow must be a float array, got {flow.dtype}")
    out = _resample(flow, height, width)
    scale = [width / w, height / h]
    if isinstance(out, torch.Tensor):
        return out * torch.tensor(scale, dtype=out.dtype, device=out.device)
    return out * np.asarray(scale, dtype=out.dtype)


def transform_flow(flow: ArrayT, src_hw: tuple[int, int], cfg: DataConfig) -> ArrayT:
    """Apply to a flow field exactly the geometric transform `resize_center_crop` applies to the frames.

    Args:
        flow: (..., H, W, 2) float at the source video size (H, W) = src_hw, x then y, pixels.
        src_hw: the source video's (height, width).
        cfg: gives the target (cfg.height, cfg.width).

    Returns:
        (..., cfg.height, cfg.width, 2) of the input's type, vectors in target pixels. Unchanged (the same
        object) when the source already has the target size.
    """
    if tuple(flow.shape[-3:-1]) != tuple(src_hw):
        raise ValueError(
            f"flow of size {tuple(flow.shape[-3:-1])} does not match the video size {tuple(src_hw)}"
        )
    rh, rw, top, left = cover_geometry(src_hw, (cfg.height, cfg.width))
    if (rh, rw, top, left) == (*src_hw, 0, 0):
        return flow
    out = resize_flow(flow, rh, rw)[..., top : top + cfg.height, left : left + cfg.width, :]
    return out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)


def transform_valid(valid: np.ndarray, src_hw: tuple[int, int], cfg: DataConfig) -> np.ndarray:
    """Transform a flow validity mask (..., H, W) like `transform_flow`: a target pixel is valid only if
    every source pixel that contributes to it is valid. Returns bool (..., cfg.height, cfg.width)."""
    rh, rw, top, left = cover_geometry(src_hw, (cfg.height, cfg.width))
    v = np.asarray(valid).astype(np.float32)[..., None]
    v = _resample(v, rh, rw)[..., top : top + cfg.height, left : left + cfg.width, 0]
    return np.ascontiguousarray(v >= 1.0 - 1e-4)


# ---------------------------------------------------------------------------------------------------
# Ground-truth flow files
# ---------------------------------------------------------------------------------------------------


def _load_flow(
    path: Path, indices: np.ndarray, src_hw: tuple[int, int], cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flow (and validity) of the window's frame pairs, transformed to the target size."""
    from safetensors import safe_open

    if not path.is_file():
        raise MoalignError(
            f"flow file not found: {path}. Fix the 'flow' column of the manifest, or load the dataset "
            "with load_flow=False and compute flow with a flow method such as dis."
        )
    lo, hi = int(indices[0]), int(indices[-1])  # consecutive window: pairs lo..hi-1
    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
            if "flow" not in keys:
                raise MoalignError(
                    f"{path} has no tensor named 'flow' (it has: {', '.join(keys) or 'none'}). Ground-truth "
                    "flow files hold 'flow' float32 (T-1, H, W, 2) and optionally 'valid' uint8 (T-1, H, W)."
                )
            sl = f.get_slice("flow")
            shape = tuple(sl.get_shape())
            if len(shape) != 4 or shape[-1] != 2 or tuple(shape[1:3]) != tuple(src_hw) or shape[0] < hi:
                raise MoalignError(
                    f"{path}: 'flow' has shape {shape}, but the video is {src_hw[0]}x{src_hw[1]} and the clip "
                    f"needs pairs {lo}..{hi - 1}, i.e. a (>= {hi}, {src_hw[0]}, {src_hw[1]}, 2) tensor. "
                    "Regenerate the flow file for this video."
                )
            flow = np.asarray(sl[lo:hi], dtype=np.float32)
            valid = None
            if "valid" in keys:
                vs = f.get_slice("valid")
                if tuple(vs.get_shape()) != shape[:3]:
                    raise MoalignError(
                        f"{path}: 'valid' has shape {tuple(vs.get_shape())}, expected {shape[:3]}. Regenerate it."
                    )
                valid = np.asarray(vs[lo:hi]) != 0
    except MoalignError:
        raise
    except Exception as err:
        raise MoalignError(
            f"cannot read flow file {path}: {type(err).__name__}: {err}. It must be a safetensors file "
            "with a 'flow' tensor; regenerate it."
        ) from err
    flow = transform_flow(flow, src_hw, cfg)
    if valid is not None:
        valid = transform_valid(valid, src_hw, cfg)
    return flow, valid


# ---------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------


class VideoClipDataset(torch.utils.data.Dataset):
    """Deterministic video clips from a manifest folder.

    Items are dicts:
        index: int, the record's manifest row;
        frames: uint8 tensor (T, H, W, 3), RGB, T = cfg.num_frames, (H, W) = (cfg.height, cfg.width);
        caption: str; video: str (absolute path);
        frame_indices: int64 tensor (T,), the source frames of the clip;
        fps: float, the clip's frame rate (cfg.fps, or the native rate);
        flow: float32 tensor (T-1, H, W, 2), forward flow t -> t+1 in target pixels, when the record has a
            flow file and load_flow is True; flow_valid: bool tensor (T-1, H, W) when the file has `valid`.

    With cfg.skip_bad_videos, every video is probed at construction (header frame count and rate, first
    frame decoded) and missing, unreadable or too-short ones are dropped and listed in `skipped` as
    (video path, reason). A video that still fails to decode later raises; it is never substituted.

    Args:
        root: the dataset folder (see `read_manifest`).
        cfg: the data config.
        records: use these records instead of reading the manifest (e.g. a train/validation split).
        load_flow: load the ground-truth flow of records that have a flow file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cfg: DataConfig,
        records: list[ClipRecord] | None = None,
        load_flow: bool = True,
    ) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.load_flow = load_flow
        self.skipped: list[tuple[str, str]] = []
        records = read_manifest(root) if records is None else list(records)
        if not records:
            raise MoalignError(f"no clips to load from {root}: the record list is empty.")
        if load_flow:
            self._check_flow_records(records)
        if cfg.skip_bad_videos:
            records = self._drop_bad(records)
        else:
            missing = [r for r in records if not r.video.is_file()]
            if missing:
                shown = "; ".join(f"{r.video} ({r.source or f'row {r.index}'})" for r in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise MoalignError(
                    f"{len(missing)} of {len(records)} video files not found: {shown}{more}. Fix the paths "
                    f"in the manifest, {_SKIP_HINT}."
                )
        self.records = records

    def _check_flow_records(self, records: list[ClipRecord]) -> None:
        """Fail early on missing flow files, and on fps subsampling when the manifest states the rate."""
        for r in records:
            if r.flow is None:
                continue
            if not r.flow.is_file():
                raise MoalignError(
                    f"flow file not found: {r.flow} ({r.source or f'row {r.index}'}). Fix the 'flow' column, "
                    "or load the dataset with load_flow=False."
                )
            native = r.extra.get("fps")
            if isinstance(native, int | float) and native > 0 and not is_consecutive(float(native), self.cfg):
                raise MoalignError(_flow_needs_native(r.flow, float(native), self.cfg))

    def _drop_bad(self, records: list[ClipRecord]) -> list[ClipRecord]:
        def check(r: ClipRecord) -> str | None:
            try:
                count, fps = _probe(r.video)
                sample_indices(count, fps, self.cfg, video=r.video)
            except MoalignError as err:
                return str(err)
            return None

        workers = min(8, os.cpu_count() or 1, len(records))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check, records))
        kept = []
        for r, reason in zip(records, reasons, strict=True):
            if reason is None:
                kept.append(r)
            else:
                self.skipped.append((str(r.video), reason))
        if self.skipped:
            logger.warning(
                "skipped %d of %d videos (unreadable or too short); first: %s",
                len(self.skipped),
                len(records),
                self.skipped[0][1],
            )
        if not kept:
            raise MoalignError(
                f"all {len(records)} videos of {self.root} were skipped; the first because: {self.skipped[0][1]}"
            )
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        cfg = self.cfg
        frames, indices, fps = read_clip(rec.video, cfg)
        src_hw = (frames.shape[1], frames.shape[2])
        item = {
            "index": rec.index,
            "frames": torch.from_numpy(resize_center_crop(frames, cfg.height, cfg.width)),
            "caption": rec.caption,
            "video": str(rec.video),
            "frame_indices": torch.from_numpy(indices),
            "fps": float(cfg.fps if cfg.fps is not None else fps),
        }
        if rec.flow is not None and self.load_flow:
            if not is_consecutive(fps, cfg):
                raise MoalignError(_flow_needs_native(rec.flow, fps, cfg))
            flow, valid = _load_flow(rec.flow, indices, src_hw, cfg)
            item["flow"] = torch.from_numpy(flow)
            if valid is not None:
                item["flow_valid"] = torch.from_numpy(valid)
        return item


def _flow_needs_native(flow: Path, native_fps: float, cfg: DataConfig) -> str:
    return (
        f"{flow}: exact ground-truth flow is between consecutive native frames, but fps={cfg.fps:g} "
        f"subsamples this {native_fps:g} fps video (every {native_fps / cfg.fps:.3g} frames). Leave --fps "
        "unset (native rate, fps=None), or compute flow on the sampled frames with a flow method such as dis "
        "(load the dataset with load_flow=False)."
    )
