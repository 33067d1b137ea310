"""F_omega: the light flow decoder of stage 1, motion tokens -> dense optical flow (trained with L1).

Which frame pairs a tubelet predicts. A 4k+1-frame clip has 4k forward flows (pair t: frame t -> t+1). The
encoder sees frames 1..4k (frame 0 dropped, VideoREPA geometry), so tubelet j covers clip frames
2j+1 and 2j+2. It predicts the flows *into* its frames: pairs 2j and 2j+1. Together the tubelets cover the
clip's 4k pairs exactly once, in order, so the decoder output lines up with the flow tensor (T-1, H, W, 2).

Resolution. Flow is predicted at `1/stride` of the encoder input (default 1/4, SPEC Sec. 2), with flow
vectors in pixels of that reduced resolution. From the token grid (1/patch of the input) the decoder goes up
in log2(patch / stride) x2 stages, each an upsampling followed by a 3x3 convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FlowDecoderConfig:
    """Architecture of F_omega."""

    dim: int = 64  # input width: D_m
    hidden_dim: int = 128
    stride: int = 4  # output resolution = encoder input resolution / stride

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
        forward: motion (B, F, H, W, D_m), out_size (h, w) -> flow (B, F * pairs_per_tubelet, h, w, 2),
        pixels at (h, w), x then y.
    """

    def __init__(self, cfg: FlowDecoderConfig, patch_size: int, pairs_per_tubelet: int = 2):
        super().__init__()
        self.cfg = cfg
        self.pairs = pairs_per_tubelet
        c = cfg.hidden_dim
        stages = max(0, round(math.log2(max(patch_size / cfg.stride, 1.0))))
        self.stem = nn.Conv3d(cfg.dim, c, kernel_size=3, padding=1)  # mixes neighbouring tubelets too
        self.up = nn.ModuleList(nn.Conv3d(c, c, kernel_size=(1, 3, 3), padding=(0, 1, 1)) for _ in range(stages))
        self.head = nn.Conv3d(c, 2 * pairs_per_tubelet, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.act = nn.GELU()

    def forward(self, motion: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        b, f, h, w, _ = motion.shape
        oh, ow = out_size
        x = self.act(self.stem(motion.permute(0, 4, 1, 2, 3)))  # (B, C, F, H, W)
        for conv in self.up:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
            x = self.act(conv(x))
        if x.shape[-2:] != (oh, ow):
            x = F.interpolate(x, size=(f, oh, ow), mode="trilinear", align_corners=False)
        x = self.head(x)  # (B, 2 * pairs, F, h, w)
        x = x.reshape(b, self.pairs, 2, f, oh, ow).permute(0, 3, 1, 4, 5, 2)  # (B, F, pairs, h, w, 2)
        return x.reshape(b, f * self.pairs, oh, ow, 2)
