"""The stage-2 objective on tiny real transformers: every mode, lambda applied once, gradients, LoRA."""

import pytest
import torch
from conftest import tiny_transformer

from moalign.align_projector import AlignProjectorConfig
from moalign.alignment import ALIGN_MODES, AlignConfig, Aligner, stage2_loss
from moalign.backbones import get_backbone

LATENT = {"cogvideox": (2, 3, 4, 8, 8), "wan": (2, 4, 3, 8, 8)}  # token grid (3, 4, 4) in both layouts
TEACHER_GRID = (4, 2, 2)
WIDTH = {"motion": 8, "encoder": 12}


def _setup(family, mode, grid_match="videorepa", lam=0.5):
    spec = get_backbone(family)
    model = tiny_transformer(family)
    cfg = AlignConfig(
        mode=mode, layers=(1,), lam=lam, projector=AlignProjectorConfig(hidden_dim=16, grid_match=grid_match)
    )
    key = cfg.teacher_key or "motion"
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    aligner = Aligner(cfg, hidden, WIDTH[key], (3, 4, 4), TEACHER_GRID)
    text_dim = model.config.text_embed_dim if family == "cogvideox" else model.config.text_dim
    batch = {
        "latents": torch.randn(LATENT[family]),
        "prompt_embeds": torch.randn(2, 226 if family == "cogvideox" else 16, text_dim),
        "teacher": torch.randn(2, *TEACHER_GRID, WIDTH[key]) if cfg.teacher_key else None,
    }
    return spec, model, aligner, batch


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
@pytest.mark.parametrize("mode", list(ALIGN_MODES))
def test_every_mode_composes_the_total_once(family, mode):
    spec, model, aligner, batch = _setup(family, mode)
    parts = stage2_loss(spec, model, aligner, **batch, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in parts.values())
    torch.testing.assert_close(parts.total, parts.diffusion + 0.5 * parts.align)
    if mode == "none":
        assert parts.align == 0 and len(aligner.projectors) == 0
    else:
        assert parts.align > 0
    if "moalign" in mode:
        torch.testing.assert_close(parts.align, parts.spatial + parts.temporal)
    # the same seed gives the same diffusion term whatever the alignment
    base = stage2_loss(spec, model, Aligner(AlignConfig(mode="none"), 1, 1, (3, 4, 4), TEACHER_GRID),
                       batch["latents"], batch["prompt_embeds"], None, torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(parts.diffusion, base.diffusion)


@pytest.mark.parametrize("grid_match", ["videorepa", "resample_teacher"])
def test_alignment_gradient_reaches_transformer_and_projector_only_up_to_the_layer(grid_match):
    spec, model, aligner, batch = _setup("cogvideox", "moalign", grid_match)
    parts = stage2_loss(spec, model, aligner, **batch, generator=torch.Generator().manual_seed(0))
    parts.align.backward()
    blocks = spec.blocks(model)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
    assert all(p.grad is None for b in blocks[2:] for p in b.parameters())  # after the hooked block: nothing
    assert all(p.grad is not None for p in aligner.parameters())


def test_lora_trains_only_adapters_and_projector():
    from peft import LoraConfig

    spec, model, aligner, batch = _setup("wan", "moalign")
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    stage2_loss(spec, model, aligner, **batch, generator=torch.Generator().manual_seed(0)).total.backward()
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert p.grad is None  # frozen base weights never get gradients
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
    assert all(p.grad is not None for p in aligner.parameters())


def test_bad_mode_and_layer_errors():
    with pytest.raises(ValueError, match="moalign"):
        AlignConfig(mode="videorepa")
    spec, model, _, batch = _setup("cogvideox", "moalign")
    cfg = AlignConfig(mode="moalign", layers=(17,), projector=AlignProjectorConfig(hidden_dim=8))
    aligner = Aligner(cfg, 32, 8, (3, 4, 4), TEACHER_GRID)
    with pytest.raises(ValueError, match="0..3"):
        stage2_loss(spec, model, aligner, **batch)
