"""Weight-free metrics of one video, from its frames and their optical flow (definitions: docs/evaluation.md).

All flows are forward flows between consecutive frames in pixels of the video (x right, y down), from a
`moalign.data.flow` estimator (DIS on CPU by default). For frames a = I_t, b = I_{t+1} and flow f:

- ``motion`` (px/frame): mean |f| over pixels and pairs. ``motion_top`` (px/frame): the mean over pairs of the
  mean of the largest 5% of |f| in each pair, which a small moving object dominates; a video is near-static
  when ``motion_top`` < `static_threshold` (VBench's dynamic-degree idea, with our flow and threshold).
- ``flicker``: mean |b - a| over pixels, channels and pairs, intensities in [0, 1] (VBench's temporal
  flickering measure before its 255-scaling; it counts motion as change too, so read it with ``motion``).
- ``warp_error``: mean |a(p) - b(p + f(p))| over the pixels whose flow passes the forward-backward check
  (Sundaram et al., ECCV 2010: |f(p) + f_back(p + f(p))|^2 <= 0.01 (|f|^2 + |f_back|^2) + 0.5), intensities
  in [0, 1]; ``occluded``: the share of pixels that fail it.
- ``flow_acceleration`` (px/frame^2): mean |f_{t+1}(p + f_t(p)) - f_t(p)| along the flow over the consistent
  pixels, the change of a point's velocity between frames; ``smoothness`` = 1 / (1 + flow_acceleration), 1 for
  constant motion. Needs at least 3 frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

STATIC_THRESHOLD = 0.5  # px/frame of `motion_top` below which a video counts as near-static
TOP_FRACTION = 0.05


@dataclass(frozen=True)
class VideoMetrics:
    """The metrics of one video; units in the module docstring."""

    frames: int
    motion: float
    motion_top: float
    static: bool
    flicker: float
    warp_error: float
    occluded: float
    flow_acceleration: float | None  # None for a 2-frame video
    smoothness: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image(p + flow(p)) by bilinear interpolation, border values replicated: (H, W, C) float32."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    out = cv2.remap(
        image.astype(np.float32), grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    return out if out.ndim == 3 else out[..., None]


def consistent(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Forward-backward consistency mask (H, W) bool of a pair's flows (Sundaram et al., ECCV 2010), False
    where the point leaves the image."""
    back_at = _sample(backward, forward)  # f_back(p + f(p))
    gap = np.square(forward + back_at).sum(-1)
    bound = 0.01 * (np.square(forward).sum(-1) + np.square(back_at).sum(-1)) + 0.5
    h, w = forward.shape[:2]
    x = np.arange(w)[None, :] + forward[..., 0]
    y = np.arange(h)[:, None] + forward[..., 1]
    inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return (gap <= bound) & inside


def video_metrics(
    frames: np.ndarray, estimator: Any = None, static_threshold: float = STATIC_THRESHOLD
) -> VideoMetrics:
    """The metrics of one video.

    Args:
        frames: uint8 (T, H, W, 3) RGB, T >= 2.
        estimator: a `moalign.data.flow.FlowEstimator` (default: DIS, medium preset).
        static_threshold: px/frame of ``motion_top`` below which the video counts as near-static.

    Raises:
        ValueError: fewer than 2 frames, or not uint8 (T, H, W, 3).
    """
    if estimator is None:
        from moalign.data.flow import DISFlow

        estimator = DISFlow()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) < 2:
        raise ValueError(f"motion metrics need at least 2 frames, got {len(frames)}")
    images = frames.astype(np.float32) / 255.0  # (T, H, W, 3)
    forward = estimator.video(frames)  # (T-1, H, W, 2)
    backward = estimator.video(frames[::-1].copy())[::-1]  # backward[t]: flow t+1 -> t
    magnitude = np.linalg.norm(forward, axis=-1).reshape(len(forward), -1)  # (T-1, H*W)
    k = max(1, int(round(TOP_FRACTION * magnitude.shape[1])))
    motion_top = float(np.sort(magnitude, axis=1)[:, -k:].mean())
    masks = [consistent(forward[t], backward[t]) for t in range(len(forward))]
    errors = []
    for t, mask in enumerate(masks):
        warped = _sample(images[t + 1], forward[t])  # b(p + f(p))
        diff = np.abs(images[t] - warped).mean(-1)
        errors.append(float(diff[mask].mean()) if mask.any() else 0.0)
    acceleration = None
    if len(forward) >= 2:
        steps = []
        for t in range(len(forward) - 1):
            change = np.linalg.norm(_sample(forward[t + 1], forward[t]) - forward[t], axis=-1)
            mask = masks[t]
            steps.append(float(change[mask].mean()) if mask.any() else 0.0)
        acceleration = float(np.mean(steps))
    return VideoMetrics(
        frames=len(frames),
        motion=float(magnitude.mean()),
        motion_top=motion_top,
        static=motion_top < static_threshold,
        flicker=float(np.abs(np.diff(images, axis=0)).mean()),
        warp_error=float(np.mean(errors)),
        occluded=float(1.0 - np.mean([m.mean() for m in masks])),
        flow_acceleration=acceleration,
        smoothness=None if acceleration is None else 1.0 / (1.0 + acceleration),
    )
