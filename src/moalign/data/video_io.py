"""Reading and writing video files with PyAV (no system ffmpeg needed).

Frames are always uint8 RGB arrays of shape (T, H, W, 3), upright: as players, ffmpeg and OpenCV show them.
A phone's portrait clip is usually stored as landscape frames plus a display matrix (the mp4 `tkhd` matrix,
what ffprobe shows as "rotation of -90.00 degrees" and older tools as the tag ``rotate=90``); `frame_rgb`
applies it (quarter turns and mirrors), so every decode path of moalign (`read_video`,
`moalign.data.sampling.read_clip`, the probes) sees the frames the right way up. Files we write are BT.709,
limited range, and say so in the stream (H.264 VUI and the mp4 `colr` box), so players need not guess.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from moalign.errors import MoalignError
from moalign.run.atomic import atomic_path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file.

    Args:
        path: a video file PyAV/ffmpeg can decode (mp4, webm, avi, mkv, gif, ...).

    Returns:
        frames: uint8 array (T, H, W, 3), RGB, converted with the YUV matrix and range the file is tagged
            with (BT.601 when untagged, as swscale assumes), and turned / mirrored as the file's display
            matrix says (`frame_rgb`): (H, W) is the displayed size, e.g. portrait for a phone's portrait clip.
        fps: the stream's average frame rate (frames per second).

    Raises:
        MoalignError: the file is missing, unreadable, or holds no video frames.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MoalignError(f"video file not found: {path}. Check the path in your dataset manifest.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MoalignError(f"{path} has no video stream. Remove it from the dataset or re-encode it.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            hint = ", or pass --skip-bad-videos to skip such files (they are counted)"
            frames = [frame_rgb(frame, path, hint) for frame in container.decode(stream)]
    except MoalignError:
        raise
    except Exception as err:  # PyAV raises many error types for corrupt data
        raise MoalignError(
            f"cannot decode video {path} ({type(err).__name__}). "
            "The file is corrupt or not a video: re-encode it (e.g. to H.264 mp4) or remove it from the dataset "
            "(or pass --skip-bad-videos to skip such files; they are counted)."
        ) from err
    if not frames:
        raise MoalignError(
            f"{path} decoded to zero frames. Re-encode it or remove it from the dataset "
            "(or pass --skip-bad-videos to skip such files; they are counted)."
        )
    if fps <= 0:
        fps = 8.0
    return np.stack(frames), fps


def frame_rgb(frame, video: str | os.PathLike | None = None, hint: str = "") -> np.ndarray:
    """One decoded PyAV frame as it is meant to be shown: uint8 RGB (H, W, 3).

    Converted with the YUV matrix and range the frame is tagged with, then turned and mirrored as its
    display matrix says (`display_orientation`), as ffmpeg's autorotate and OpenCV do. Every decode path of
    moalign goes through here, so all of them agree on the frames of a video.

    Args:
        frame: an `av.VideoFrame` from `container.decode(stream)`.
        video, hint: the file, and the end of the fix (e.g. ", or pass --skip-bad-videos ..."), for the
            error message only.

    Raises:
        MoalignError: the display matrix turns the picture by an angle that is not a quarter turn.
    """
    return orient(_to_rgb(frame), display_orientation(frame, video, hint))


def display_size(frame, video: str | os.PathLike | None = None, hint: str = "") -> tuple[int, int]:
    """(height, width) of a decoded frame as shown, i.e. of `frame_rgb(frame)`, without converting it."""
    a, b, c, d = display_orientation(frame, video, hint)
    return (frame.width, frame.height) if a == 0 else (frame.height, frame.width)


# What `display_orientation` returns for a frame shown as stored.
UPRIGHT = (1, 0, 0, 1)


def display_orientation(
    frame, video: str | os.PathLike | None = None, hint: str = ""
) -> tuple[int, int, int, int]:
    """The display matrix of a decoded frame, reduced to its turn and mirror: (a, b, c, d), each -1, 0 or 1.

    FFmpeg attaches the container's matrix (mp4/mov `tkhd`, and H.264/HEVC display-orientation messages) to
    every decoded frame as DISPLAYMATRIX side data: 3x3 int32, 16.16 fixed point, mapping a stored pixel
    (x, y) to the shown one (a x + c y + tx, b x + d y + ty) (libavutil/display.h). A portrait phone clip
    ("rotate=90", 90 degrees clockwise) has (a, b, c, d) = (0, 1, -1, 0). `UPRIGHT` = (1, 0, 0, 1) when the
    frame has no matrix (or the installed PyAV exposes none). `video` and `hint` (the end of the fix) are for
    the error message only.

    Raises:
        MoalignError: the matrix turns the picture by an angle that is not a multiple of 90 degrees
            (moalign does not resample a picture by an arbitrary angle).
    """
    matrix = _display_matrix(frame)
    if matrix is None:
        return UPRIGHT
    m = np.array([matrix[0], matrix[1], matrix[3], matrix[4]], dtype=np.float64)  # a, b, c, d
    if not m.any():
        return UPRIGHT  # a degenerate matrix says nothing usable: shown as stored
    m /= np.abs(m).max()
    a, b, c, d = (int(v) for v in np.round(m))
    turned = a == d == 0 and abs(b) == abs(c) == 1
    if not (turned or (b == c == 0 and abs(a) == abs(d) == 1)) or np.abs(m - (a, b, c, d)).max() > 0.02:
        angle = float(np.degrees(np.arctan2(m[1], m[0])))  # > 0: clockwise (y points down)
        turn = f"{abs(angle):.1f} degrees {'clockwise' if angle > 0 else 'counterclockwise'}"
        where = f"{video}: " if video is not None else ""
        raise MoalignError(
            f"{where}the file says to show its frames turned {turn}, not a multiple of 90 degrees, "
            "which moalign does not apply. Re-encode the video upright (ffmpeg applies the turn when it "
            f"re-encodes: ffmpeg -i IN.mp4 OUT.mp4), or remove it from the dataset{hint}."
        )
    return a, b, c, d


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's DISPLAYMATRIX side data as 9 int32, or None when it has none."""
    try:
        for side in frame.side_data:
            kind = getattr(side.type, "name", str(side.type))
            if str(kind).upper().endswith("DISPLAYMATRIX"):
                data = bytes(side)
                return np.frombuffer(data, dtype=np.int32) if len(data) == 36 else None
    except (AttributeError, TypeError):  # a PyAV without frame side data: shown as stored
        return None
    return None


