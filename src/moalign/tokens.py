"""Token order helpers: flat frame-major token sequences <-> (frame, row, column) grids.

Both the VideoMAE encoder and the diffusers video transformers flatten tokens frame-major, i.e. index
n = (t * H + h) * W + w. These two functions are the one place that order is written down.
"""

from __future__ import annotations

import torch


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, D) frame-major tokens -> (B, F, H, W, D) grid, with N = F * H * W."""
    f, h, w = grid
    b, n, d = tokens.shape
    if n != f * h * w:
        raise ValueError(f"{n} tokens do not fill a {f}x{h}x{w} grid ({f * h * w} tokens)")
    return tokens.reshape(b, f, h, w, d)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, D) grid -> (B, N, D) frame-major tokens."""
    b, f, h, w, d = grid.shape
    return grid.reshape(b, f * h * w, d)


def grid_to_frames(grid: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, D) grid -> (B, F, H * W, D): tokens grouped per frame, as the relational losses take them."""
    b, f, h, w, d = grid.shape
    return grid.reshape(b, f, h * w, d)
