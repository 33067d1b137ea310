"""The named presets (recipes): one config per stage, from the 2-core playground to the paper's GPU recipes.

Presets derive from each other by replacing fields; the CLI picks one (`--preset NAME`, `moalign config
--list`) and applies a few overrides (`moalign stage1 --set lr=3e-4`; the demo takes whole-recipe paths,
`moalign demo --set stage1.lr=3e-4`). Only the entry points (the CLI, the demo)
import this module: each stage reads its own config class, defined beside it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, replace

from moalign.align_projector import AlignProjectorConfig
from moalign.alignment import AlignConfig
from moalign.data.sampling import DataConfig
from moalign.encoder import EncoderConfig
from moalign.flow_decoder import FlowDecoderConfig
from moalign.generate import GenerateConfig
from moalign.motion_projector import MotionProjectorConfig
from moalign.playground.basemodel import BaseModelConfig
from moalign.playground.demo import DemoConfig
from moalign.playground.pretrain_encoder import MAEModelConfig, PretrainEncoderConfig
from moalign.playground.scenes import SynthConfig
from moalign.playground.study import StudyConfig
from moalign.stage1 import Stage1Config
from moalign.stage2 import Stage2Config


@dataclass(frozen=True)
class Recipe:
    """One config per stage (and `generate`); `moalign <command> --preset NAME` uses the matching part."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    pretrain: PretrainEncoderConfig = field(default_factory=PretrainEncoderConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    demo: DemoConfig = field(default_factory=DemoConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def _playground_generate(recipe: Recipe) -> GenerateConfig:
    """Videos like the demo's: its base model's geometry, its sampler settings, the clips' frame rate."""
    base, demo = recipe.demo.base, recipe.demo
    return GenerateConfig(
        num_frames=base.num_frames, height=base.height, width=base.width, steps=demo.generation_steps,
        guidance_scale=demo.guidance_scale, fps=recipe.synth.fps,
    )  # fmt: skip


def tiny() -> Recipe:
    """The playground on 2 CPU cores in minutes: 17 frames at 64x64, a 4-block 128-d VideoMAE (patch 8).

    Departures from the paper's stage-1 settings, each measured on this preset (docs/stage1.md): flow at
    1/2 of the encoder input (at 64x64, 1/4 cannot draw the balls: even the exact flow, downsampled and
    upsampled again, keeps a third of the zero-motion error), a Huber flow loss (L1 stays on the all-zero
    plateau), and balls of radius 7 to 12 px so that motion covers a learnable share of the pixels.
    """
    data = DataConfig(num_frames=17, height=64, width=64)
    recipe = Recipe(
        synth=SynthConfig(
            num_clips=192, num_frames=17, height=64, width=64, radius=(7.0, 12.0), background="plain"
        ),
        pretrain=PretrainEncoderConfig(data=data, lr=3e-4, mask_ratio=0.9),
        stage1=Stage1Config(
            data=data,
            decoder=FlowDecoderConfig(hidden_dim=96, stride=2),
            flow_loss="huber",
            val_clips=16,
            steps=1500,
            val_every=500,
            checkpoint_every=500,
        ),
        stage2=Stage2Config(
            backbone="cogvideox",
            align=AlignConfig(mode="moalign", layers=(1,), projector=AlignProjectorConfig(hidden_dim=256)),
            lora_rank=0,
            steps=200,
            batch_size=4,
            lr=1e-4,
        ),
        demo=DemoConfig(
            arm_training=Stage2Config(
                align=AlignConfig(
                    mode="moalign",
                    layers=(1,),
                    projector=AlignProjectorConfig(hidden_dim=256, grid_match="resample_teacher"),
                ),
                steps=200,
                batch_size=8,
                lr=3e-4,
                warmup_steps=20,
                checkpoint_every=100,
            ),
        ),  # fmt: skip
    )
    return replace(recipe, generate=_playground_generate(recipe))


def small() -> Recipe:
    """The same playground code, bigger: for a GPU (128x128, patch 16, 8-block 384-d encoder, more clips/steps)."""
    base = tiny()
    data = DataConfig(num_frames=17, height=128, width=128)
    model = MAEModelConfig(
        hidden_size=384,
        num_hidden_layers=8,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        decoder_hidden_size=192,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=6,
        decoder_intermediate_size=768,
    )
    recipe = Recipe(
        synth=replace(base.synth, num_clips=2048, height=128, width=128, radius=(14.0, 24.0)),
        pretrain=replace(
            base.pretrain, data=data, model=model, input_size=(128, 128), mask_ratio=0.9, steps=6000,
            batch_size=32, lr=1.5e-3, warmup_steps=400, mixed_precision="bf16",
        ),
        stage1=replace(
            base.stage1, data=data, encoder=replace(base.stage1.encoder, input_size=(128, 128)),
            projector=MotionProjectorConfig(hidden_dim=512), decoder=FlowDecoderConfig(hidden_dim=128),
            val_clips=64, steps=4000, batch_size=32, lr=1e-3, warmup_steps=200, val_every=500,
            checkpoint_every=1000, mixed_precision="bf16",
        ),
        demo=DemoConfig(
            base=BaseModelConfig(
                height=128, width=128, vae_channels=(32, 64, 64), vae_steps=3000, vae_batch_size=8, vae_window=17,
                vae_val_clips=32, num_layers=8, num_attention_heads=6, attention_head_dim=64, mixed_precision="bf16",
            ),
            base_training=replace(
                base.demo.base_training, steps=10000, batch_size=32, lr=5e-4, warmup_steps=200,
                checkpoint_every=1000, mixed_precision="bf16",
            ),
            arm_training=replace(
                base.demo.arm_training, steps=1000, batch_size=32, lr=1e-4, warmup_steps=50, checkpoint_every=250,
                mixed_precision="bf16",
                align=replace(base.demo.arm_training.align, layers=(4,),
                              projector=AlignProjectorConfig(hidden_dim=512, grid_match="resample_teacher")),
            ),
            eval_clips=64,
        ),
        study=StudyConfig(eval_clips=64, checkpoint_every=250),
    )  # fmt: skip
    return replace(recipe, generate=_playground_generate(recipe))


