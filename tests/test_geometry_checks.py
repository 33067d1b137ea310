"""Geometry is checked before work starts and non-finite tensors stop a command (issue 13): every command that
takes a clip geometry names the flag and the nearest valid values, exit 2; generation and latents name the
prompt / clip whose tensors overflowed and the --dtype to use, and leave nothing that counts as finished."""

import json

import pytest
import torch
from conftest import MICRO_DATA, tiny_pipeline, tiny_transformer

from moalign.backbones import get_backbone
from moalign.backbones.spec import GeometryRule
from moalign.cli import main
from moalign.data.cache import Cache
from moalign.errors import MoalignError
from moalign.generate import folder_geometry_configs, generate


def _generate_argv(model, tmp_path, out="out", frames=5, height=16, width=16):
    (tmp_path / "p.txt").write_text("a red ball falls\na blue ball\n")
    return [
        "generate", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / out),
        "--steps", "1", "--quiet", "--num-frames", str(frames), "--height", str(height), "--width", str(width),
    ]  # fmt: skip


def test_geometry_rules_come_from_the_model_configs():
    cog, wan = get_backbone("cogvideox"), get_backbone("wan")
    assert cog.geometry_rule() == GeometryRule("cogvideox", 4, 1, (16, 16), cog.geometry_rule().why)
    assert wan.geometry_rule().size_multiple == (16, 16) and wan.geometry_rule().frame_step == 4
    # the loaded parts' configs: CogVideoX's VAE downsampling is 2 ** (blocks - 1), Wan's is recorded
    pipe = tiny_pipeline("cogvideox")
    rule = cog.geometry_rule(pipe.transformer.config, pipe.vae.config)
    assert (rule.frame_step, rule.latent_frame_multiple, rule.size_multiple) == (4, 1, (16, 16))
    three_blocks = {"block_out_channels": [8, 8, 8], "temporal_compression_ratio": 4}
    assert cog.geometry_rule({"patch_size": 2}, three_blocks).size_multiple == (8, 8)
    assert wan.geometry_rule({"patch_size": [1, 4, 2]}, {"scale_factor_spatial": 8}).size_multiple == (32, 16)
    # CogVideoX 1.5 (patch_size_t 2): the pipeline pads latent frames when sampling, training clips must fill them
    v15 = {"patch_size": 2, "patch_size_t": 2}
    assert cog.geometry_rule(v15).latent_frame_multiple == 1
    train = cog.geometry_rule(v15, training=True)
    assert train.frames_form() == "8k+5" and [n for n in range(1, 90) if train.frames_ok(n)][:3] == [
        5,
        13,
        21,
    ]
    with pytest.raises(MoalignError, match=r"--num-frames 81 is not 8k\+5 for cogvideox: use 77 or 85"):
        cog.check_geometry(81, 768, 1360, what="latents", transformer_config=v15, training=True)
    cog.check_geometry(81, 768, 1360, what="generate", transformer_config=v15)  # what CogVideoX 1.5 samples
    # every wrong value in one message; none below: only the one above; other flags
    with pytest.raises(MoalignError) as err:
        wan.check_geometry(16, 72, 8, what="x", flags=("--set validation_frames=", "--height", "--width"))
    text = str(err.value)
    assert "--set validation_frames=16 is not 4k+1 for wan: use 13 or 17" in text
    assert "--height 72 is not a multiple of 16 for wan: use 64 or 80" in text
    assert "--width 8 is not a multiple of 16 for wan: use 16 (" in text


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_generate_refuses_a_wrong_geometry_before_loading_and_takes_the_suggestions(
    family, tmp_path, capsys, monkeypatch
):
    """16 frames (Wan would round it with a warning, CogVideoX dies at decode) and heights divisible by 8 but
    not 16 (a shape traceback in the transformer) stop with exit 2 before the pipeline loads; the values the
    message suggests run."""
    tiny_pipeline(family).save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    cls = get_backbone(family).pipeline_class
    loads = []
    real = cls.from_pretrained.__func__
    monkeypatch.setattr(
        cls, "from_pretrained", classmethod(lambda c, *a, **k: loads.append(a) or real(c, *a, **k))
    )
    for bad, suggested in (
        (dict(frames=16), "--num-frames 16 is not 4k+1 for " + family + ": use 13 or 17"),
        (dict(height=72), "--height 72 is not a multiple of 16 for " + family + ": use 64 or 80"),
        (dict(height=360), "--height 360 is not a multiple of 16 for " + family + ": use 352 or 368"),
    ):
        assert main(_generate_argv(tmp_path / "pipe", tmp_path, **bad)) == 2
        err = capsys.readouterr().err
        assert suggested in err and len(err.strip().splitlines()) == 1, err
    assert loads == [] and not (tmp_path / "out").exists()
    for i, good in enumerate((dict(frames=13), dict(frames=17), dict(height=64), dict(height=80),
                              dict(height=352), dict(height=368))):  # fmt: skip
        assert main(_generate_argv(tmp_path / "pipe", tmp_path, out=f"ok{i}", **good)) == 0
        row = json.loads((tmp_path / f"ok{i}" / "metadata.jsonl").read_text().splitlines()[0])
        assert row["num_frames"] == good.get("frames", 5) and row["height"] == good.get("height", 16)


