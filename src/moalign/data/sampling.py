"""Deterministic clip sampling and decoding: which frames of a video make a clip, read with PyAV.

Every clip is a deterministic window of ``num_frames`` frames (no random crops in time), so cached teacher
targets and flow fields stay aligned with the frames they were computed from.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moalign.errors import MoalignError


@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from videos.

    Args:
        num_frames: frames per clip; must be 4k+1 (what the CogVideoX / Wan VAEs accept) and at least
            `MIN_FRAMES` = 5 (stage 1's encoder drops frame 0 and needs whole tubelets of 2 from the rest).
        height, width: clip size after resize + centre crop; multiples of 16.
        fps: sample the window at this frame rate (nearest frames, fractional strides allowed);
            None takes consecutive frames at the video's native rate.
        window: "start" (first frames of the video) or "center" (middle of the video).
        skip_bad_videos: False: an unreadable or too-short video raises MoalignError naming the file;
            True: such videos are probed at dataset construction, dropped and recorded in `skipped`.
        caption_column, video_column: the exact manifest column holding the caption / video path (or, for
            the text-file layout, the file name, e.g. "prompt.txt"); None: the usual names
            (`moalign/data/manifest.py`). They choose which rows are read, not how a clip is cut.
        allow_empty_captions: False: a manifest row whose caption is empty, blank or null stops the dataset
            with an error naming the rows (`moalign.data.dataset.VideoClipDataset`); True: such clips are
            kept, counted in the log, and train as the empty prompt (unconditional), e.g. for
            classifier-free-guidance dropout done in the data. Like the columns, it decides which rows are
            accepted, not how a clip is cut.

    Raises:
        ValueError: a field is out of range (the message says which value to use instead).
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    fps: float | None = None
    window: str = "start"
    skip_bad_videos: bool = False
    caption_column: str | None = None
    video_column: str | None = None
    allow_empty_captions: bool = False

    def __post_init__(self) -> None:
        n = self.num_frames
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or (n - 1) % 4:
            lo = (int(n) - 1) // 4 * 4 + 1 if isinstance(n, int | float) and math.isfinite(n) else 0
            use = f"{lo} or {lo + 4}" if lo >= MIN_FRAMES else str(MIN_FRAMES)
            raise ValueError(
                f"num_frames={n!r} is not of the form 4k+1, which the video VAEs need. "
                f"Use --num-frames {use} (e.g. 17, 49 or 81)."
            )
        if n < MIN_FRAMES:
            raise ValueError(
                f"num_frames={n!r} is too few: stage 1's encoder drops frame 0 and needs whole tubelets of 2 "
                f"frames from the rest, so a clip has at least {MIN_FRAMES} frames. Use --num-frames "
                f"{MIN_FRAMES} (or more: 9, 17, 49, ...)."
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or v % 16:
                near = max(16, int(round(v / 16)) * 16) if isinstance(v, int | float) and v > 0 else 64
                raise ValueError(
                    f"{name}={v!r} is not a positive multiple of 16 (VAE downsampling x patch size). "
                    f"Use --{name} {near}."
                )
        if self.fps is not None and not (isinstance(self.fps, int | float) and math.isfinite(self.fps)):
            raise ValueError(f"fps={self.fps!r} is not a number. Pass a positive --fps or leave it unset.")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(
                f"fps={self.fps!r} must be positive. Pass a positive --fps, or leave it unset for the "
                "native frame rate."
            )
        if self.window not in WINDOWS:
            raise ValueError(f"window={self.window!r} is not one of {', '.join(WINDOWS)}. Pick one of those.")
        for name in ("caption_column", "video_column"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(
                    f"{name}={v!r} is not a column name. Pass the manifest column's name "
                    f"(--set data.{name}=NAME), or leave it unset (None) for the usual names."
                )
        if not isinstance(self.allow_empty_captions, bool):
            raise ValueError(
                f"allow_empty_captions={self.allow_empty_captions!r} is not True or False "
                "(--set data.allow_empty_captions=true)."
            )

    def describe(self) -> str:
        """'17 frames at 64x64, native fps': the clip geometry, as the commands print it."""
        fps = f"{self.fps:g} fps" if self.fps else "native fps"
        return f"{self.num_frames} frames at {self.height}x{self.width}, {fps}"


WINDOWS = ("start", "center")
# the fewest frames a clip may have: 4k+1 for the VAEs, and stage 1's encoder drops frame 0 and fills tubelets
# of 2 frames with the rest (`moalign/encoder.py`), so 1 frame gives it nothing
MIN_FRAMES = 5
# how a run asks for the native frame rate: `--fps` takes numbers only, and leaving it out keeps the preset's
NATIVE_FPS_FIX = "--set data.fps=None (the native rate; leaving --fps out keeps the preset's rate)"
# the DataConfig fields that decide which frames of a video a clip holds (its size aside): caches of the same
# clips agree on them (stage 2 pairs latents and teacher targets only then)
CLIP_FRAME_FIELDS = ("num_frames", "fps", "window")


_SKIP_HINT = "or pass --skip-bad-videos (DataConfig.skip_bad_videos=True) to skip such videos and count them"


def _or_skip(skip_bad_videos: bool) -> str:
    """The end of a bad-video fix: ", or pass --skip-bad-videos ...", or nothing when the run already skips
    (then the message is the reason a video was skipped, and the hint would be advice already taken)."""
    return "" if skip_bad_videos else f", {_SKIP_HINT}"


def _offsets(native_fps: float, cfg: DataConfig, video: Any = None) -> np.ndarray:
    """Frame offsets of the window from its first frame: int64 (num_frames,)."""
    n = cfg.num_frames
    if cfg.fps is None:
        return np.arange(n, dtype=np.int64)
    where = f"{video}: " if video is not None else ""
    if not (native_fps > 0 and math.isfinite(native_fps)):
        raise MoalignError(
            f"{where}the video has no usable frame rate ({native_fps!r}), so it cannot be sampled at "
            f"fps={cfg.fps:g}. Take consecutive frames with {NATIVE_FPS_FIX}, or re-encode it with a frame "
            f"rate{_or_skip(cfg.skip_bad_videos)}."
        )
    stride = native_fps / cfg.fps
    # nearest frame, ties rounded up; the epsilon keeps k * stride = x.4999999 from flipping
    offsets = np.floor(np.arange(n) * stride + 0.5 + 1e-9).astype(np.int64)
    if n > 1 and np.any(np.diff(offsets) == 0):
        raise MoalignError(
            f"{where}fps={cfg.fps:g} is above the video's native {native_fps:g} fps: frames would repeat. "
            f"Use --fps {_fps_text(native_fps)} or lower, or {NATIVE_FPS_FIX}"
            f"{_or_skip(cfg.skip_bad_videos)}."
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
    """The too-short error: what the clip needs, and only changes that make this video fit (each checked)."""
    name = video if video is not None else "the video"
    if cfg.fps is None:
        how = "at the native rate"
    else:
        how = f"sampled at {cfg.fps:g} fps (every {native_fps / cfg.fps:.3g} frames)"
    fixes = []
    fewer = next(
        (
            k
            for k in range(cfg.num_frames - 4, MIN_FRAMES - 1, -4)
            if _fits(num_available, native_fps, cfg, k)
        ),
        None,
    )
    if fewer is not None:
        fixes.append(f"--num-frames {fewer} (the most 4k+1 frames that fit)")
    faster = _fitting_fps(num_available, native_fps, cfg)
    if faster is not None:
        fixes.append(
            f"--fps {faster} (a higher rate spans less of the video; the native {native_fps:g} fps is the most)"
        )
    if cfg.skip_bad_videos:
        fix = f"Use {' or '.join(fixes)}, or remove it." if fixes else "Remove it from the dataset."
    elif fixes:
        fix = f"Use {' or '.join(fixes)}, remove it from the dataset, {_SKIP_HINT}."
    else:
        fix = f"Remove it from the dataset, {_SKIP_HINT}."
    return (
        f"{name} has {num_available} frames at {native_fps:g} fps, but a clip of {cfg.num_frames} frames "
        f"{how} needs {span}. {fix}"
    )


def _fits(num_available: int, native_fps: float, cfg: DataConfig, num_frames: int | None = None,
          fps: float | None = None) -> bool:  # fmt: skip
    """Whether `cfg` with `num_frames` / `fps` changed cuts a window from a video of `num_available` frames."""
    changed = replace(
        cfg,
        num_frames=cfg.num_frames if num_frames is None else num_frames,
        fps=cfg.fps if fps is None else fps,
    )
    try:
        return int(_offsets(native_fps, changed)[-1]) + 1 <= num_available
    except MoalignError:  # frames would repeat
        return False


def _fitting_fps(num_available: int, native_fps: float, cfg: DataConfig) -> str | None:
    """The lowest --fps (on a 0.1 grid, at most the native rate) at which the window fits, as typed; None when
    no rate fits (the video is shorter than num_frames) or the rate is not being chosen (cfg.fps is None)."""
    if (
        cfg.fps is None
        or not (native_fps > 0 and math.isfinite(native_fps))
        or num_available < cfg.num_frames
    ):
        return None
    # the window spans floor((n - 1) * native / fps + 0.5) + 1 frames: the lowest rate with a span that fits
    lowest = native_fps * (cfg.num_frames - 1) / max(num_available - 0.5, 1.0)
    fps = max(math.ceil(lowest * 10) / 10, cfg.fps)
    while fps < native_fps:
        if _fits(num_available, native_fps, cfg, fps=fps):
            return f"{fps:g}"
        fps = round(fps + 0.1, 1)
    native = _fps_text(native_fps)
    return native if _fits(num_available, native_fps, cfg, fps=float(native)) else None


def _fps_text(fps: float) -> str:
    """A frame rate as a user types it, at most 3 decimals, rounded down (so at most `fps`)."""
    return f"{math.floor(fps * 1000 + 1e-6) / 1000:g}"


@contextlib.contextmanager
def _decode_errors(path: Path, skip_bad_videos: bool = False) -> Iterator[None]:
    """Turn PyAV's many error types into one MoalignError that names the file and the fix."""
    try:
        yield
    except MoalignError:
        raise
    except Exception as err:  # PyAV raises many error types for corrupt data
        raise MoalignError(
            f"cannot decode video {path}: {type(err).__name__}: {err}. The file is corrupt or not a video: "
            f"re-encode it (e.g. to H.264 mp4) or remove it from the dataset{_or_skip(skip_bad_videos)}."
        ) from err


