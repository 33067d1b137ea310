"""P_zeta and grid matching: shapes at the real CogVideoX-2B geometry (meta device), the frame drop and
time upsampling, the strided convolution, teacher resampling, and gradients."""

import pytest
import torch

from moalign.align_projector import AlignProjector, AlignProjectorConfig, resample_teacher


def test_videorepa_geometry_at_real_size_on_meta():
    with torch.device("meta"):
        proj = AlignProjector(
            AlignProjectorConfig(), in_dim=1920, latent_grid=(13, 30, 45), target_grid=(24, 10, 15)
        )
        out = proj(torch.empty(1, 13 * 30 * 45, 1920))
    assert out.shape == (1, 24, 10, 15, 64) and proj.output_grid == (24, 10, 15)
    assert proj.conv.kernel_size == (3, 3) and proj.conv.stride == (3, 3)


def test_videorepa_drops_frame0_and_upsamples_time():
    torch.manual_seed(0)
    proj = AlignProjector(
        AlignProjectorConfig(hidden_dim=8, out_dim=4), 6, latent_grid=(3, 4, 4), target_grid=(4, 2, 2)
    )
    tokens = torch.randn(2, 3 * 16, 6)
    out = proj(tokens)
    assert out.shape == (2, 4, 2, 2, 4)
    changed = tokens.clone()
    changed[:, :16] += 10.0  # latent frame 0 only: dropped, so nothing changes
    torch.testing.assert_close(proj(changed), out)
    changed = tokens.clone()
    changed[:, 16:32] += 10.0  # latent frame 1 feeds the first half of the upsampled frames
    diff = (proj(changed) - out).abs().sum(dim=(0, 2, 3, 4))
    assert diff[0] > 0 and diff[1] > 0 and diff[3] == 0


def test_resample_teacher_strategy_keeps_latent_grid():
    proj = AlignProjector(
        AlignProjectorConfig(hidden_dim=8, out_dim=4, grid_match="resample_teacher"), 6, (5, 4, 4), (8, 8, 8)
    )
    assert proj.conv is None and proj.output_grid == (5, 4, 4)
    assert proj(torch.randn(1, 80, 6)).shape == (1, 5, 4, 4, 4)
    teacher = torch.randn(2, 8, 8, 8, 3)
    assert resample_teacher(teacher, (8, 8, 8)) is teacher
    res = resample_teacher(teacher, (5, 4, 4))
    assert res.shape == (2, 5, 4, 4, 3)
    const = torch.ones(1, 8, 8, 8, 2) * torch.tensor([1.5, -2.0])
    torch.testing.assert_close(
        resample_teacher(const, (3, 5, 7)), torch.ones(1, 3, 5, 7, 2) * torch.tensor([1.5, -2.0])
    )


def test_bad_geometry_says_what_to_use():
    with pytest.raises(ValueError, match="resample_teacher"):
        AlignProjector(AlignProjectorConfig(), 8, latent_grid=(5, 4, 4), target_grid=(8, 8, 8))
    with pytest.raises(ValueError, match="grid_match"):
        AlignProjectorConfig(grid_match="nearest")


def test_gradients_reach_every_parameter():
    proj = AlignProjector(AlignProjectorConfig(hidden_dim=8, out_dim=4), 6, (3, 4, 4), (4, 2, 2))
    proj(torch.randn(1, 48, 6)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
