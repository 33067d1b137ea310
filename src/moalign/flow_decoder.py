"""F_omega: the light flow decoder of stage 1, motion tokens -> dense optical flow (trained with L1).

Which frame pairs a tubelet predicts. A 4k+1-frame clip has 4k forward flows (pair t: frame t -> t+1). The
encoder sees frames 1..4k (frame 0 dropped, VideoREPA geometry), so tubelet j covers clip frames
2j+1 and 2j+2. It predicts the flows *into* its frames: pairs 2j and 2j+1. Together the tubelets cover the
clip's 4k pairs exactly once, in order, so the decoder output lines up with the flow tensor (T-1, H, W, 2).

Architecture (ours; the paper gives none). Two 3x3x3 convolutions over the token grid (mixing neighbouring
tokens and tubelets), then a per-token linear read-out that paints each token's own s x s cell of the output
for each of its frame pairs (a pixel shuffle, as ViT dense heads do), with s = patch_size // stride. The
read-out lets a token place motion at sub-patch precision from what it encodes, which bilinear upsampling of
a coarse grid cannot; on the playground it is both faster and far more accurate.

Resolution. Flow comes out at 1/stride of the encoder input (default 1/4, see docs/stage1.md; exactly the
token grid times s), with flow vectors in pixels of that resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlowDecoderConfig:
    """Architecture of F_omega."""

    dim: int = 64  # input width: D_m
    hidden_dim: int = 128
    stride: int = 4  # output resolution = encoder input resolution / stride; must divide the patch size

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


class FlowDecoder(nn.Module):
    """Decodes motion tokens to per-frame-pair optical flow.

    Args:
        cfg: the architecture.
        patch_size: the encoder's spatial patch size (tokens are patch_size pixels apart).
        pairs_per_tubelet: frame pairs each tubelet predicts (the encoder's tubelet size).

    Shapes:
        forward: motion (B, F, H, W, D_m) -> flow (B, F * pairs_per_tubelet, H * s, W * s, 2), pixels at
        that resolution, x then y; s = patch_size // stride.
    """

    def __init__(self, cfg: FlowDecoderConfig, patch_size: int, pairs_per_tubelet: int = 2):
        super().__init__()
        if patch_size % cfg.stride:
            raise ValueError(
                f"decoder stride {cfg.stride} does not divide the encoder patch size {patch_size}: "
                f"choose a divisor, e.g. --set decoder.stride={max(d for d in (1, 2, 4, 7, 8) if patch_size % d == 0)}"
            )
        self.cfg = cfg
        self.pairs = pairs_per_tubelet
        self.cell = patch_size // cfg.stride  # s: output pixels per token along each axis
        c = cfg.hidden_dim
        self.stem = nn.Conv3d(cfg.dim, c, kernel_size=3, padding=1)
        self.block = nn.Conv3d(c, c, kernel_size=3, padding=1)
        self.readout = nn.Linear(c, pairs_per_tubelet * self.cell * self.cell * 2)
        self.act = nn.GELU()

    def output_size(self, grid_hw: tuple[int, int]) -> tuple[int, int]:
        """Flow resolution (h, w) for a token grid (H, W)."""
        return grid_hw[0] * self.cell, grid_hw[1] * self.cell

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        b, f, h, w, _ = motion.shape
        s, p = self.cell, self.pairs
        x = self.act(self.stem(motion.permute(0, 4, 1, 2, 3)))  # (B, C, F, H, W)
        x = x + self.act(self.block(x))
        x = self.readout(x.permute(0, 2, 3, 4, 1))  # (B, F, H, W, pairs * s * s * 2)
        x = x.reshape(b, f, h, w, p, s, s, 2).permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, F, pairs, H, s, W, s, 2)
        return x.reshape(b, f * p, h * s, w * s, 2)
