"""Official VideoMAEv2 checkpoints -> VideoMAEModel: outputs match a re-implementation of the official ViT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import pixels
from safetensors.torch import save_file
from transformers import VideoMAEModel
from videomaev2_reference import PretrainVisionTransformer, VisionTransformer, randomize_

import moalign.convert_videomaev2 as conv
from moalign.convert_videomaev2 import convert_checkpoint, convert_state_dict, load_official_checkpoint
from moalign.encoder import EncoderConfig, VideoEncoder, sinusoid_table
from moalign.errors import MoalignError
from moalign.tokens import tokens_to_grid

WIDTH = 48


def finetune_vit(**kwargs) -> VisionTransformer:
    """Tiny finetune-layout ViT: 4 frames at 32x32, patch 8, tubelet 2 -> a 2x4x4 grid."""
    base = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=WIDTH, depth=2, num_heads=6, all_frames=4)
    return randomize_(VisionTransformer(**{**base, **kwargs}), seed=1).eval()


def save_finetune(path, vit, prefix="", args=True):
    """Saved the way the official finetuning script does: {'module': state_dict, 'args': Namespace, ...}."""
    sd = {prefix + k: v for k, v in vit.state_dict().items()}
    ns = argparse.Namespace(model="vit_small_patch8_32", num_frames=4, input_size=32, tubelet_size=2, lr=1e-3)
    obj = {"module": sd, "epoch": 7}
    if args:
        obj["args"] = ns
    torch.save(obj, path)
    return path


def official(x: torch.Tensor) -> torch.Tensor:
    """transformers (B, T, C, H, W) -> official (B, C, T, H, W)."""
    return x.permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    """Pretrain layout (4 frames, 64x64, patch 16), saved like the official script: model, optimizer, args."""
    model = PretrainVisionTransformer(
        img_size=64,
        patch_size=16,
        encoder_embed_dim=WIDTH,
        encoder_depth=2,
        encoder_num_heads=4,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        num_frames=4,
    )
    randomize_(model, seed=0).eval()
    path = tmp_path_factory.mktemp("pt") / "pretrain.pth"
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    args = argparse.Namespace(
        model="pretrain_videomae_tiny_patch16_64", num_frames=4, input_size=64, mask_ratio=0.9
    )
    obj = {
        "model": model.state_dict(),
        "optimizer": optimizer,
        "epoch": 3,
        "scaler": {"scale": 2.0},
        "args": args,
    }
    torch.save(obj, path)
    return path, model


def test_pretrain_layout_matches_official_forward(pretrain_ckpt, tmp_path):
    path, ref = pretrain_ckpt
    report = convert_checkpoint(path, tmp_path / "enc", num_heads=4)
    arch = report["architecture"]
    assert report["layout"] == "pretrain" and report["prefix"] == "encoder."
    assert (arch["width"], arch["depth"], arch["num_heads"], arch["mlp_width"]) == (WIDTH, 2, 4, 4 * WIDTH)
    assert arch["num_heads_from"] == "given (num_heads)"  # "tiny" is no official size: the override is needed
    assert (arch["patch_size"], arch["tubelet_size"], arch["num_frames"], arch["image_size"]) == (
        16,
        2,
        4,
        64,
    )
    assert arch["final_norm"] == "layernorm" and arch["layer_norm_eps"] == 1e-6
    for key in (
        "mask_token",
        "encoder_to_decoder.weight",
        "decoder.norm.weight",
        "decoder.blocks.0.attn.qkv.weight",
    ):
        assert key in report["dropped_keys"]
    saved = json.loads((tmp_path / "enc" / "conversion.json").read_text())
    assert saved["source"] == str(path.resolve()) and saved["dropped_keys"] == report["dropped_keys"]

    model, info = VideoMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pv = pixels(2, 4, 64, 64)
    with torch.no_grad():
        ref_tokens = ref.encoder.tokens(official(pv))  # (2, 32, D), pre-norm
        ref_normed = ref.encoder.forward_features(official(pv))
        hf_normed = model(pv).last_hidden_state
    torch.testing.assert_close(hf_normed, ref_normed, atol=1e-5, rtol=1e-5)

    enc = VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "enc"), input_size=(64, 64)))
    assert enc.grid(5) == (2, 4, 4)
    torch.testing.assert_close(enc(pv), tokens_to_grid(ref_tokens, (2, 4, 4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.backbone."])
def test_finetune_layout_matches_official_forward(tmp_path, prefix):
    vit = finetune_vit()
    path = save_finetune(tmp_path / "vit_s_ft.pth", vit, prefix=prefix)
    state_dict, args = load_official_checkpoint(path)
    assert isinstance(args, argparse.Namespace) and args.model == "vit_small_patch8_32"

    report = convert_checkpoint(path, tmp_path / "enc")
    arch = report["architecture"]
    assert report["layout"] == "finetune" and report["prefix"] == prefix
    assert arch["num_heads"] == 6 and "vit_small" in arch["num_heads_from"]  # from the Namespace's model name
    assert (arch["num_frames"], arch["image_size"], arch["patch_size"]) == (4, 32, 8)
    assert arch["final_norm"] is None
    assert {prefix + k for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")} <= set(
        report["dropped_keys"]
    )

    model, info = VideoMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.use_mean_pooling and model.config.num_attention_heads == 6
    pv = pixels(2, 4, 32, 32)
    with torch.no_grad():
        ref_tokens = vit.tokens(official(pv))
        hf_tokens = model(pv).last_hidden_state  # use_mean_pooling=True: no final norm
    torch.testing.assert_close(hf_tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    enc = VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "enc"), input_size=(32, 32)))
    torch.testing.assert_close(enc(pv), tokens_to_grid(ref_tokens, (2, 4, 4)), atol=1e-5, rtol=1e-5)


def test_converted_encoder_at_new_geometry(tmp_path):
    vit = finetune_vit()
    convert_checkpoint(save_finetune(tmp_path / "ft.pth", vit), tmp_path / "enc")
    pv = pixels(1, 8, 48, 64)  # a 9-frame clip after dropping frame 0, at 48x64

    recompute = VideoEncoder.from_pretrained(
        EncoderConfig(path=str(tmp_path / "enc"), input_size=(48, 64), pos_embed="recompute")
    )
    assert recompute.grid(9) == (4, 6, 8)
    # The official code built at the new size (fresh sin-cos table over the new flattened grid).
    resized = VisionTransformer(
        img_size=(48, 64), patch_size=8, num_classes=5, embed_dim=WIDTH, depth=2, num_heads=6, all_frames=8
    ).eval()
    resized.load_state_dict(vit.state_dict())
    with torch.no_grad():
        ref_tokens = resized.tokens(official(pv))
    torch.testing.assert_close(recompute(pv), tokens_to_grid(ref_tokens, (4, 6, 8)), atol=1e-5, rtol=1e-5)

    interp = VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "enc"), input_size=(48, 64)))
    out = interp.encode(torch.randint(0, 256, (1, 9, 60, 80, 3), dtype=torch.uint8))
    assert out.shape == (1, 4, 6, 8, WIDTH) and torch.isfinite(out).all()


def test_full_qkv_bias_is_split_and_key_bias_dropped(tmp_path):
    vit = finetune_vit(full_qkv_bias=True)
    assert vit.blocks[0].attn.qkv.bias[WIDTH : 2 * WIDTH].abs().sum() > 0  # a real key bias
    report = convert_checkpoint(save_finetune(tmp_path / "ft.pth", vit), tmp_path / "enc")
    assert any("key bias" in n for n in report["notes"])
    model = VideoMAEModel.from_pretrained(tmp_path / "enc")
    pv = pixels(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pv).last_hidden_state, vit.tokens(official(pv)), atol=1e-5, rtol=1e-5
        )


def test_no_qkv_bias(tmp_path):
    vit = finetune_vit(qkv_bias=False, use_mean_pooling=False)
    report = convert_checkpoint(save_finetune(tmp_path / "ft.pth", vit), tmp_path / "enc")
    assert report["architecture"]["qv_bias"] is False and report["architecture"]["final_norm"] == "layernorm"
    model = VideoMAEModel.from_pretrained(tmp_path / "enc")
    assert model.encoder.layer[0].attention.attention.query.bias is None
    pv = pixels(1, 4, 32, 32)
    with torch.no_grad():
        out = model(pv).last_hidden_state  # final norm applied, as the official `norm`
        torch.testing.assert_close(out, vit.norm(vit.tokens(official(pv))), atol=1e-5, rtol=1e-5)


def test_safetensors_input_needs_heads_when_width_is_unknown(tmp_path):
    vit = finetune_vit(patch_size=16)  # no args: default geometry 16x224, kept small with patch 16
    save_file(vit.state_dict(), str(tmp_path / "ft.safetensors"))
    with pytest.raises(MoalignError, match="--num-heads"):
        convert_checkpoint(tmp_path / "ft.safetensors", tmp_path / "enc")
    assert not (tmp_path / "enc").exists()
    report = convert_checkpoint(tmp_path / "ft.safetensors", tmp_path / "enc", num_heads=6)
    assert report["architecture"]["num_heads_from"] == "given (num_heads)"
    assert report["architecture"]["geometry_from"].startswith("defaults")


@pytest.mark.parametrize(
    ("name", "width", "heads"),
    [
        ("vit_small_patch16_224", 384, 6),
        ("vit_base_patch16_224", 768, 12),
        ("vit_large_patch16_224", 1024, 16),
        ("vit_huge_patch16_224", 1280, 16),
        ("vit_giant_patch14_224", 1408, 16),
        ("pretrain_videomae_giant_patch14_224", 1408, 16),
        ("pretrain_videomae_base_patch16_224", 768, 12),
        (None, 768, 12),
        (None, 1408, 16),  # 1408 / 64 would give 22: the table knows ViT-g has 16
        (None, 512, 8),
    ],
)
def test_heads_inference(name, width, heads):
    args = argparse.Namespace(model=name) if name else None
    assert conv._num_heads(width, args, None)[0] == heads
    assert conv._num_heads(width, args, 2)[0] == 2


def test_stored_fixed_pos_embed_is_dropped_and_learned_one_refused():
    sd = finetune_vit().state_dict()
    fixed = {**sd, "pos_embed": sinusoid_table(32, WIDTH)}
    _, new, report = convert_state_dict(fixed, num_heads=6)
    assert "pos_embed" in report["dropped_keys"] and "pos_embed" not in new
    learned = {**sd, "pos_embed": torch.randn(1, 32, WIDTH)}
    with pytest.raises(MoalignError, match="learned position table"):
        convert_state_dict(learned, num_heads=6)


def test_layer_scale_is_refused():
    sd = finetune_vit(init_values=0.1).state_dict()
    with pytest.raises(MoalignError, match="Layer scale"):
        convert_state_dict(sd, num_heads=6)


class NotAllowed:
    pass


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, "not a VideoMAEv2 ViT"),
        (
            {"projector.0.weight": torch.zeros(4, 4), "flow_decoder.conv.weight": torch.zeros(2)},
            "not a VideoMAEv2",
        ),
        (
            {"embeddings.patch_embeddings.projection.weight": torch.zeros(1)},
            "already a transformers VideoMAE",
        ),
        ({"epoch": 3, "step": 10}, "without tensors"),
        ([1, 2, 3], "holds a list"),
        ({"model": NotAllowed()}, "cannot load .* safely"),
        ("not a checkpoint at all", "cannot load"),
    ],
)
def test_wrong_kind_of_file(tmp_path, content, match):
    path = tmp_path / "thing.pth"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(MoalignError, match=match) as info:
        convert_checkpoint(path, tmp_path / "enc")
    assert "thing.pth" in str(info.value)
    assert not (tmp_path / "enc").exists()


def test_wrong_kind_safetensors_and_missing_file(tmp_path):
    save_file(
        {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, str(tmp_path / "dit.safetensors")
    )
    with pytest.raises(MoalignError, match="patch_embed"):
        convert_checkpoint(tmp_path / "dit.safetensors", tmp_path / "enc")
    with pytest.raises(MoalignError, match="not found"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "enc")


def test_overwrite_refused_then_allowed(tmp_path):
    path = save_finetune(tmp_path / "ft.pth", finetune_vit())
    convert_checkpoint(path, tmp_path / "enc")
    marker = tmp_path / "enc" / "marker.txt"
    marker.write_text("old")
    with pytest.raises(MoalignError, match="already exists"):
        convert_checkpoint(path, tmp_path / "enc")
    assert marker.exists()
    convert_checkpoint(path, tmp_path / "enc", overwrite=True)
    assert not marker.exists() and (tmp_path / "enc" / "conversion.json").is_file()
    VideoMAEModel.from_pretrained(tmp_path / "enc")


def test_failed_conversion_leaves_no_temp_folder(tmp_path, monkeypatch):
    path = save_finetune(tmp_path / "ft.pth", finetune_vit())

    def broken(folder):
        assert (folder / "config.json").is_file()  # the failure happens mid-write
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv, "_verify", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(path, tmp_path / "out" / "enc")
    assert list((tmp_path / "out").iterdir()) == []