def cogvideox_2b() -> Recipe:
    """The paper's recipe: CogVideoX-2B full fine-tune, 49 frames at 480x720, VideoMAEv2 ViT-B at 160x240.

    Stage-1 optimisation settings are ours (the paper gives none); the encoder folder comes from
    `moalign convert-videomaev2 vit_b_k710_dl_from_giant.pth ...` and is passed with --encoder.
    """
    data = DataConfig(num_frames=49, height=480, width=720, fps=8.0)
    return Recipe(
        synth=tiny().synth,
        pretrain=PretrainEncoderConfig(data=data),
        stage1=Stage1Config(
            data=data,
            encoder=EncoderConfig(input_size=(160, 240)),
            projector=MotionProjectorConfig(in_dim=768, hidden_dim=512),
            decoder=FlowDecoderConfig(hidden_dim=128),
            flow_method="dis",
            feature_cache="none",
            val_clips=64,
            steps=10000,
            batch_size=32,
            lr=1e-4,
            warmup_steps=500,
            val_every=1000,
            checkpoint_every=1000,
            mixed_precision="bf16",
        ),
        # the paper's CogVideoX-2B recipe (arXiv 2510.19022): full fine-tune, block 17 ("layer 18"),
        # lambda 0.5, tau 10, lr 2e-6, bf16, 4,000 steps at a global batch of 32 (stage 2's batch_size is the
        # global batch, split evenly across processes: 4 per GPU on 8 GPUs)
        stage2=Stage2Config(
            backbone="cogvideox",
            model="THUDM/CogVideoX-2b",
            align=AlignConfig(mode="moalign", layers=(17,), lam=0.5, tau=10.0),
            lora_rank=0,
            steps=4000,
            batch_size=32,
            lr=2e-6,
            warmup_steps=100,
            gradient_checkpointing=True,
            mixed_precision="bf16",
            checkpoint_every=500,
        ),
        generate=GenerateConfig(),  # the defaults: CogVideoX's 49 frames at 480x720, 50 steps, guidance 6
    )


def cogvideox_5b() -> Recipe:
    """CogVideoX-5B with LoRA (rank 128, alpha 64, lr 1e-4), same data geometry and teacher as cogvideox-2b.

    The paper gives no layer for 5B: block 23 of 42 (0-based) sits at the relative depth of 2B's block 17 of 30.
    """
    base = cogvideox_2b()
    return replace(
        base,
        stage2=replace(
            base.stage2, model="THUDM/CogVideoX-5b", align=replace(base.stage2.align, layers=(23,)), lora_rank=128,
            lora_alpha=64.0, lr=1e-4,
        ),
    )  # fmt: skip


def _wan(model: str, layer: int) -> Recipe:
    """Wan2.1 T2V: 81 frames at 480x832, 16 fps; teacher VideoMAEv2 ViT-B at 160x272 (40 x 10 x 17 tokens).

    The teacher is resampled to the latent grid (21 x 30 x 52) instead of VideoREPA's strided conv, whose
    stride does not divide Wan's 52 latent columns; the block-wise relational loss keeps memory bounded.
    LoRA by default (rank 64, alpha 64, lr 1e-4, as the community Wan trainers); the layer sits at the relative
    depth of the paper's CogVideoX-2B choice (block 17 of 30).
    """
    base = cogvideox_2b()
    data = DataConfig(num_frames=81, height=480, width=832, fps=16.0)
    return replace(
        base,
        pretrain=PretrainEncoderConfig(data=data),
        stage1=replace(base.stage1, data=data, encoder=replace(base.stage1.encoder, input_size=(160, 272))),
        stage2=replace(
            base.stage2, backbone="wan", model=model, lora_rank=64, lora_alpha=64.0, lr=1e-4,
            align=replace(
                base.stage2.align, layers=(layer,),
                projector=replace(base.stage2.align.projector, grid_match="resample_teacher"),
            ),
        ),
        generate=GenerateConfig(  # Wan2.1's sampler: 50 steps, guidance 5
            num_frames=data.num_frames, height=data.height, width=data.width, steps=50, guidance_scale=5.0,
            fps=data.fps,
        ),
    )  # fmt: skip


def wan21_1_3b() -> Recipe:
    """Wan2.1-T2V-1.3B, LoRA rank 64, block 17 of 30 (0-based), 81 frames at 480x832, teacher resampled to the latents."""
    return _wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 17)


def wan21_14b() -> Recipe:
    """Wan2.1-T2V-14B, LoRA rank 64, block 23 of 40 (0-based), 81 frames at 480x832, teacher resampled to the latents."""
    return _wan("Wan-AI/Wan2.1-T2V-14B-Diffusers", 23)


PRESETS: dict[str, typing.Callable[[], Recipe]] = {
    "tiny": tiny,
    "small": small,
    "cogvideox-2b": cogvideox_2b,
    "cogvideox-5b": cogvideox_5b,
    "wan2.1-1.3b": wan21_1_3b,
    "wan2.1-14b": wan21_14b,
}


def get_preset(name: str) -> Recipe:
    """The recipe of a named preset; an unknown name raises an error listing the valid ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
