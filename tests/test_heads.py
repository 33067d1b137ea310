"""M_psi and F_omega: shapes, the tubelet -> frame-pair layout, and the zero-init temporal convolution."""

import pytest
import torch

from moalign.flow_decoder import FlowDecoder, FlowDecoderConfig
from moalign.motion_projector import MotionProjector, MotionProjectorConfig


@pytest.mark.parametrize("temporal_kernel", [1, 3])
def test_projector_shapes_and_init(temporal_kernel):
    torch.manual_seed(0)
    proj = MotionProjector(MotionProjectorConfig(in_dim=32, dim=8, hidden_dim=16, temporal_kernel=temporal_kernel))
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


@pytest.mark.parametrize(("patch", "grid", "out"), [(8, (8, 8, 8), (16, 16)), (16, (24, 10, 15), (40, 60)), (4, (2, 3, 4), (3, 4))])
def test_flow_decoder_shapes(patch, grid, out):
    dec = FlowDecoder(FlowDecoderConfig(dim=8, hidden_dim=12, stride=4), patch_size=patch, pairs_per_tubelet=2)
    f, h, w = grid
    y = dec(torch.randn(2, f, h, w, 8), out)
    assert y.shape == (2, 2 * f, *out, 2)


def test_flow_decoder_pair_layout():
    """Output pair p = 2j + k comes from tubelet j, head channels (2k, 2k+1) = (x, y)."""
    dec = FlowDecoder(FlowDecoderConfig(dim=4, hidden_dim=4, stride=1), patch_size=1, pairs_per_tubelet=2)
    with torch.no_grad():
        for m in (dec.stem, dec.head):
            m.weight.zero_()
            m.bias.zero_()
        dec.head.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # pair 0: (1, 2), pair 1: (3, 4)
    y = dec(torch.randn(1, 3, 2, 2, 4), (2, 2))  # (1, 6, 2, 2, 2)
    assert torch.allclose(y[0, 0::2], torch.tensor([1.0, 2.0]).expand(3, 2, 2, 2))
    assert torch.allclose(y[0, 1::2], torch.tensor([3.0, 4.0]).expand(3, 2, 2, 2))
