"""Ball tracking and floor estimation for the toy judge (`playground/judge.py`).

Tracking
    Balls are found per frame by colour. A pixel is a chromatic ball pixel when its HSV saturation is at
    least 0.4 and its value at least 0.3, and it then belongs to the palette colour (`playground.captions.COLOURS`)
    of nearest hue, if that is within 22 degrees (the palette hues are 23 to 85 degrees apart). A pixel
    is white when its saturation is below 0.22 and its darkest channel at least 0.55. The background
    (grey wall, brownish floor band, grey texture) passes neither test. Per colour and frame the largest
    8-connected blob of at least ``max(4, 0.0015 H W)`` pixels is the ball; no such blob means the colour
    is absent in that frame. The blob is grown by 2 px into looser-matching rim pixels (chroma >= 0.1,
    hue within 44 degrees; for white saturation < 0.3 and darkest channel >= 0.45), each weighted by its
    coverage (chroma ramped over 0.1..0.35, or brightness over 0.45..0.7 for white): the weighted sum is
    the area, the weighted mean the centroid (sub-pixel, so accelerations are measurable) and
    ``sqrt(area / pi)`` the equivalent radius. Blobs of at least a quarter of the largest one are
    counted (two red blobs are two red balls). The balls judged for PC and motion are the colours seen
    in at least a quarter of the frames, plus the named colours seen at all.

Floor
    The floor band is the bottom run of rows whose per-row median R - B (over columns and frames) is
    above 0.02 (the playground's floor is brownish, its wall bluish grey). Its top row is the floor
    surface, ``floor_y = row - 0.5``; when no plausible band (1 to H/3 rows) is found, ``floor_y`` falls
    back to ``H - H // 8 - 0.5``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from moalign.playground.captions import COLOURS

# colour classification (HSV, channels in [0, 1])
_SAT_MIN = 0.4


_VAL_MIN = 0.3


_HUE_TOL = 22.0  # degrees from the nearest palette hue; farther hues belong to no ball


_WHITE_SAT_MAX = 0.22


_WHITE_MIN = 0.55


def _palette_hues() -> dict[str, float]:
    return {
        name: colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0] * 360.0
        for name, rgb in COLOURS.items()
        if name != "white"
    }


_HUES = _palette_hues()


@dataclass
class Track:
    """Per-frame detections of one colour; NaN where absent."""

    colour: str
    present: np.ndarray  # bool (T,)
    area: np.ndarray  # float (T,) pixels
    centre: np.ndarray  # float (T, 2) x, y
    blobs: np.ndarray  # int (T,) number of significant blobs

    @property
    def radius(self) -> np.ndarray:
        """Equivalent radius sqrt(area / pi), (T,)."""
        return np.sqrt(self.area / math.pi)


def _colour_labels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify pixels by palette colour.

    Returns:
        labels: int8 (T, H, W): index into `list(COLOURS)` (strict test) or -1 for the background.
        soft: int8 (T, H, W): the same with looser thresholds (anti-aliased rims), for the centroids.
        weight: float32 (T, H, W) in [0, 1]: how much of the pixel looks like a ball (chroma, or
            brightness for white), so rim pixels count by their coverage and centroids are sub-pixel.
    """
    rgb = frames.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    sat = chroma / np.maximum(mx, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue = hue * 60.0  # degrees (T, H, W)
    names = list(COLOURS)
    labels = np.full(frames.shape[:3], -1, dtype=np.int8)
    soft = np.full(frames.shape[:3], -1, dtype=np.int8)
    best = np.full(frames.shape[:3], 360.0, dtype=np.float32)
    for name, h in _HUES.items():
        d = np.abs((hue - h + 180.0) % 360.0 - 180.0)
        take = d < best
        soft[take] = names.index(name)
        best = np.where(take, d, best)
    soft[(chroma < 0.1) | (best > 2.0 * _HUE_TOL)] = -1
    strict = (soft >= 0) & (sat >= _SAT_MIN) & (mx >= _VAL_MIN) & (best < _HUE_TOL)
    labels[strict] = soft[strict]
    weight = np.clip((chroma - 0.1) / 0.25, 0.0, 1.0)
    white = names.index("white")
    labels[(sat < _WHITE_SAT_MAX) & (mn >= _WHITE_MIN)] = white
    soft_white = (sat < 0.3) & (mn >= 0.45)
    soft[soft_white] = white
    weight = np.where(soft_white, np.clip((mn - 0.45) / 0.25, 0.0, 1.0), weight)
    return labels, soft, weight.astype(np.float32)


def track_balls(frames: np.ndarray) -> dict[str, Track]:
    """Find each palette colour's ball in every frame.

    Args:
        frames: uint8 (T, H, W, 3) RGB.

    Returns:
        colour name -> `Track`, for every colour of `playground.captions.COLOURS`.
    """
    import cv2

    t_len, h, w, _ = frames.shape
    labels, soft, weight = _colour_labels(frames)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kernel = np.ones((3, 3), np.uint8)
    min_area = max(4, int(round(0.0015 * h * w)))
    tracks = {}
    for idx, name in enumerate(COLOURS):
        present = np.zeros(t_len, dtype=bool)
        area = np.full(t_len, np.nan)
        centre = np.full((t_len, 2), np.nan)
        blobs = np.zeros(t_len, dtype=np.int64)
        for t in range(t_len):
            mask = (labels[t] == idx).astype(np.uint8)
            if mask.sum() < min_area:
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            k = int(np.argmax(areas))
            if areas[k] < min_area:
                continue
            # the blob grown by its soft rim, each pixel weighted by its coverage: a sub-pixel centroid
            region = cv2.dilate((comp == k + 1).astype(np.uint8), kernel, iterations=2).astype(bool)
            wts = np.where(region & (soft[t] == idx), weight[t], 0.0)
            wts[comp == k + 1] = np.maximum(wts[comp == k + 1], 1e-3)
            total = float(wts.sum())
            present[t] = True
            area[t] = total
            centre[t] = ((wts * xx).sum() / total, (wts * yy).sum() / total)
            blobs[t] = int((areas >= max(min_area, 0.25 * areas[k])).sum())
        tracks[name] = Track(name, present, area, centre, blobs)
    return tracks


def estimate_floor_y(frames: np.ndarray) -> float:
    """y of the floor surface: the top of the bottom band of brownish rows, else ``H - H // 8 - 0.5``.

    Args:
        frames: uint8 (T, H, W, 3) RGB.

    Returns:
        The floor surface in pixel-centre coordinates (a resting ball has centre y = floor_y - radius).
    """
    h = frames.shape[1]
    rgb = frames.astype(np.float32) / 255.0
    warm = np.median(rgb[..., 0] - rgb[..., 2], axis=(0, 2))  # (H,) per-row median R - B
    row = h
    while row > 0 and warm[row - 1] > 0.02:
        row -= 1
    band = h - row
    if not 1 <= band <= h // 3:
        row = h - h // 8
    return row - 0.5