def _open_stream(container: Any, path: Path, skip_bad_videos: bool = False) -> tuple[Any, int, float]:
    """The first video stream, its header frame count (0 when unknown) and frame rate (0.0 when unknown)."""
    if not container.streams.video:
        raise MoalignError(
            f"{path} has no video stream. Remove it from the dataset or re-encode it"
            f"{_or_skip(skip_bad_videos)}."
        )
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return stream, int(stream.frames or 0), float(rate) if rate else 0.0


def _check_file(path: Path, skip_bad_videos: bool = False) -> None:
    if not path.is_file():
        raise MoalignError(
            f"video file not found: {path}. Fix the path in the dataset manifest{_or_skip(skip_bad_videos)}."
        )


def _probe(path: Path, skip_bad_videos: bool = False) -> tuple[int, float]:
    """(num_frames, fps) cheaply: the header's frame count plus one decoded frame; a full decode only when
    the header has no count. `skip_bad_videos`: the errors are skip reasons (no --skip-bad-videos hint)."""
    import av

    from moalign.data.video_io import display_orientation

    skip = skip_bad_videos
    _check_file(path, skip)
    with _decode_errors(path, skip), av.open(str(path)) as container:
        stream, count, fps = _open_stream(container, path, skip)
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None:
            raise MoalignError(f"{path} decoded to zero frames. Re-encode it or remove it{_or_skip(skip)}.")
        # a turn moalign cannot apply is found here, not mid-run
        display_orientation(first, path, _or_skip(skip))
        if count <= 0:
            count = 1 + sum(1 for _ in frames)
    return count, fps


