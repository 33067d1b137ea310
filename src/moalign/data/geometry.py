"""Clip geometry: resize so the frames cover the target size, then centre-crop; flow gets the same transform.

Ground-truth flow gets exactly the geometric transform of its frames: vectors scaled by the resize factor
of each axis, then cropped.
"""

from __future__ import annotations

from typing import TypeVar

import cv2
import numpy as np
import torch

from moalign.data.sampling import DataConfig


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
