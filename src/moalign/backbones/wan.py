"""Wan2.1 (T2V 1.3B, 14B): flow matching; blocks return the video tokens.

- Blocks: `transformer.blocks`; a block returns video tokens (B, N, D) (text enters by cross-attention).
- Latents: (B, C, F, H, W); tokens (F / p_t, H / p_h, W / p_w), frame-major.
- Objective (flow matching, as in diffusers' training utilities): s ~ density, x_s = (1 - s) x0 + s eps,
  the model predicts eps - x0 at timestep 1000 s; loss = mean((pred - (eps - x0))^2).
"""

from __future__ import annotations

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
from moalign.losses import LossParts

# The released transformers' architectures (Wan-AI/Wan2.1-T2V-1.3B / 14B, diffusers layout), for presets and
# for checking real-size shapes on the meta device without downloading anything.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    "wan2.1-14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
}  # fmt: skip


class WanSpec(BackboneSpec):
    name = "wan"
    objective = "flow_matching"
    latent_layout = "BCFHW"
    transformer_class_name = "WanTransformer3DModel"

    def __init__(self, weighting: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0):
        from diffusers import WanPipeline

        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.pipeline_class = WanPipeline

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.blocks

    def geometry_rule(self, transformer_config=None, vae_config=None, *, training=False) -> GeometryRule:
        # AutoencoderKLWan records its factors; WanPipeline would round other geometries with a warning only
        frames = int(config_value(vae_config, "scale_factor_temporal", 4))
        vae = int(config_value(vae_config, "scale_factor_spatial", 8))
        pt, ph, pw = (int(p) for p in config_value(transformer_config, "patch_size", (1, 2, 2)))
        why = f"VAE: {frames} frames and {vae} px per latent; transformer patch: {ph}x{pw} px"
        if pt > 1:
            why += f" and {pt} latent frames"
        return GeometryRule(self.name, frames, pt, (vae * ph, vae * pw), why)

    def video_tokens(self, block_output: Any) -> torch.Tensor:
        return block_output

    def token_grid(self, transformer: nn.Module, latents: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = latents.shape
        pt, ph, pw = unwrap(transformer).config.patch_size
        return f // pt, h // ph, w // pw

    def predict(self, transformer, noisy_latents, timesteps, prompt_embeds):
        dtype = compute_dtype(transformer)  # latents / embeddings cached in another dtype
        return transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=prompt_embeds.to(dtype),
            return_dict=False,
        )[0]

    def sample_sigmas(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise levels s in (0, 1): logit-normal (SD3 / Wan trainers) or uniform."""
        if self.weighting == "uniform":
            return torch.rand(batch, generator=generator)
        z = torch.randn(batch, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(z)

    def diffusion_loss(
        self, transformer, latents, prompt_embeds, generator=None, noise_level=None
    ) -> LossParts:
        b = latents.shape[0]
        noise = sample_noise(generator, latents)
        if noise_level is None:
            s = per_sample(generator, self.sample_sigmas, b)
        else:
            s = torch.full((b,), check_noise_level(noise_level))
        s = s.to(latents.device, latents.dtype).view(b, 1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        pred = self.predict(transformer, noisy, s.flatten() * 1000.0, prompt_embeds)
        loss = (pred.float() - (noise - latents).float()).square().mean()
        return LossParts(diffusion=loss, total=loss)

    max_sequence_length = 512  # UMT5 tokens, as the released pipelines use

    def encode_video(self, vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> normalised latents (B, C, F, h, w): (posterior mean - latents_mean) / latents_std."""
        z = vae_posterior_mean(vae, frames)  # (B, C, F, h, w)
        c = z.shape[1]
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, c, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, c, 1, 1, 1)
        return (z - mean) / std  # WanPipeline decodes with latents * std + mean

    def tiny_transformer(self, **overrides: Any) -> nn.Module:
        from diffusers import WanTransformer3DModel

        kwargs = dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64,
        )  # fmt: skip
        kwargs.update(overrides)
        return WanTransformer3DModel(**kwargs)
