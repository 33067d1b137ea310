"""CogVideoX (2B, 5B, 1.5): v-prediction with CogVideoXDPMScheduler; blocks return (video, text) tokens.

- Blocks: `transformer.transformer_blocks`; a block returns (video tokens (B, N, D), text tokens (B, L, D)).
  The paper's "layer 18" of CogVideoX-2B is index 17.
- Latents: (B, F, C, H, W); tokens (F / patch_t, H / p, W / p), frame-major.
- RoPE variants (5B, 1.5): `image_rotary_emb` is computed here, outside the model, as the pipeline does.
- Objective (diffusers' CogVideoX training example): t ~ U{0..T-1}, x_t = add_noise(x0, eps, t), the model
  predicts v; x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v_hat (`scheduler.get_velocity`), loss =
  mean(w_t (x0_hat - x0)^2) with w_t = 1 / (1 - a_t).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moalign.backbones.spec import (
    BackboneSpec,
    GeometryRule,
    check_noise_level,
    compute_dtype,
    config_value,
    per_sample,
    sample_noise,
    unwrap,
    vae_posterior_mean,
)
from moalign.errors import loading
from moalign.losses import LossParts

# The released transformers' architectures (diffusers configs of THUDM/CogVideoX-2b and -5b), for presets and
# for checking real-size shapes on the meta device without downloading anything.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "cogvideox-2b": dict(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        max_text_seq_length=226, temporal_compression_ratio=4, use_rotary_positional_embeddings=False,
    ),
    "cogvideox-5b": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        max_text_seq_length=226, temporal_compression_ratio=4, use_rotary_positional_embeddings=True,
    ),
}  # fmt: skip


def make_scheduler(snr_shift_scale: float = 3.0):
    """The CogVideoX training scheduler (2B: snr_shift_scale 3.0; 5B: 1.0), as in the released configs."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=snr_shift_scale,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )


def rotary_embedding(transformer: nn.Module, grid: tuple[int, int, int], device: torch.device):
    """(cos, sin) RoPE tables for a token grid, as CogVideoXPipeline computes them; None without RoPE."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = unwrap(transformer).config
    if not cfg.use_rotary_positional_embeddings:
        return None
    f, h, w = grid
    p = cfg.patch_size
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if cfg.patch_size_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((h, w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=crops,
            grid_size=(h, w),
            temporal_size=f,
            device=device,
        )
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=cfg.attention_head_dim,
        crops_coords=None,
        grid_size=(h, w),
        temporal_size=f,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


class CogVideoXSpec(BackboneSpec):
    name = "cogvideox"
    objective = "v_prediction"
    latent_layout = "BFCHW"
    transformer_class_name = "CogVideoXTransformer3DModel"

    def __init__(self, snr_shift_scale: float = 3.0):
        from diffusers import CogVideoXPipeline

        self.scheduler = make_scheduler(snr_shift_scale)
        self.pipeline_class = CogVideoXPipeline

    def use_pipeline_scheduler(self, model: str) -> None:
        """The pipeline's own CogVideoXDPMScheduler (5B: snr_shift_scale 1.0, 2B: 3.0), as diffusers' CogVideoX
        training examples load it; a transformer-only folder keeps the 2B default."""
        from diffusers import CogVideoXDPMScheduler

        p = Path(model)
        if (p / "scheduler" / "scheduler_config.json").is_file() or not (
            p.exists() or model.startswith((".", "/"))
        ):
            with loading("the pipeline's scheduler", model):
                self.scheduler = CogVideoXDPMScheduler.from_pretrained(model, subfolder="scheduler")

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.transformer_blocks

    def geometry_rule(self, transformer_config=None, vae_config=None, *, training=False) -> GeometryRule:
        # the VAE's downsampling is 2 ** (blocks - 1) as CogVideoXPipeline computes it; a temporal patch
        # (CogVideoX 1.5) constrains training clips only: CogVideoXPipeline pads the latent frames when sampling
        # and the patch embedding cannot take a partial temporal patch
        frames = int(config_value(vae_config, "temporal_compression_ratio", 4))
        vae = 2 ** (len(config_value(vae_config, "block_out_channels", (0,) * 4)) - 1)
        patch = int(config_value(transformer_config, "patch_size", 2))
        patch_t = int(config_value(transformer_config, "patch_size_t", 1)) if training else 1
        why = f"VAE: {frames} frames and {vae} px per latent; transformer patch: {patch} px"
        if patch_t > 1:
            why += f" and {patch_t} latent frames (patch_size_t), which training clips must fill"
        return GeometryRule(self.name, frames, patch_t, (vae * patch, vae * patch), why)

    def video_tokens(self, block_output: Any) -> torch.Tensor:
        return block_output[0]  # (video, text)

    def token_grid(self, transformer: nn.Module, latents: torch.Tensor) -> tuple[int, int, int]:
        _, f, _, h, w = latents.shape
        cfg = unwrap(transformer).config
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        return (f + pt - 1) // pt, h // p, w // p

    def predict(self, transformer, noisy_latents, timesteps, prompt_embeds):
        grid = self.token_grid(transformer, noisy_latents)
        rope = rotary_embedding(transformer, grid, noisy_latents.device)
        dtype = compute_dtype(transformer)  # latents / embeddings cached in another dtype
        return transformer(
            hidden_states=noisy_latents.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            timestep=timesteps,
            image_rotary_emb=rope,
            return_dict=False,
        )[0]

    def diffusion_loss(
        self, transformer, latents, prompt_embeds, generator=None, noise_level=None
    ) -> LossParts:
        b = latents.shape[0]
        sched = self.scheduler
        steps = sched.config.num_train_timesteps
        noise = sample_noise(generator, latents)
        if noise_level is None:
            t = per_sample(generator, lambda n, g: torch.randint(0, steps, (n,), generator=g), b)
        else:
            t = torch.full((b,), round(check_noise_level(noise_level) * (steps - 1)), dtype=torch.long)
        t = t.to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        v_hat = self.predict(transformer, noisy, t, prompt_embeds)
        x0_hat = sched.get_velocity(v_hat, noisy, t)  # sqrt(a) x_t - sqrt(1 - a) v_hat
        alphas = sched.alphas_cumprod.to(latents.device)[t].float()
        weights = (1.0 / (1.0 - alphas)).view(b, *([1] * (latents.ndim - 1)))
        loss = (weights * (x0_hat.float() - latents.float()).square()).mean()
        return LossParts(diffusion=loss, total=loss)

    max_sequence_length = 226  # T5 tokens, as the released pipelines use

    def text_length(self, transformer_config: Any = None) -> int:
        # without RoPE the model's position table covers exactly max_text_seq_length text tokens
        if transformer_config is None:
            return self.max_sequence_length
        get = (
            transformer_config.get if isinstance(transformer_config, dict) else transformer_config.__getitem__
        )
        try:
            return int(get("max_text_seq_length"))
        except (KeyError, TypeError):
            return self.max_sequence_length

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> scaled latents (B, F, C, h, w): the posterior mean times scaling_factor."""
        z = vae_posterior_mean(vae, frames)  # (B, C, F, h, w)
        return (z * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)

    def tiny_transformer(self, **overrides: Any) -> nn.Module:
        from diffusers import CogVideoXTransformer3DModel

        kwargs = dict(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=32, num_layers=4, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
            max_text_seq_length=226,
        )  # fmt: skip
        kwargs.update(overrides)
        return CogVideoXTransformer3DModel(**kwargs)
