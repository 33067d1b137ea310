"""P_zeta and grid matching: transformer tokens of the aligned block -> the teacher's grid and width.

The latent token grid of a video DiT and the encoder's token grid differ (CogVideoX-2B: 13 x 30 x 45 latent
tokens vs 24 x 10 x 15 VideoMAEv2 tokens). Two strategies (docs/stage2.md), chosen by `grid_match`:

- "videorepa" (VideoREPA's): drop latent frame 0 (it encodes the clip's first frame alone), upsample time
  (trilinear) to the encoder's frame count, then a learnable k x k convolution with stride k to the
  encoder's spatial grid (k = 3 for CogVideoX-2B). The teacher stays at its native grid.
- "resample_teacher": the student keeps the latent grid; the teacher's motion tokens are resampled
  (trilinear) to it by `resample_teacher`, so alignment runs at native token resolution.

P_zeta itself is the REPA/VideoREPA MLP: Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU ->
Linear(2048, D_m), applied per token before the (cheap, D_m-wide) grid convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GRID_MATCH = ("videorepa", "resample_teacher")


@dataclass(frozen=True)
class AlignProjectorConfig:
    """Architecture of P_zeta and the grid-matching strategy."""

    hidden_dim: int = 2048
    out_dim: int = 64  # D_m: the teacher's width (64 for motion tokens, 768 for raw VideoMAEv2-B tokens)
    grid_match: str = "videorepa"

    def __post_init__(self) -> None:
        if self.grid_match not in GRID_MATCH:
            raise ValueError(f"grid_match must be one of {', '.join(GRID_MATCH)}, got {self.grid_match!r}")


class AlignProjector(nn.Module):
    """P_zeta with grid matching.

    Args:
        cfg: architecture and strategy.
        in_dim: width of the aligned block's tokens (1920 for CogVideoX-2B).
        latent_grid: (F_l, H_l, W_l) token grid of the transformer.
        target_grid: (F_e, H_e, W_e) token grid of the teacher (used by "videorepa").

    Shapes:
        forward: (B, F_l * H_l * W_l, D) frame-major tokens -> (B, F, H, W, out_dim) on the matched grid:
        target_grid for "videorepa", latent_grid for "resample_teacher".
    """

    def __init__(
        self,
        cfg: AlignProjectorConfig,
        in_dim: int,
        latent_grid: tuple[int, int, int],
        target_grid: tuple[int, int, int],
    ):
        super().__init__()
        self.cfg = cfg
        self.latent_grid = tuple(latent_grid)
        self.target_grid = tuple(target_grid)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, cfg.out_dim),
        )
        self.conv: nn.Module | None = None
        if cfg.grid_match == "videorepa":
            fl, hl, wl = self.latent_grid
            fe, he, we = self.target_grid
            if fl < 2:
                raise ValueError(
                    f"grid_match='videorepa' drops latent frame 0 and needs >= 2 latent frames, got {fl}"
                )
            if hl % he or wl % we or hl // he != wl // we:
                raise ValueError(
                    f"grid_match='videorepa' needs the latent grid {hl}x{wl} to be the encoder grid {he}x{we} "
                    "times one integer stride; use --set align.projector.grid_match=resample_teacher for this geometry"
                )
            k = hl // he
            self.conv = nn.Conv2d(cfg.out_dim, cfg.out_dim, kernel_size=k, stride=k)

    @property
    def output_grid(self) -> tuple[int, int, int]:
        return self.target_grid if self.cfg.grid_match == "videorepa" else self.latent_grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        fl, hl, wl = self.latent_grid
        b, n, _ = tokens.shape
        if n != fl * hl * wl:
            raise ValueError(f"{n} tokens do not fill the latent grid {fl}x{hl}x{wl}")
        z = self.mlp(tokens).reshape(b, fl, hl, wl, -1)  # (B, F_l, H_l, W_l, D_m)
        if self.conv is None:
            return z
        fe, he, we = self.target_grid
        z = z[:, 1:].permute(0, 4, 1, 2, 3)  # drop latent frame 0: (B, D_m, F_l - 1, H_l, W_l)
        z = F.interpolate(z, size=(fe, hl, wl), mode="trilinear", align_corners=False)  # time -> F_e
        z = z.permute(0, 2, 1, 3, 4).reshape(b * fe, -1, hl, wl)  # (B*F_e, D_m, H_l, W_l)
        z = self.conv(z)  # (B*F_e, D_m, H_e, W_e)
        return z.reshape(b, fe, -1, he, we).permute(0, 1, 3, 4, 2)  # (B, F_e, H_e, W_e, D_m)


def resample_teacher(teacher: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinearly resample teacher tokens (B, F, H, W, D) to another grid (F', H', W') -> (B, F', H', W', D)."""
    if tuple(teacher.shape[1:4]) == tuple(grid):
        return teacher
    x = teacher.permute(0, 4, 1, 2, 3).float()  # (B, D, F, H, W)
    x = F.interpolate(x, size=tuple(grid), mode="trilinear", align_corners=False)
    return x.permute(0, 2, 3, 4, 1).to(teacher.dtype)
