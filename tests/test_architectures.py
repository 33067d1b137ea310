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


PRESET_ARCH = {
    "cogvideox-2b": "cogvideox-2b",
    "cogvideox-5b": "cogvideox-5b",
    "wan2.1-1.3b": "wan2.1-1.3b",
    "wan2.1-14b": "wan2.1-14b",
}


@pytest.mark.parametrize("preset", sorted(PRESET_ARCH))
def test_real_presets_fit_their_architectures(preset):
    """Each real preset's layer exists, and P_zeta maps the hooked block's tokens (B, N, D) at the preset's
    geometry onto a grid the teacher's tokens can be compared on."""
    from moalign.align_projector import AlignProjector, resample_teacher
    from moalign.presets import get_preset

    recipe = get_preset(preset)
    s2, data, enc = recipe.stage2, recipe.stage1.data, recipe.stage1.encoder
    spec = get_backbone(s2.backbone)
    model = spec.architecture(PRESET_ARCH[preset])
    n_blocks = len(spec.blocks(model))
    assert all(0 <= i < n_blocks for i in s2.align.layers)
    assert s2.lora_rank > 0 or preset == "cogvideox-2b"  # only the paper's 2B recipe is a full fine-tune
    f, h, w = (data.num_frames - 1) // 4 + 1, data.height // 8, data.width // 8  # VAE: time /4, space /8
    layout = (1, f, 16, h, w) if spec.latent_layout == "BFCHW" else (1, 16, f, h, w)
    grid = spec.token_grid(model, torch.empty(layout, device="meta"))
    teacher_grid = ((data.num_frames - 1) // 2, enc.input_size[0] // 16, enc.input_size[1] // 16)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.device("meta"):
        proj = AlignProjector(s2.align.projector, width, grid, teacher_grid)
        z = proj(torch.empty(1, grid[0] * grid[1] * grid[2], width))  # what the hook sees, projected
        m = resample_teacher(torch.empty(1, *teacher_grid, 64), proj.output_grid)
    assert z.shape == m.shape == (1, *proj.output_grid, 64)
