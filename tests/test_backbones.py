"""Backbone specs on tiny real diffusers transformers: token grids, captured tokens, patch order, objectives."""

import pytest
import torch
from conftest import tiny_transformer

from moalign.backbones import BACKBONES, CogVideoXSpec, WanSpec, frame_major, get_backbone
from moalign.capture import FeatureCapture
from moalign.tokens import tokens_to_grid

CASES = {
    "cogvideox": (CogVideoXSpec, {}, (1, 3, 4, 8, 12)),  # (B, F, C, H, W)
    "cogvideox-rope": (CogVideoXSpec, {"use_rotary_positional_embeddings": True}, (1, 3, 4, 8, 12)),
    "wan": (WanSpec, {}, (1, 4, 3, 8, 12)),  # (B, C, F, H, W)
}


def _prompt(spec, transformer):
    dim = transformer.config.text_embed_dim if spec.name == "cogvideox" else transformer.config.text_dim
    return torch.randn(
        1, 226 if spec.name == "cogvideox" else 16, dim
    )  # CogVideoX needs its full text length


@pytest.mark.parametrize("case", list(CASES))
def test_predict_and_capture_match_the_token_grid(case):
    cls, overrides, shape = CASES[case]
    spec = cls()
    model = tiny_transformer(spec.name, **overrides)
    latents = torch.randn(shape)
    grid = spec.token_grid(model, latents)
    assert grid == (3, 4, 6)
    with FeatureCapture(spec.blocks(model), indices=(2,), select=spec.video_tokens) as cap:
        pred = spec.predict(model, latents, torch.tensor([500]), _prompt(spec, model))
    assert pred.shape == latents.shape
    tokens = cap[2]
    assert tokens.shape == (1, 3 * 4 * 6, model.config.num_attention_heads * model.config.attention_head_dim)
    assert tokens_to_grid(tokens, grid).shape == (1, 3, 4, 6, tokens.shape[-1])


def _marked_latents(spec, f, y, x):
    lat = torch.zeros(1, 3, 4, 8, 12)  # frame-major (B, F, C, H, W)
    lat[0, f, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2] = 1.0
    return lat if spec.latent_layout == "BFCHW" else lat.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_token_order_is_frame_major_like_the_patch_embedding(name):
    spec = get_backbone(name)
    model = tiny_transformer(
        name, **({"use_rotary_positional_embeddings": True} if name == "cogvideox" else {})
    )
    for f, y, x in [(0, 0, 0), (2, 1, 3), (1, 3, 5)]:
        lat = _marked_latents(spec, f, y, x)
        assert torch.equal(frame_major(lat, spec.latent_layout)[0, f, 0, 2 * y, 2 * x], torch.tensor(1.0))
        with torch.no_grad():
            if name == "cogvideox":
                conv = model.patch_embed.proj
                emb = conv(lat.reshape(-1, 4, 8, 12)) - conv.bias.view(1, -1, 1, 1)  # (F, D, 4, 6)
                tokens = emb.flatten(2).transpose(1, 2).reshape(1, -1, emb.shape[1])  # as CogVideoXPatchEmbed
            else:
                conv = model.patch_embedding
                emb = conv(lat) - conv.bias.view(1, -1, 1, 1, 1)  # (1, D, F, 4, 6)
                tokens = emb.flatten(2).transpose(1, 2)  # as WanTransformer3DModel.forward
        grid = tokens_to_grid(tokens, spec.token_grid(model, lat))[0].abs().sum(-1)  # (F, H, W)
        hot = (grid > 1e-6).nonzero().tolist()
        assert hot == [[f, y, x]]


def test_v_prediction_objective_is_zero_for_the_oracle(monkeypatch):
    spec = CogVideoXSpec()
    x0 = torch.randn(2, 3, 4, 8, 12)
    alphas = spec.scheduler.alphas_cumprod

    def oracle(transformer, noisy, t, prompt):
        a = alphas[t].view(-1, 1, 1, 1, 1)
        return (a.sqrt() * noisy - x0) / (1 - a).sqrt()  # the true v for this x_t

    monkeypatch.setattr(spec, "predict", oracle)
    parts = spec.diffusion_loss(None, x0, None, torch.Generator().manual_seed(0))
    assert parts.diffusion < 1e-8 and parts.total is parts["total"]


def test_flow_matching_objective_is_zero_for_the_oracle(monkeypatch):
    spec = WanSpec()
    x0 = torch.randn(2, 4, 3, 8, 12)

    def oracle(transformer, noisy, timestep, prompt):
        s = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        return (noisy - x0) / s  # eps - x0 given x_s = (1 - s) x0 + s eps

    monkeypatch.setattr(spec, "predict", oracle)
    assert spec.diffusion_loss(None, x0, None, torch.Generator().manual_seed(0)).diffusion < 1e-8
    sig = spec.sample_sigmas(1000, torch.Generator().manual_seed(1))
    assert 0 < sig.min() and sig.max() < 1 and abs(float(sig.median()) - 0.5) < 0.05  # logit-normal(0, 1)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_diffusion_loss_trains_the_transformer(name):
    spec = get_backbone(name)
    model = tiny_transformer(name)
    shape = (1, 3, 4, 8, 8) if spec.latent_layout == "BFCHW" else (1, 4, 3, 8, 8)
    parts = spec.diffusion_loss(
        model, torch.randn(shape), _prompt(spec, model), torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(parts.total) and parts.total.dtype == torch.float32
    parts.total.backward()
    assert sum(p.grad is not None for p in model.parameters()) > 0.9 * len(list(model.parameters()))


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ValueError, match="cogvideox, wan"):
        get_backbone("sora")


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_are_cast_to_the_transformers_compute_dtype(case):
    """Latents / embeddings cached in another dtype than the transformer's (float32 latents for a bfloat16
    model, float16 embeddings) are cast, not a dtype error in the first layer; the loss is float32 and the
    same as with inputs already in the model's dtype."""
    cls, overrides, shape = CASES[case]
    spec = cls()
    model = tiny_transformer(spec.name, **overrides).to(torch.bfloat16)
    latents, prompt = torch.randn(shape), _prompt(spec, model)
    mixed = spec.diffusion_loss(
        model, latents, prompt.half(), torch.Generator().manual_seed(0), noise_level=0.5
    )
    same = spec.diffusion_loss(
        model, latents.bfloat16(), prompt.bfloat16(), torch.Generator().manual_seed(0), noise_level=0.5
    )
    assert mixed.total.dtype == torch.float32 and torch.isfinite(mixed.total)
    torch.testing.assert_close(mixed.total, same.total, rtol=0.05, atol=0.0)
