"""Rendering of playground scenes and their exact optical flow.

Rendering and exact flow (`render_scene`, `exact_flow`)
    Balls translate rigidly (no rotation) and carry a fixed smooth shading (darker rim, soft highlight),
    so their interior is not flat; edges are anti-aliased by coverage ``clip(r + 0.5 - d, 0, 1)`` blended
    over what lies beneath. Draw order (depth) is the ball id: ball 0 at the back. The background (wall,
    floor band, optional static texture) never moves. The visible top surface at a pixel is the last
    ball drawn whose centre is closer than its radius, else the background. Forward flow t -> t+1 at a
    pixel showing ball k is ``c_k(t+1) - c_k(t)`` (the actual displacement between the rendered frames);
    on background pixels it is 0. ``valid`` is True where that surface point is still the visible top
    surface at ``x + flow`` in frame t+1 and ``x + flow`` lies inside the image area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moalign.playground.captions import COLOURS
from moalign.playground.scenes import Scene


@dataclass
class Render:
    """Float render of a scene, with the per-pixel surface maps that define the exact flow."""

    frames: np.ndarray  # float32 (T, H, W, 3) in [0, 1]
    labels: np.ndarray  # int16 (T, H, W): visible top surface: ball id, or -1 for the background
    pure: (
        np.ndarray
    )  # int16 (T, H, W): ball id if fully covered by it, -1 untouched background, -2 mixed edge


def _ball_shading(rgb: np.ndarray, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Colour of a ball at offset (ux, uy) from its centre in radii: (...) -> (..., 3).

    Smooth everywhere (no clipping), so bilinear sampling of a moved ball is accurate: a rim darkening
    and a soft highlight up-left that blends towards white.
    """
    shade = 1.0 - 0.35 * (ux * ux + uy * uy)
    hl = 0.3 * np.exp(-((ux + 0.3) ** 2 + (uy + 0.3) ** 2) / 0.4)
    return rgb * (shade * (1.0 - hl))[..., None] + hl[..., None]


def render_scene(scene: Scene) -> Render:
    """Render every frame of a scene in float, with anti-aliased ball edges.

    Args:
        scene: a simulated scene (`simulate_scene`).

    Returns:
        `Render` with frames (T, H, W, 3) float32 in [0, 1] and the label maps `exact_flow` and the tests use.
    """
    t_len = scene.track.shape[0]
    h, w, _ = scene.background.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # pixel centres
    frames = np.broadcast_to(scene.background.astype(np.float64), (t_len, h, w, 3)).copy()
    labels = np.full((t_len, h, w), -1, dtype=np.int16)
    pure = np.full((t_len, h, w), -1, dtype=np.int16)
    for k in scene.meta["draw_order"]:  # back to front
        r = float(scene.radii[k])
        rgb = np.asarray(COLOURS[scene.colours[k]], dtype=np.float64) / 255.0
        dx = xx[None] - scene.track[:, k, 0, None, None]  # (T, H, W)
        dy = yy[None] - scene.track[:, k, 1, None, None]
        d = np.sqrt(dx * dx + dy * dy)
        cov = np.clip(r + 0.5 - d, 0.0, 1.0)  # area coverage of the pixel, linear across the edge
        frames += cov[..., None] * (_ball_shading(rgb, dx / r, dy / r) - frames)
        labels[d < r] = k
        pure[cov > 0.0] = -2
        pure[cov >= 1.0] = k
    return Render(np.clip(frames, 0.0, 1.0).astype(np.float32), labels, pure)


def exact_flow(scene: Scene, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward flow and its validity mask for every consecutive frame pair.

    Args:
        scene: the simulated scene.
        labels: int (T, H, W) visible top surface per frame (`Render.labels`).

    Returns:
        flow: float32 (T-1, H, W, 2), x then y, pixels: c_k(t+1) - c_k(t) on ball k, 0 on the background.
        valid: bool (T-1, H, W): the surface point seen at x in frame t is the visible top surface at
            x + flow in frame t+1, and x + flow lies inside the image area.
    """
    t_len, h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    centres = scene.centres  # (T, N, 2)
    disp = centres[1:] - centres[:-1]  # (T-1, N, 2)
    order = list(scene.meta["draw_order"])
    lab0, lab1 = labels[:-1], labels[1:]
    flow = np.zeros((t_len - 1, h, w, 2), dtype=np.float64)
    # the background never moves, so it stays visible exactly where no ball covers it in frame t+1
    valid = (lab0 < 0) & (lab1 < 0)
    for depth, k in enumerate(order):
        mask = lab0 == k  # (T-1, H, W)
        flow += mask[..., None] * disp[:, k, None, None, :]
        dest_x = xx[None] + disp[:, k, 0, None, None]
        dest_y = yy[None] + disp[:, k, 1, None, None]
        ok = mask & (dest_x >= -0.5) & (dest_x < w - 0.5) & (dest_y >= -0.5) & (dest_y < h - 0.5)
        # rigid translation keeps the point on ball k; only a ball drawn in front can hide it at t+1
        for j in order[depth + 1 :]:
            cj = centres[1:, j]
            rj = float(scene.radii[j])
            ok &= (dest_x - cj[:, 0, None, None]) ** 2 + (dest_y - cj[:, 1, None, None]) ** 2 >= rj * rj
        valid |= ok
    return flow.astype(np.float32), valid
