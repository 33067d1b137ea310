"""M_psi: the motion projector of stage 1 (paper Sec. 3.1), encoder width -> motion subspace (D_m = 64).

The paper does not give the head's architecture. Ours: a per-token MLP (Linear, GELU, Linear) with an optional
depthwise temporal convolution over neighbouring tubelets between the two linears (zero-initialised, so at
initialisation the head is exactly the per-token MLP). After stage 1 this module alone, frozen, produces the
motion targets ("teacher") of stage 2.

Input standardisation. Pre-norm ViT features have large, channel-dependent scales. The head first maps each
channel to zero mean and unit variance with statistics of the training features (fixed buffers set once by
stage 1 before training, saved with the weights), as linear probes on frozen features do. On the playground
this is what lets the head learn at all within a CPU budget (a per-token LayerNorm does markedly worse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MotionProjectorConfig:
    """Architecture of M_psi. `in_dim` is the encoder width (768 for VideoMAEv2 ViT-B)."""

    in_dim: int = 768
    dim: int = 64  # D_m, the motion subspace width (paper: 64)
    hidden_dim: int = 512
    temporal_kernel: int = 3  # 1 disables the temporal convolution (pure per-token MLP)
    standardize_input: bool = True  # per-channel (x - mean) / std with stage-1 training-feature statistics

    def __post_init__(self) -> None:
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(
                f"temporal_kernel must be an odd number >= 1 (1 disables it), got {self.temporal_kernel}"
            )


class MotionProjector(nn.Module):
    """Maps frozen encoder tokens to the motion subspace.

    Args:
        cfg: the architecture.

    Shapes:
        forward: (B, F, H, W, D_v) encoder token grid -> (B, F, H, W, D_m) motion tokens.
    """

    def __init__(self, cfg: MotionProjectorConfig):
        super().__init__()
        self.cfg = cfg
        # identity until set_feature_stats; persistent buffers, so the teacher reloads them with the weights
        self.register_buffer("feature_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("feature_std", torch.ones(cfg.in_dim))
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden_dim)
        self.act = nn.GELU()
        k = cfg.temporal_kernel
        self.temporal = (
            nn.Conv1d(cfg.hidden_dim, cfg.hidden_dim, k, padding=k // 2, groups=cfg.hidden_dim)
            if k > 1
            else None
        )
        if self.temporal is not None:
            nn.init.zeros_(self.temporal.weight)  # starts as the plain per-token MLP
            nn.init.zeros_(self.temporal.bias)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    @torch.no_grad()
    def set_feature_stats(self, tokens: torch.Tensor) -> None:
        """Fix the input standardisation from a sample of training features (..., D_v)."""
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, f, h, w, _ = tokens.shape
        if self.cfg.standardize_input:
            tokens = (tokens - self.feature_mean) / self.feature_std
        x = self.act(self.fc1(tokens))  # (B, F, H, W, hidden)
        if self.temporal is not None:
            # (B, F, H, W, C) -> (B*H*W, C, F): a 1-D convolution along time at every spatial position
            xt = x.permute(0, 2, 3, 4, 1).reshape(b * h * w, -1, f)
            xt = self.temporal(xt).reshape(b, h, w, -1, f).permute(0, 4, 1, 2, 3)
            x = x + xt
        return self.fc2(x)  # (B, F, H, W, D_m)
