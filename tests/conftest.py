"""What the tests share: tiny real models (the actual diffusers / transformers classes in tiny configs), tiny
data, folders and caches built once per session, and the in-process kill that resume tests use.

Session fixtures are built once and shared by every test file: treat what they return as read-only and write
under your own `tmp_path`. Plain helpers are imported by name (`from conftest import tiny_transformer`); pytest
puts this folder on `sys.path`, as it does for tests/launcher.py and tests/run_cli.py.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from run_cli import die_at_call
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from moalign.backbones import get_backbone
from moalign.data.cache_writer import CacheWriter
from moalign.data.sampling import DataConfig
from moalign.playground.basemodel import BaseModelConfig
from moalign.playground.pretrain_encoder import MAEModelConfig
from moalign.playground.scenes import SynthConfig
from moalign.playground.study import StudyConfig

# The tests' clip geometry: 9 frames (3 latent frames, 4 encoder tubelets after frame 0) at 32x32.
MICRO_DATA = DataConfig(num_frames=9, height=32, width=32)
# The demo's base model (VAE, MiniLM text encoder, CogVideoX transformer) at that geometry, trained 2 steps.
MICRO_BASE = BaseModelConfig(
    num_frames=9, height=32, width=32, vae_channels=(8, 8, 8), latent_channels=4, vae_steps=2, vae_window=9,
    vae_val_clips=2, text_length=16, num_layers=2, num_attention_heads=2, attention_head_dim=8, log_every=1,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ tiny models


def tiny_transformer(family: str, *, seed: int = 0, **overrides) -> nn.Module:
    """The family's tiny transformer (`BackboneSpec.tiny_transformer`: its real diffusers class, 4 blocks, 32
    wide), with random weights seeded by `seed`; `overrides` change its config."""
    torch.manual_seed(seed)
    return get_backbone(family).tiny_transformer(**overrides)


def tiny_videomae(
    image_size=32, patch=8, frames=4, tubelet=2, width=32, depth=3, heads=2, mean_pool=True, seed=0
) -> nn.Module:
    """A tiny transformers VideoMAEModel (eval mode) with every weight random, so a wrong wiring shows."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(seed)
    config = VideoMAEConfig(
        image_size=image_size, patch_size=patch, num_frames=frames, tubelet_size=tubelet, hidden_size=width,
        num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=2 * width, layer_norm_eps=1e-6,
        use_mean_pooling=mean_pool,
    )  # fmt: skip
    model = VideoMAEModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


