"""M_psi and F_omega: shapes, the tubelet -> frame-pair layout, and the zero-init temporal convolution."""

import pytest
import torch

from moalign.flow_decoder import FlowDecoder, FlowDecoderConfig
from moalign.motion_projector import MotionProjector, MotionProjectorConfig


@pytest.mark.parametrize("temporal_kernel", [1, 3])
def test_projector_shapes_and_init(temporal_kernel):
    torch.manual_seed(0)
    proj = MotionProjector(
        MotionProjectorConfig(in_dim=32, dim=8, hidden_dim=16, temporal_kernel=temporal_kernel)
    )
    x = torch.randn(2, 4, 3, 5, 32)  # (B, F, H, W, D_v)
    y = proj(x)
    assert y.shape == (2, 4, 3, 5, 8)
    # at initialisation the temporal convolution is zero, so the head is exactly the per-token MLP
    mlp = proj.fc2(proj.act(proj.fc1(x)))
    torch.testing.assert_close(y, mlp)


def test_projector_temporal_conv_mixes_only_time():
    torch.manual_seed(0)
    proj = MotionProjector(MotionProjectorConfig(in_dim=6, dim=4, hidden_dim=8, temporal_kernel=3))
    torch.nn.init.normal_(proj.temporal.weight)
    x = torch.randn(1, 5, 3, 3, 6)
    x2 = x.clone()
    x2[0, 2, 1, 1] += 1.0  # perturb one token
    diff = (proj(x2) - proj(x)).abs().sum(-1)[0]  # (F, H, W)
    changed = diff > 1e-6
    # only the same spatial position, at frames 1..3 (kernel 3 around frame 2), may change
    expected = torch.zeros_like(changed)
    expected[1:4, 1, 1] = True
    assert torch.equal(changed, expected)


def test_projector_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        MotionProjectorConfig(temporal_kernel=2)


@pytest.mark.parametrize(
    ("patch", "stride", "grid", "out"),
    [
        (8, 4, (8, 8, 8), (16, 16)),
        (16, 4, (24, 10, 15), (40, 60)),
        (8, 2, (2, 3, 4), (12, 16)),
        (14, 2, (1, 2, 2), (14, 14)),
    ],
)
def test_flow_decoder_shapes(patch, stride, grid, out):
    dec = FlowDecoder(
        FlowDecoderConfig(dim=8, hidden_dim=12, stride=stride), patch_size=patch, pairs_per_tubelet=2
    )
    f, h, w = grid
    assert dec.output_size((h, w)) == out
    y = dec(torch.randn(2, f, h, w, 8))
    assert y.shape == (2, 2 * f, *out, 2)


def test_flow_decoder_rejects_stride_not_dividing_patch():
    with pytest.raises(ValueError, match="does not divide"):
        FlowDecoder(FlowDecoderConfig(stride=4), patch_size=14)


def test_flow_decoder_pixel_shuffle_layout():
    """Output pair 2j + k, pixel (H*s + a, W*s + b) comes from token (j, H, W), read-out unit (k, a, b, xy)."""
    dec = FlowDecoder(FlowDecoderConfig(dim=4, hidden_dim=4, stride=2), patch_size=4, pairs_per_tubelet=2)
    s = dec.cell
    with torch.no_grad():
        for m in (dec.stem, dec.block, dec.readout):
            m.weight.zero_()
            m.bias.zero_()
        dec.readout.bias.copy_(torch.arange(2 * s * s * 2, dtype=torch.float32))
    y = dec(torch.randn(1, 3, 2, 2, 4))  # (1, 6, 4, 4, 2)
    unit = torch.arange(2 * s * s * 2, dtype=torch.float32).reshape(2, s, s, 2)  # (pair, a, b, xy)
    for j in range(3):
        for k in range(2):
            for hh in range(2):
                for ww in range(2):
                    cell = y[0, 2 * j + k, hh * s : (hh + 1) * s, ww * s : (ww + 1) * s]
                    assert torch.equal(cell, unit[k])
