"""The frozen video encoder: token grids, layer choice, freezing, preprocessing, position tables, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pixels, tiny_videomae
from transformers import VideoMAEForPreTraining
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from moalign.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderConfig,
    VideoEncoder,
    interpolate_pos_embed,
    sinusoid_table,
)
from moalign.errors import MoalignError
from moalign.tokens import tokens_to_grid


def clip(b, t, h, w, seed=2) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_sinusoid_table_matches_transformers():
    for n, d in [(32, 48), (1568, 64), (7, 33)]:
        assert torch.equal(sinusoid_table(n, d), get_sinusoid_encoding_table(n, d))


def test_interpolate_pos_embed_identity_is_bit_exact():
    table = sinusoid_table(2 * 4 * 4, 16)
    out = interpolate_pos_embed(table, (2, 4, 4), (2, 4, 4))
    assert torch.equal(out, table)


def test_interpolate_pos_embed_copies_unchanged_axes():
    # A table that varies only along rows: resampling time and columns must leave each row's vector as is.
    t0, h0, w0, d = 2, 4, 3, 8
    rows = torch.randn(h0, d)
    table = rows[None, :, None, :].expand(t0, h0, w0, d).reshape(1, -1, d)
    out = interpolate_pos_embed(table, (t0, h0, w0), (5, h0, 7))
    assert out.shape == (1, 5 * h0 * 7, d)
    grid = out.reshape(5, h0, 7, d)
    torch.testing.assert_close(grid, rows[None, :, None, :].expand(5, h0, 7, d), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("frames", "size", "patch", "raw", "expected"),
    [
        (17, (64, 64), 8, (48, 80), (8, 8, 8)),
        (49, (160, 240), 16, (120, 180), (24, 10, 15)),  # VideoREPA geometry: 49 frames -> 24x10x15
        (9, (32, 48), 8, (32, 48), (4, 4, 6)),
    ],
)
def test_token_grid_shapes(frames, size, patch, raw, expected):
    model = tiny_videomae(image_size=32, patch=patch, width=16, depth=1, heads=2)
    enc = VideoEncoder(model, EncoderConfig(input_size=size))
    assert enc.grid(frames) == expected
    tokens = enc.encode(clip(1, frames, *raw))
    assert tokens.shape == (1, *expected, 16)
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("mean_pool", [True, False])
def test_matches_videomae_at_pretrain_geometry(mean_pool):
    model = tiny_videomae(mean_pool=mean_pool)
    enc = VideoEncoder(model, EncoderConfig(input_size=(32, 32)))
    pv = pixels(2, 4, 32, 32)
    captured = {}
    model.encoder.layer[-1].register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        hf = model(pv).last_hidden_state
    ours = enc(pv)
    assert ours.shape == (2, 2, 4, 4, 32)
    pre_norm = tokens_to_grid(captured["out"], (2, 4, 4))
    torch.testing.assert_close(ours, pre_norm, atol=1e-6, rtol=0)
    if mean_pool:  # no final norm: the model's own output is the pre-norm last block
        torch.testing.assert_close(ours, tokens_to_grid(hf, (2, 4, 4)), atol=1e-6, rtol=0)
    else:  # the model applies its final layernorm; the encoder output is taken before it
        assert not torch.allclose(ours, tokens_to_grid(hf, (2, 4, 4)), atol=1e-3)


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
def test_layer_selection_runs_blocks_up_to_layer(layer):
    model = tiny_videomae(depth=3)
    enc = VideoEncoder(model, EncoderConfig(layer=layer, input_size=(32, 32)))
    k = layer % 3
    assert enc.layer_index == k and enc.num_layers == 3
    outputs = {}
    for i, block in enumerate(model.encoder.layer):
        block.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
    pv = pixels(1, 4, 32, 32)
    with torch.no_grad():
        model(pv)
    expected = tokens_to_grid(outputs[k], (2, 4, 4))
    outputs.clear()
    ours = enc(pv)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert sorted(outputs) == list(range(k + 1)), "blocks after `layer` must not run"
    assert len(model.encoder.layer) == 3, "later blocks are kept in the module"


def test_frozen_and_stays_in_eval():
    model = tiny_videomae()
    model.train()
    enc = VideoEncoder(model, EncoderConfig(input_size=(32, 32)))
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training and not model.training
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and not model.training
    pv = pixels(1, 4, 32, 32).requires_grad_(True)
    out = enc(pv)
    assert out.grad_fn is None and not out.requires_grad


def test_preprocess_drops_frame0_resizes_and_normalises():
    enc = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(32, 48)))
    frames = torch.zeros(2, 17, 40, 56, 3, dtype=torch.uint8)
    frames[:, 0] = 255  # frame 0 white, the rest a constant colour
    frames[:, 1:] = torch.tensor([10, 128, 250], dtype=torch.uint8)
    x = enc.preprocess(frames)
    assert x.shape == (2, 16, 3, 32, 48) and x.dtype == torch.float32
    expected = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(x, expected.view(1, 1, 3, 1, 1).expand_as(x), atol=1e-5, rtol=0)

    keep = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(40, 56), drop_first_frame=False))
    y = keep.preprocess(frames[:, :16])
    assert y.shape == (2, 16, 3, 40, 56)
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y[:, 0], white.view(1, 3, 1, 1).expand_as(y[:, 0]), atol=1e-6, rtol=0)


def test_preprocess_clamps_bicubic_overshoot():
    enc = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1)))
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8)
    frames = checker[None, None, :, :, None].expand(1, 5, 16, 16, 3).contiguous()
    x = enc.preprocess(frames)  # upsampling a checkerboard makes bicubic overshoot
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.min() == 0.0 and x.max() == 1.0


def test_pos_embed_modes():
    model = tiny_videomae()
    pv = pixels(1, 8, 48, 64)
    interp = VideoEncoder(model, EncoderConfig(input_size=(48, 64), pos_embed="interpolate"))
    recomp = VideoEncoder(model, EncoderConfig(input_size=(48, 64), pos_embed="recompute"))
    grid = (4, 6, 8)
    table = recomp.position_table(grid, torch.device("cpu"), torch.float32)
    assert torch.equal(table, sinusoid_table(4 * 6 * 8, 32))
    assert recomp.position_table(grid, torch.device("cpu"), torch.float32) is table  # cached
    expected = interpolate_pos_embed(model.embeddings.position_embeddings, (2, 4, 4), grid)
    assert torch.equal(interp.position_table(grid, torch.device("cpu"), torch.float32), expected)
    a, b = interp(pv), recomp(pv)
    assert a.shape == b.shape == (1, *grid, 32)
    assert not torch.allclose(a, b)
    # At the pre-training grid both modes use the model's own table.
    pv0 = pixels(1, 4, 32, 32)
    torch.testing.assert_close(interp(pv0), recomp(pv0), atol=0, rtol=0)


def test_from_pretrained_roundtrip_and_dtype(tmp_path):
    model = tiny_videomae()
    model.save_pretrained(tmp_path / "enc")
    cfg = EncoderConfig(path=str(tmp_path / "enc"), input_size=(32, 32))
    enc = VideoEncoder.from_pretrained(cfg)
    pv = pixels(1, 4, 32, 32)
    torch.testing.assert_close(enc(pv), VideoEncoder(model, cfg)(pv), atol=0, rtol=0)
    assert "3 blocks x 32-d" in enc.describe()
    half = VideoEncoder.from_pretrained(cfg, torch_dtype=torch.bfloat16)
    assert half(pv).dtype == torch.bfloat16


def test_from_pretrained_accepts_pretraining_model_folder(tmp_path):
    torch.manual_seed(0)
    full = VideoMAEForPreTraining(tiny_videomae().config)
    full.save_pretrained(tmp_path / "pt")
    enc = VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "pt"), input_size=(32, 32)))
    expected = full.videomae.embeddings.patch_embeddings.projection.weight
    assert torch.equal(enc.model.embeddings.patch_embeddings.projection.weight, expected)


def test_error_layer_out_of_range():
    with pytest.raises(ValueError, match=r"0\.\.2"):
        VideoEncoder(tiny_videomae(depth=3), EncoderConfig(layer=3, input_size=(32, 32)))
    with pytest.raises(ValueError, match="out of range"):
        VideoEncoder(tiny_videomae(depth=3), EncoderConfig(layer=-4, input_size=(32, 32)))


def test_error_sizes_not_divisible_by_patch():
    with pytest.raises(ValueError, match="divisible by the patch size 8: height 30: use 24 or 32 "):
        VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(30, 32)))
    enc = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(32, 32)))
    with pytest.raises(ValueError, match="patch size 8"):
        enc(pixels(1, 4, 36, 32))
    with pytest.raises(ValueError, match="patch size 8"):
        enc.grid(17, 36, 32)


def test_error_frame_count_not_4k_plus_1():
    enc = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(32, 32)))
    with pytest.raises(ValueError, match=r"fill tubelets of 2: use 13 or 17 frames \(4k\+1"):
        enc.preprocess(clip(1, 16, 32, 32))
    with pytest.raises(ValueError, match=r"use 45 or 49 frames \(4k\+1"):
        enc.grid(48)
    with pytest.raises(ValueError, match="tubelets"):
        enc(pixels(1, 5, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(clip(1, 17, 32, 32).float())


def test_error_bad_config_values():
    with pytest.raises(ValueError, match="interpolate"):
        EncoderConfig(pos_embed="bilinear")
    with pytest.raises(ValueError, match="input_size"):
        EncoderConfig(input_size=(0, 32))
    with pytest.raises(ValueError, match="std"):
        EncoderConfig(std=(0.2, 0.0, 0.2))


def test_error_missing_or_unset_path(tmp_path):
    with pytest.raises(MoalignError, match="convert-videomaev2"):
        VideoEncoder.from_pretrained(EncoderConfig(path=None))
    with pytest.raises(MoalignError, match="encoder folder not found") as info:
        VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "nowhere")))
    assert "pretrain-encoder" in str(info.value)


@pytest.mark.parametrize(
    ("files", "found"),
    [
        ({"model_index.json": {"_class_name": "CogVideoXPipeline"}}, "diffusers pipeline"),
        ({"config.json": {"_class_name": "CogVideoXTransformer3DModel"}}, "diffusers model"),
        ({"config.json": {"model_type": "bert"}}, "model_type='bert'"),
        ({"stage1.json": {"stage": 1}, "checkpoint.safetensors": None}, "no config.json"),
    ],
)
def test_error_wrong_kind_of_folder(tmp_path, files, found):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content) if content is not None else "x")
    with pytest.raises(MoalignError, match="not a VideoMAE model folder") as info:
        VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path)))
    assert found in str(info.value) and "convert-videomaev2" in str(info.value)


def test_error_points_at_videomae_subfolder(tmp_path):
    tiny_videomae().save_pretrained(tmp_path / "run" / "encoder")
    with pytest.raises(MoalignError, match="subfolder"):
        VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "run")))


def test_error_settings_that_do_not_fit_the_loaded_encoder(tmp_path):
    tiny_videomae(depth=3).save_pretrained(tmp_path / "enc")
    with pytest.raises(MoalignError, match=r"out of range.*0\.\.2"):  # a user error once a folder is loaded
        VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "enc"), layer=3, input_size=(32, 32)))


def test_error_raw_checkpoint_file(tmp_path):
    path = tmp_path / "vit_b_k710_dl_from_giant.pth"
    torch.save({"module": {}}, path)
    with pytest.raises(MoalignError, match="convert-videomaev2 .*vit_b_k710"):
        VideoEncoder.from_pretrained(EncoderConfig(path=str(path)))


def test_check_clip_names_the_flag_and_the_nearest_frames_before_any_work(tmp_path):
    """Stage 1's clip frames against the encoder's tubelets, as a one-line user error (exit 2 in the CLI) with the
    nearest 4k+1 counts that fit, and the suggested counts pass; with drop_first_frame off no 4k+1 clip fills
    tubelets of 2, and the message says to turn it on. An input size off the patch names both neighbours."""
    enc = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(32, 32)))
    with pytest.raises(MoalignError, match=r"^--num-frames 16: .* use 13 or 17 frames"):
        enc.check_clip(16)
    with pytest.raises(MoalignError, match=r"^--num-frames 1: .* use 5 frames"):
        enc.check_clip(1)
    enc.check_clip(13)
    enc.check_clip(17)
    keep = VideoEncoder(tiny_videomae(), EncoderConfig(input_size=(32, 32), drop_first_frame=False))
    with pytest.raises(MoalignError, match=r"--set encoder.drop_first_frame=true"):
        keep.check_clip(17, flag="--set data.num_frames=")
    keep.check_clip(16)  # a plain count of frames is fine there (no 4k+1 clip is)
    thirds = VideoEncoder(
        tiny_videomae(tubelet=3, frames=6), EncoderConfig(input_size=(32, 32), drop_first_frame=False)
    )
    with pytest.raises(MoalignError, match=r"drop_first_frame is off\): use 9 or 21 frames"):
        thirds.check_clip(17)
    big = tiny_videomae(image_size=32, patch=16)
    big.save_pretrained(tmp_path / "p16")
    with pytest.raises(
        MoalignError,
        match=r"input_size=72x360 .* patch size 16: height 72: use 64 or 80; width 360: use 352 or 368",
    ):
        VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "p16"), input_size=(72, 360)))
    VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "p16"), input_size=(64, 368)))