def _take(path: Path, indices: np.ndarray, skip_bad_videos: bool) -> tuple[dict[int, np.ndarray], int]:
    """Decode up to the last wanted frame; return the wanted frames and how many frames were seen."""
    import av

    from moalign.data.video_io import frame_rgb

    wanted, last, kept, seen = set(indices.tolist()), int(indices[-1]), {}, 0
    hint = _or_skip(skip_bad_videos)
    with av.open(str(path)) as container:
        stream, _, _ = _open_stream(container, path, skip_bad_videos)
        for i, frame in enumerate(container.decode(stream)):
            seen = i + 1
            if i in wanted:
                kept[i] = frame_rgb(frame, path, hint)  # shown upright, in the file's own YUV matrix
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
        frames: uint8 (num_frames, H, W, 3) RGB at the video's own size, as it is shown (`frame_rgb`: turned
            as the file's display matrix says, e.g. portrait for a phone's portrait clip).
        indices: int64 (num_frames,) frame indices of the window.
        fps: the video's native frame rate (0.0 when the file has none).

    Raises:
        MoalignError: missing, unreadable or too-short video; the message names the file and the fix.
    """
    import av

    path = Path(path)
    skip = cfg.skip_bad_videos
    _check_file(path, skip)
    with _decode_errors(path, skip):
        with av.open(str(path)) as container:
            _, count, fps = _open_stream(container, path, skip)
        if count <= 0 and cfg.window != "start":
            count, fps = _probe(path, skip)  # the centre needs the length: count by decoding
        if count > 0:
            indices = sample_indices(count, fps, cfg, video=path)
        else:
            indices = _offsets(fps, cfg, path)  # start window: the length only matters if it is too short
        kept, seen = _take(path, indices, skip)
        if len(kept) < len(indices):  # the stream ended early: the header over-counted, or there was none
            if seen == 0:
                raise MoalignError(
                    f"{path} decoded to zero frames. Re-encode it or remove it{_or_skip(skip)}."
                )
            indices = sample_indices(seen, fps, cfg, video=path)  # raises when too short
            if not set(indices.tolist()) <= kept.keys():
                kept, seen = _take(path, indices, skip)
            if not set(indices.tolist()) <= kept.keys():
                raise MoalignError(
                    f"{path} decodes to a different number of frames each time. Re-encode it{_or_skip(skip)}."
                )
    frames = np.stack([kept[i] for i in indices.tolist()])
    return frames, indices, fps
