"""A LoRA saved by moalign loads into the family's diffusers pipeline and reproduces the trained model."""

import pytest
import torch
from conftest import tiny_transformer
from diffusers import FlowMatchEulerDiscreteScheduler

from moalign.backbones import get_backbone
from moalign.run.lora import LORA_FILE, add_lora, save_lora


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_saved_lora_loads_with_load_lora_weights(family, tmp_path):
    spec = get_backbone(family)
    trained, base = tiny_transformer(family), tiny_transformer(family)  # the same weights
    add_lora(trained, rank=4, alpha=8)  # alpha != rank: the scale must travel with the file
    assert all("lora" in n for n, p in trained.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # stands in for training
    path = save_lora(spec.pipeline_class, trained, tmp_path / "run")
    assert path.name == LORA_FILE and sorted(p.name for p in (tmp_path / "run").iterdir()) == [LORA_FILE]

    scheduler = spec.scheduler if family == "cogvideox" else FlowMatchEulerDiscreteScheduler()
    pipe = spec.pipeline_class(
        tokenizer=None, text_encoder=None, vae=None, transformer=base, scheduler=scheduler
    )
    lat = torch.randn(1, 3, 4, 8, 8) if spec.latent_layout == "BFCHW" else torch.randn(1, 4, 3, 8, 8)
    dim = base.config.text_embed_dim if family == "cogvideox" else base.config.text_dim
    prompt = torch.randn(1, 226 if family == "cogvideox" else 16, dim)
    t = torch.tensor([500])
    with torch.no_grad():
        before = spec.predict(pipe.transformer, lat, t, prompt)
        pipe.load_lora_weights(tmp_path / "run")
        after = spec.predict(pipe.transformer, lat, t, prompt)
        expected = spec.predict(trained, lat, t, prompt)
    assert (after - before).abs().max() > 1e-3  # the LoRA changes the pipeline's output
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)  # ... into the trained model's