WORDS = "a an the red green blue yellow purple orange cyan white ball balls falls bounces once twice on floor and".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the playground captions' words."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_pipeline(family: str):
    """The family's diffusers pipeline with tiny random parts (text encoder, VAE, transformer), seeded, offline."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    spec = get_backbone(family)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    if family == "cogvideox":
        text = T5EncoderModel(
            T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.0)
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )  # fmt: skip
        scheduler = spec.scheduler
    else:
        text = UMT5EncoderModel(
            UMT5Config(
                vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.0
            )
        )
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 2.0, 1.0, 0.5],
        )  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler()
    return spec.pipeline_class(
        tokenizer=tok, text_encoder=text, vae=vae, transformer=spec.tiny_transformer(), scheduler=scheduler
    )


# Fields of a released transformer's architecture that are not sizes (positional scheme, patching, norms): the
# tiny stand-in of that model keeps them, so a preset's tiny run takes the real model's code path.
ARCHITECTURE_FLAGS = {
    "cogvideox": ("patch_size", "temporal_compression_ratio", "use_rotary_positional_embeddings"),
    "wan": ("patch_size", "cross_attn_norm", "qk_norm", "eps"),
}


def tiny_pipeline_like(architecture: str):
    """`tiny_pipeline` whose transformer keeps the non-size flags of a released model (a key of the family
    module's ARCHITECTURES, e.g. "cogvideox-5b": RoPE); CogVideoX-5B also gets its scheduler's SNR shift."""
    import importlib

    family = "wan" if architecture.startswith("wan") else "cogvideox"
    real = importlib.import_module(f"moalign.backbones.{family}").ARCHITECTURES[architecture]
    pipe = tiny_pipeline(family)
    flags = {k: real[k] for k in ARCHITECTURE_FLAGS[family]}
    pipe.register_modules(transformer=tiny_transformer(family, seed=1, **flags))
    if architecture == "cogvideox-5b":  # the released 5B scheduler config (2B: 3.0)
        from moalign.backbones.cogvideox import make_scheduler

        pipe.register_modules(scheduler=make_scheduler(snr_shift_scale=1.0))
    return pipe


@pytest.fixture(scope="session")
def tiny_cogvideox_pipeline(tmp_path_factory) -> Path:
    """`tiny_pipeline("cogvideox")` saved as a diffusers pipeline folder (stands in for a hub id)."""
    path = tmp_path_factory.mktemp("pipe") / "cogvideox"
    tiny_pipeline("cogvideox").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def videomae_folder(tmp_path_factory) -> Path:
    """A random 2-block, 32-wide VideoMAE (patch 8, 8 frames at 32x32) saved as a transformers folder."""
    path = tmp_path_factory.mktemp("videomae") / "encoder"
    tiny_videomae(frames=8, depth=2).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------- tiny data, folders, caches


def pixels(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Random pixel values (B, T, 3, H, W), the transformers VideoMAE layout."""
    return torch.randn(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


def texture(h: int, w: int | None = None, seed: int = 0, blur: float = 2.0) -> np.ndarray:
    """A smooth random RGB texture (h, w, 3) uint8, square when `w` is None: noise blurred by a Gaussian of
    `blur` px and stretched to 0..255, so optical flow can lock on to it."""
    noise = np.random.default_rng(seed).random((h, w or h, 3)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), blur)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def playground(tmp_path_factory) -> Callable[[int], Path]:
    """`playground(n)`: a folder of the first `n` playground clips (seed 0) at MICRO_DATA's geometry, written
    once per `n` (a clip does not depend on how many are written)."""
    from moalign.playground.scenes import SynthConfig
    from moalign.playground.synth import write_playground

    @cache
    def folder(num_clips: int) -> Path:
        path = tmp_path_factory.mktemp(f"playground-{num_clips}") / "data"
        write_playground(
            path, SynthConfig(num_clips=num_clips, num_frames=9, height=32, width=32), progress=False
        )
        return path

    return folder


def write_stage2_caches(root: Path, num_clips: int) -> None:
    """Random stage-2 caches of `num_clips` clips for the tiny CogVideoX transformer: root/latents (latents
    (3, 4, 8, 8) in (F, C, H, W), prompt_embeds (226, 32)) and root/targets (motion (4, 2, 2, 8) and raw
    encoder (4, 2, 2, 12) tokens, float16), seeded."""
    g = torch.Generator().manual_seed(0)
    ident = {"manifest_sha256": "abc", "num_clips": num_clips}
    w = CacheWriter(root / "latents", "latents", {**ident, "backbone": "cogvideox"}, num_clips, shard_size=4)
    for s in w.shards_todo():
        w.write_shard(s, {i: {"latents": torch.randn(3, 4, 8, 8, generator=g),
                              "prompt_embeds": torch.randn(226, 32, generator=g)} for i in w.items_of(s)})  # fmt: skip
    w.finalize()
    t = CacheWriter(root / "targets", "teacher_targets", ident, num_clips, shard_size=4)
    for s in t.shards_todo():
        t.write_shard(s, {i: {"motion": torch.randn(4, 2, 2, 8, generator=g).half(),
                              "encoder": torch.randn(4, 2, 2, 12, generator=g).half()} for i in t.items_of(s)})  # fmt: skip
    t.finalize()


@pytest.fixture(scope="session")
def stage2_caches(tmp_path_factory) -> Callable[[int], Path]:
    """`stage2_caches(n)`: a folder holding `write_stage2_caches(folder, n)`, written once per `n`."""

    @cache
    def folder(num_clips: int) -> Path:
        path = tmp_path_factory.mktemp(f"stage2-caches-{num_clips}")
        write_stage2_caches(path, num_clips)
        return path

    return folder


@pytest.fixture(scope="session")
def stage1_run(playground, videomae_folder, tmp_path_factory) -> SimpleNamespace:
    """A finished 6-step stage-1 run (a motion teacher) on 10 playground clips with `videomae_folder` as its
    encoder: data, cfg (its Stage1Config), folder (the run folder) and metrics (what train_stage1 returned)."""
    from moalign.encoder import EncoderConfig
    from moalign.flow_decoder import FlowDecoderConfig
    from moalign.motion_projector import MotionProjectorConfig
    from moalign.stage1 import Stage1Config, train_stage1

    data, folder = playground(10), tmp_path_factory.mktemp("stage1") / "run"
    cfg = Stage1Config(
        data=MICRO_DATA, encoder=EncoderConfig(path=str(videomae_folder), input_size=(32, 32)),
        projector=MotionProjectorConfig(hidden_dim=16), decoder=FlowDecoderConfig(hidden_dim=8), val_clips=3,
        steps=6, batch_size=4, warmup_steps=1, log_every=1, val_every=3, checkpoint_every=3,
    )  # fmt: skip
    metrics = train_stage1(data, folder, cfg, progress=False)
    return SimpleNamespace(data=data, cfg=cfg, folder=folder, metrics=metrics)


# ---------------------------------------------------------------------------------------------- interruption


@contextmanager
def interrupted_at_call(target: str, count: int) -> Iterator[None]:
    """Inside the block, the `count`-th call of TARGET ("MODULE.ATTR", looked up through its module at call
    time) raises KeyboardInterrupt before it runs, as a kill would stop the run there; TARGET is restored on
    exit. The same kill as a real SIGKILL of a fresh process: `launcher.run_moalign(..., kill=(TARGET, N))`."""

    def interrupt(args: tuple) -> None:
        raise KeyboardInterrupt(f"simulated kill at call {count} of {target}")

    restore = die_at_call(target, count, interrupt)
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------- micro recipe

MICRO_MODEL = MAEModelConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
    decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
)  # fmt: skip


