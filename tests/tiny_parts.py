"""Tiny real diffusers pipelines (random weights) assembled offline, for tests."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from moalign.backbones import get_backbone
from moalign.data.cache_writer import CacheWriter

WORDS = "a an the red green blue yellow purple orange cyan white ball balls falls bounces once twice on floor and".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_pipeline(family: str):
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
        return spec.pipeline_class(
            tokenizer=tok,
            text_encoder=text,
            vae=vae,
            transformer=spec.tiny_transformer(),
            scheduler=spec.scheduler,
        )
    text = UMT5EncoderModel(
        UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.0)
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 2.0, 1.0, 0.5],
    )  # fmt: skip
    return spec.pipeline_class(
        tokenizer=tok,
        text_encoder=text,
        vae=vae,
        transformer=spec.tiny_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
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
    spec = get_backbone(family)
    real = importlib.import_module(f"moalign.backbones.{family}").ARCHITECTURES[architecture]
    pipe = tiny_pipeline(family)
    torch.manual_seed(1)
    pipe.register_modules(
        transformer=spec.tiny_transformer(**{k: real[k] for k in ARCHITECTURE_FLAGS[family]})
    )
    if architecture == "cogvideox-5b":  # the released 5B scheduler config (2B: 3.0)
        from moalign.backbones.cogvideox import make_scheduler

        pipe.register_modules(scheduler=make_scheduler(snr_shift_scale=1.0))
    return pipe


def save_tiny_videomae(path) -> None:
    """A random 2-block, 32-wide VideoMAE (patch 8, 8 frames at 32x32) saved as a transformers folder."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    VideoMAEModel(
        VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, use_mean_pooling=True,
        )
    ).save_pretrained(path)  # fmt: skip


def write_stage2_caches(root, num_clips: int) -> None:
    """Random stage-2 caches of `num_clips` clips for the tiny CogVideoX transformer: root/latents (latents
    (3, 4, 8, 8) in (F, C, H, W), prompt_embeds (226, 32)) and root/targets (motion (4, 2, 2, 8) and raw
    encoder (4, 2, 2, 12) tokens, float16), seeded."""
    g = torch.Generator().manual_seed(0)
    ident = {"manifest_sha256": "abc", "num_clips": num_clips}
    w = CacheWriter(root / "latents", "latents", ident, num_clips, shard_size=4)
    for s in w.shards_todo():
        w.write_shard(s, {i: {"latents": torch.randn(3, 4, 8, 8, generator=g),
                              "prompt_embeds": torch.randn(226, 32, generator=g)} for i in w.items_of(s)})  # fmt: skip
    w.finalize()
    t = CacheWriter(root / "targets", "teacher_targets", ident, num_clips, shard_size=4)
    for s in t.shards_todo():
        t.write_shard(s, {i: {"motion": torch.randn(4, 2, 2, 8, generator=g).half(),
                              "encoder": torch.randn(4, 2, 2, 12, generator=g).half()} for i in t.items_of(s)})  # fmt: skip
    t.finalize()