def orient(image: np.ndarray, orientation: tuple[int, int, int, int]) -> np.ndarray:
    """Turn / mirror an image (H, W, ...) as a `display_orientation` says; the same array when upright.

    out[y', x'] = image[y, x] with x' = a x + c y and y' = b x + d y (up to a shift into the frame):
    (0, 1, -1, 0) is 90 degrees clockwise, (-1, 0, 0, -1) a half turn, (-1, 0, 0, 1) a left-right mirror.
    """
    a, b, c, d = orientation
    if (a, b, c, d) == UPRIGHT:
        return image
    if a == 0:  # x' comes from y and y' from x: transpose first
        out = image.swapaxes(0, 1)
        if c < 0:
            out = out[:, ::-1]
        if b < 0:
            out = out[::-1]
    else:
        out = image
        if a < 0:
            out = out[:, ::-1]
        if d < 0:
            out = out[::-1]
    return np.ascontiguousarray(out)


# swscale's names for the YUV matrices PyAV can be told about, by AVColorSpace value (libavutil/pixfmt.h).
_SWS_MATRIX = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "SMPTE170M", 7: "SMPTE240M"}


def _to_rgb(frame) -> np.ndarray:
    """One decoded frame -> uint8 RGB (H, W, 3), with the YUV matrix and range the file is tagged with."""
    matrix = _SWS_MATRIX.get(frame.colorspace)
    if matrix is None:  # untagged (swscale then assumes BT.601), RGB or palette input
        return frame.to_ndarray(format="rgb24")
    # Named explicitly because older PyAV converted with BT.601 whatever the tag; the destination matrix
    # only has to differ from the source so that those versions apply it (RGB output ignores it).
    return frame.to_ndarray(
        format="rgb24", src_colorspace=matrix, dst_colorspace="DEFAULT", src_color_range=frame.color_range
    )


# BT.709 (ITU-R BT.709-6, Kr = 0.2126, Kb = 0.0722) RGB -> limited-range YCbCr, scaled by 2**16:
# Y row = (Kr, Kg, Kb) * 219/255, Cb = (-Kr, -Kg, 1 - Kb) / (2 (1 - Kb)) * 224/255,
# Cr = (1 - Kr, -Kg, -Kb) / (2 (1 - Kr)) * 224/255, each rounded; chroma rows sum to exactly 0 so greys
# carry no chroma. (3 YCbCr, 3 RGB); tests/test_video_io.py re-derives it.
_BT709_LIMITED = np.array(
    [[11966, 40254, 4064], [-6596, -22188, 28784], [28784, -26145, -2639]],
    dtype=np.int64,
)

# AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace BT709 and AVColorRange MPEG (limited, "tv")
_TAG_BT709 = 1
_TAG_LIMITED_RANGE = 1


def rgb_to_yuv(frames: np.ndarray, pix_fmt: str = "yuv420p") -> list[np.ndarray]:
    """uint8 RGB (T, H, W, 3) -> planar YUV frames (BT.709, limited range) in integer arithmetic.

    Done here rather than by libswscale because swscale's SIMD and C paths round differently and which
    one runs depends on buffer alignment, so the same frames could encode to different bytes. The matrix
    and range are the ones `write_video` tags the stream with.

    Returns:
        per frame: (H * 3 // 2, W) for "yuv420p" (Y plane, then U, then V), (3, H, W) for "yuv444p".
    """
    rgb = frames.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    (yr, yg, yb), (ur, ug, ub), (vr, vg, vb) = _BT709_LIMITED.tolist()
    half = 1 << 15  # rounds to nearest
    y = ((yr * r + yg * g + yb * b + half) >> 16) + 16  # (T, H, W), 16..235
    u = ((ur * r + ug * g + ub * b + half) >> 16) + 128  # 16..240
    v = ((vr * r + vg * g + vb * b + half) >> 16) + 128
    if pix_fmt == "yuv444p":
        return list(np.stack([y, u, v], axis=1).astype(np.uint8))  # (T, 3, H, W)
    if pix_fmt != "yuv420p":
        raise ValueError(f"pix_fmt must be 'yuv420p' or 'yuv444p', got {pix_fmt!r}")
    t, h, w = y.shape

    def subsample(c: np.ndarray) -> np.ndarray:  # 2x2 mean, rounded: (T, H, W) -> (T, H/2, W/2)
        return (c.reshape(t, h // 2, 2, w // 2, 2).sum(axis=(2, 4)) + 2) >> 2

    planes = [y.reshape(t, h * w), subsample(u).reshape(t, -1), subsample(v).reshape(t, -1)]
    return list(np.concatenate(planes, axis=1).reshape(t, h * 3 // 2, w).astype(np.uint8))


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float = 8.0,
    crf: int = 12,
    pix_fmt: str = "yuv420p",
) -> None:
    """Write frames to an H.264 mp4, atomically and deterministically (single-threaded encoder).

    Args:
        path: output .mp4 path; written to a temporary name first, then renamed.
        frames: uint8 array (T, H, W, 3), RGB; H and W must be even for yuv420p.
        fps: frame rate stored in the file.
        crf: x264 quality (0 = lossless, 12 = visually lossless, 23 = x264 default).
        pix_fmt: "yuv420p" plays everywhere; "yuv444p" keeps full colour resolution. The colour conversion
            is ours (`rgb_to_yuv`: BT.709 matrix, limited range), so the same frames always give the same
            bytes; the stream is tagged BT.709 (matrix, primaries, transfer) and limited ("tv") range to match.

    Raises:
        ValueError: frames are not uint8 (T, H, W, 3), or odd-sized for yuv420p.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
    planes = rgb_to_yuv(frames, pix_fmt)
    with atomic_path(path) as tmp:
        # write_colr is the default in recent FFmpeg; asked for so that older builds write the box too
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+write_colr"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            stream.thread_count = 1
            # libx264 writes these into the H.264 VUI and the mp4 muxer into a `colr` (nclx) box. Without
            # them players guess (BT.601 for SD, BT.709 for HD) and colours shift.
            ctx = stream.codec_context
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = _TAG_BT709
            ctx.color_range = _TAG_LIMITED_RANGE
            # same input, same bytes. x264's macroblock-tree rate control (mbtree) gave different bytes for
            # the same frames in about 1 of 15 encodes (4 distinct files in 60, with every thread setting
            # pinned); without it 60 of 60 were identical. It only trades a little compression.
            stream.options = {
                "crf": str(crf),
                "preset": "medium",
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
            }
            for plane in planes:
                for packet in stream.encode(av.VideoFrame.from_ndarray(plane, format=pix_fmt)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