def micro_recipe():
    """The tiny preset at micro size: the demo and the study (2 seeds x none, moalign) end to end in seconds."""
    from moalign.presets import tiny

    base = tiny()  # not get_preset: tests patch it to return this recipe
    return replace(
        base,
        synth=SynthConfig(num_clips=10, num_frames=9, height=32, width=32, radius=(5.0, 8.0)),
        pretrain=replace(base.pretrain, data=MICRO_DATA, model=MICRO_MODEL, input_size=(32, 32), steps=4,
                         batch_size=4, log_every=1),
        stage1=replace(base.stage1, data=MICRO_DATA, encoder=replace(base.stage1.encoder, input_size=(32, 32)),
                       val_clips=3, steps=4, batch_size=4, val_every=2, checkpoint_every=2, log_every=1),
        demo=replace(
            base.demo, base=MICRO_BASE, eval_clips=2, generation_steps=2, gif_prompts=2,
            base_training=replace(base.demo.base_training, steps=2, batch_size=4, log_every=1),
            arm_training=replace(base.demo.arm_training, steps=2, batch_size=4, log_every=1, checkpoint_every=1),
        ),
        study=StudyConfig(arms=("none", "moalign"), seeds=(0, 1), eval_clips=4, checkpoint_every=1,
                          noise_levels=(0.5,), bootstrap_samples=200, grid_prompts=2),
    )  # fmt: skip