def test_generate_checks_a_run_folder_before_loading_and_an_in_memory_pipeline(tmp_path):
    tiny_pipeline("wan").save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"config": {"backbone": "wan", "align": {}, "model": str(tmp_path / "base")}})
    )
    family, transformer, vae = folder_geometry_configs(run)
    assert family == "wan" and transformer["patch_size"] == [1, 2, 2] and vae["scale_factor_spatial"] == 8
    assert folder_geometry_configs("nobody/some-model") == (
        None,
        None,
        None,
    )  # a hub id: checked after loading
    assert folder_geometry_configs("nobody/some-model", backbone="wan")[0] == "wan"
    # the run has no LoRA: loading would fail, so the geometry error shows the check came first
    with pytest.raises(MoalignError, match="--width 40 is not a multiple of 16 for wan: use 32 or 48"):
        generate(run, ["a ball"], tmp_path / "o", num_frames=5, height=16, width=40, steps=1, progress=False)
    with pytest.raises(MoalignError, match="--num-frames 6 is not 4k\\+1 for cogvideox: use 5 or 9"):
        generate(None, ["a ball"], tmp_path / "o", pipeline=tiny_pipeline("cogvideox"), num_frames=6, height=16,
                 width=16, steps=1, progress=False)  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_generate_stops_at_non_finite_latents_or_frames(family, tmp_path, capsys):
    """A transformer whose float16 activations overflow: exit 2 naming the prompt and the dtypes to use,
    nothing of that video written; NaN weights in float32 (decoder): the frames are checked, the model named."""
    pipe = tiny_pipeline(family)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(2e5)  # fits float16, its outputs do not
    pipe.save_pretrained(tmp_path / "loud")
    capsys.readouterr()
    argv = _generate_argv(tmp_path / "loud", tmp_path)
    assert main([*argv, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "the video of prompt 0 ('a red ball falls') is not finite (after sampling step 1" in err
    assert "--dtype bfloat16" in err and "float32" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.mp4")) and not (tmp_path / "out" / "metadata.jsonl").exists()
    assert main([*argv[:6], str(tmp_path / "out32"), *argv[7:], "--dtype", "float32"]) == 0  # float32's range
    pipe = tiny_pipeline(family)
    with torch.no_grad():
        next(pipe.vae.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(
        MoalignError, match=r"the video of prompt 0 \('a ball'\) is not finite \(100% of its pixel"
    ) as e:
        generate(None, ["a ball"], tmp_path / "nan", pipeline=pipe, num_frames=5, height=16, width=16, steps=1,
                 progress=False)  # fmt: skip
    assert "check the model" in str(e.value) and not (tmp_path / "nan" / "video_00000.mp4").exists()


def test_latents_stop_at_a_clip_that_overflows_in_float16(playground, tmp_path, capsys):
    """`moalign latents --dtype float16` with a VAE whose activations overflow: exit 2 naming the clip, the
    tensor and --dtype float32/bfloat16; the cache is not finished (no manifest, Cache refuses it); float32
    with --overwrite then builds it."""
    clips = playground(2)
    pipe = tiny_pipeline("cogvideox")
    with torch.no_grad():
        pipe.vae.encoder.conv_in.conv.weight.mul_(5e5)  # fits float16, its activations do not
    pipe.save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    argv = ["latents", "--data", str(clips), "--model", str(tmp_path / "pipe"), "--out", str(tmp_path / "lat"),
            "--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    assert main([*argv, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert f"clip 0 ({clips / 'videos' / 'clip_00000.mp4'}) gave a non-finite 'latents' tensor" in err, err
    assert "Encode with --dtype float32 (or bfloat16" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lat" / "manifest.json").exists()
    with pytest.raises(MoalignError):
        Cache(tmp_path / "lat", kind="latents")
    assert main([*argv, "--dtype", "float32", "--overwrite"]) == 0
    assert torch.isfinite(Cache(tmp_path / "lat", kind="latents")[1]["latents"]).all()


def test_latents_check_the_training_geometry_of_the_folders_transformer(
    playground, tmp_path, capsys, monkeypatch
):
    """A CogVideoX 1.5-style transformer (patch_size_t 2) cannot train on 9-frame clips (3 latent frames): the
    latents command says so before loading anything and names 5 or 13; 5 frames are encoded."""
    clips = playground(2)
    pipe = tiny_pipeline("cogvideox")
    pipe.register_modules(transformer=tiny_transformer("cogvideox", patch_size_t=2))
    pipe.save_pretrained(tmp_path / "v15")
    capsys.readouterr()
    cls = get_backbone("cogvideox").pipeline_class
    monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: pytest.fail("loaded")))
    argv = ["latents", "--data", str(clips), "--model", str(tmp_path / "v15"), "--height", "32", "--width", "32",
            "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a"), "--num-frames", "9"]) == 2
    err = capsys.readouterr().err
    assert "--num-frames 9 is not 8k+5 for cogvideox: use 5 or 13" in err and "patch_size_t" in err, err
    assert not (tmp_path / "a" / "manifest.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "b"), "--num-frames", "5"]) == 0
    assert Cache(tmp_path / "b", kind="latents")[0]["latents"].shape[0] == 2  # 2 latent frames: one patch


def test_latents_geometry_check_in_the_library(playground, tmp_path):
    from dataclasses import replace

    from moalign.latents import compute_latents

    pipe = tiny_pipeline("wan")
    pipe.vae.register_to_config(scale_factor_spatial=16)  # a VAE with another downsampling: 32 px per token
    with pytest.raises(
        MoalignError, match="latents of .*: --height 48 is not a multiple of 32 for wan: use 32 or 64"
    ):
        compute_latents(playground(2), None, tmp_path / "lat", backbone="wan", pipeline=pipe, progress=False,
                        data=replace(MICRO_DATA, height=48))  # fmt: skip
