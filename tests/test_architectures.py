"""The released transformers at real size on the meta device: block counts, widths, token grids, hook shapes."""

import pytest
import torch

from moalign.backbones import get_backbone

# (family, name, blocks, width, parameters in billions (rounded), latents at the released geometry, token grid)
REAL = [
    ("cogvideox", "cogvideox-2b", 30, 1920, 1.7, (1, 13, 16, 60, 90), (13, 30, 45)),  # 49x480x720
    ("cogvideox", "cogvideox-5b", 42, 3072, 5.6, (1, 13, 16, 60, 90), (13, 30, 45)),
    ("wan", "wan2.1-1.3b", 30, 1536, 1.4, (1, 16, 21, 60, 104), (21, 30, 52)),  # 81x480x832
    ("wan", "wan2.1-14b", 40, 5120, 14.3, (1, 16, 21, 60, 104), (21, 30, 52)),
]


@pytest.mark.parametrize(("family", "name", "blocks", "width", "billions", "latents", "grid"), REAL)
def test_real_architecture_on_meta(family, name, blocks, width, billions, latents, grid):
    spec = get_backbone(family)
    model = spec.architecture(name)
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory was allocated
    assert len(spec.blocks(model)) == blocks
    assert model.config.num_attention_heads * model.config.attention_head_dim == width
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.06)
    assert spec.token_grid(model, torch.empty(latents, device="meta")) == grid
    if family == "cogvideox":  # without RoPE the position table fixes the prompt length
        assert spec.text_length(model.config) == 226


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError, match="cogvideox-2b"):
        get_backbone("cogvideox").architecture("cogvideox-3b")
