"""Latents + prompt-embedding caches from tiny real pipelines, then stage 2 on them."""

import json

import pytest
import torch
from conftest import MICRO_DATA, tiny_pipeline, tiny_transformer

from moalign.alignment import AlignConfig
from moalign.backbones import get_backbone
from moalign.data.cache import Cache
from moalign.data.dataset import VideoClipDataset
from moalign.latents import compute_latents
from moalign.run.training import read_log
from moalign.stage2 import Stage2Config, train_stage2


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_latents_cache_shapes_determinism_and_stage2(family, playground, tmp_path):
    clips = playground(4)
    pipe = tiny_pipeline(family)
    out = compute_latents(clips, None, tmp_path / "lat", backbone=family, data=MICRO_DATA, pipeline=pipe,
                          shard_size=2, progress=False)  # fmt: skip
    cache = Cache(out, kind="latents")
    item = cache[0]
    expected = (3, 4, 4, 4) if family == "cogvideox" else (4, 3, 4, 4)  # 9 frames -> 3 latent frames, 32 -> 4
    assert tuple(item["latents"].shape) == expected
    assert item["prompt_embeds"].shape == (226 if family == "cogvideox" else 512, 32)
    # the VAE mean is deterministic: recomputing a clip gives the same latents
    frames = VideoClipDataset(clips, MICRO_DATA, load_flow=False)[0]["frames"][None]
    again = get_backbone(family).encode_video(pipe.vae, frames)[0]
    torch.testing.assert_close(again, item["latents"])
    # stage 2 trains on it (no alignment: no teacher needed), with validation videos through the pipeline
    pipe.save_pretrained(tmp_path / "pipe")
    cfg = Stage2Config(model="tiny-random", align=AlignConfig(mode="none"), steps=2, batch_size=2, log_every=1,
                       lora_rank=2, validation_prompts=("a red ball falls",), validate_every=2,
                       validation_pipeline=str(tmp_path / "pipe"), validation_frames=9, validation_size=(32, 32),
                       validation_steps=2, validation_judge=True, mixed_precision="bf16")  # fmt: skip
    m = train_stage2(out, tmp_path / "run", cfg, progress=False)
    assert m["diffusion"] > 0
    val = tmp_path / "run" / "validation" / "step-2"
    assert (val / "video_00000.mp4").is_file() and (val / "metadata.jsonl").is_file()
    # their motion (px/frame) against the base model's videos before the first step, logged for TensorBoard
    base = json.loads((tmp_path / "run" / "validation" / "step-0" / "motion.json").read_text())
    after = json.loads((val / "motion.json").read_text())
    assert len(after["motion"]) == 1 and after["mean"] >= 0 and base["mean"] >= 0
    logged = [r for r in read_log(tmp_path / "run") if "val_motion" in r]
    assert [r["step"] for r in logged] == [1] and logged[0]["val_motion"] == pytest.approx(after["mean"])
    # playground prompts: the toy judge scored the folder, and its means are logged beside the motion
    judged = json.loads((val / "judge.json").read_text())["aggregate"]
    assert logged[0]["val_joint"] == judged["joint"] and logged[0]["val_pc"] == pytest.approx(judged["pc"])


def test_a_fine_tune_that_kills_the_motion_is_warned_about(capsys):
    from moalign.evaluation.validation import check_motion

    check_motion(10, 1.9, 2.0)
    assert capsys.readouterr().out == ""
    check_motion(20, 0.4, 2.0)
    assert "under half of the base model's 2.00" in capsys.readouterr().out


def test_cogvideox_text_length_follows_the_transformer(tmp_path):
    spec = get_backbone("cogvideox")
    assert spec.text_length(None) == 226 and spec.text_length({"max_text_seq_length": 32}) == 32
    assert spec.text_length(tiny_transformer("cogvideox", max_text_seq_length=24).config) == 24
    assert get_backbone("wan").text_length({"max_text_seq_length": 32}) == 512


def test_latents_takes_the_family_from_the_pipeline_folder(playground, tmp_path, capsys, monkeypatch):
    from moalign.cli import main

    clips = playground(2)
    tiny_pipeline("wan").save_pretrained(tmp_path / "wan")
    geometry = ["--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]
    assert main(["latents", "--data", str(clips), "--model", str(tmp_path / "wan"), "--out", str(tmp_path / "lat"),
                 *geometry]) == 0  # fmt: skip
    cache = Cache(tmp_path / "lat", kind="latents")
    assert tuple(cache[0]["latents"].shape) == (
        4,
        3,
        4,
        4,
    )  # Wan's (C, F, H, W), not CogVideoX's (F, C, H, W)
    assert cache.fingerprint["backbone"] == "wan"
    # a --backbone that contradicts the folder names both
    assert main(["latents", "--data", str(clips), "--model", str(tmp_path / "wan"), "--out", str(tmp_path / "l2"),
                 "--backbone", "cogvideox", *geometry]) == 2  # fmt: skip
    assert "--backbone cogvideox, but" in capsys.readouterr().err and not (tmp_path / "l2").exists()
    # stage 2 from a relative --model: the run records the absolute folder, so generate works from anywhere
    monkeypatch.chdir(tmp_path)
    cfg = Stage2Config(backbone="wan", model="wan", align=AlignConfig(mode="none"), steps=1, batch_size=2)
    train_stage2("lat", "run", cfg, progress=False)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert recorded["model"] == str(tmp_path / "wan") and recorded["model"] != cfg.model
    assert (recorded["validation_frames"], recorded["validation_size"]) == (9, [32, 32])  # the cache's clips


def test_stage2_takes_backbone_model_and_geometry_from_the_latents_cache(
    playground, tmp_path, capsys, monkeypatch
):
    """Stage 2 without --backbone or --model trains the pipeline the latents cache was made with (its family,
    its transformer: not a random one), validates at the cache's geometry, and says so; a contradicting
    --backbone, a cache made in memory, and model-loading failures are one-line errors."""
    from moalign.cli import main

    clips = playground(2)
    tiny_pipeline("wan").save_pretrained(tmp_path / "wan")
    geometry = ["--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]
    assert main(["latents", "--data", str(clips), "--model", str(tmp_path / "wan"), "--out", str(tmp_path / "lat"),
                 *geometry]) == 0  # fmt: skip
    capsys.readouterr()
    run = tmp_path / "run"
    argv = ["stage2", "--latents", str(tmp_path / "lat"), "--out", str(run), "--align", "none", "--steps", "1",
            "--set", "batch_size=2", "--set", "lora_rank=2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert cfg["backbone"] == "wan" and cfg["model"] == str(tmp_path / "wan")
    assert (cfg["validation_frames"], cfg["validation_size"]) == (9, [32, 32])
    said = capsys.readouterr().out
    assert f"model {tmp_path / 'wan'} (from the latents cache); family wan (from the latents cache)" in said
    assert "clips of 9 frames at 32x32" in said
    # the LoRA sits on the pipeline's own transformer: it loads into that pipeline
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tmp_path / "wan")
    pipe.load_lora_weights(run)
    assert pipe.get_active_adapters()
    # a backbone that contradicts the cache names both
    assert main([*argv[:4], str(tmp_path / "r2"), "--backbone", "cogvideox", *argv[5:]]) == 2
    err = capsys.readouterr().err
    assert "holds wan latents but the configuration asks for backbone cogvideox" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r2").exists()
    # a pipeline of the other family: named as such, with where the family came from
    tiny_pipeline("cogvideox").save_pretrained(tmp_path / "cog")
    assert main([*argv[:4], str(tmp_path / "r4"), "--model", str(tmp_path / "cog"), *argv[5:]]) == 2
    err = capsys.readouterr().err
    assert (
        "is a cogvideox pipeline but the latents cache says wan" in err and len(err.strip().splitlines()) == 1
    )
    # a model that does not load: one line naming it and the fix, no traceback (offline: the Hub is not tried,
    # which on a machine without the Hub costs 23 s of retries)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, what in ((str(tmp_path / "nothing"), "neither a diffusers pipeline"),
                        ("nobody/no-such-model", "cannot load the WanTransformer3DModel from nobody/no-such-model")):  # fmt: skip
        assert main([*argv, "--out", str(tmp_path / "r3"), "--model", model]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1, err
    assert "there is no folder nobody/no-such-model here" in err and "Fix:" in err


def test_stage2_refuses_to_train_a_random_model_unless_named(tmp_path):
    """A cache made by a pipeline built in memory names no transformer: stage 2 stops instead of silently
    training a random one; --model tiny-random asks for it by name."""
    from dataclasses import replace

    from conftest import write_stage2_caches

    from moalign.errors import MoalignError

    write_stage2_caches(tmp_path / "c", 4)  # its fingerprint names no model
    cfg = Stage2Config(backbone="cogvideox", align=AlignConfig(mode="none"), steps=1, batch_size=2)
    with pytest.raises(
        MoalignError, match="no transformer to load: pass --model PIPELINE.*--model tiny-random"
    ):
        train_stage2(tmp_path / "c" / "latents", tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run").exists()
    m = train_stage2(
        tmp_path / "c" / "latents", tmp_path / "run", replace(cfg, model="tiny-random"), progress=False
    )
    assert m["steps"] == 1


def test_latents_tell_fill_cache_which_dtype_to_use_when_a_tensor_is_not_finite(
    playground, tmp_path, monkeypatch
):
    """fill_cache's finite check ends its message with latents' fix for the dtype encoded in: float16 -> float32 or
    bfloat16, bfloat16 -> float32, float32 -> the model (no other dtype to try)."""
    import moalign.latents as latents_module
    from moalign.data.cache_writer import fill_cache
    from moalign.latents import nonfinite_hint

    hints = []

    def recording(*args, nonfinite_hint: str = "", **kwargs):
        hints.append(nonfinite_hint)
        return fill_cache(*args, nonfinite_hint=nonfinite_hint, **kwargs)

    monkeypatch.setattr(latents_module, "fill_cache", recording)
    compute_latents(playground(2), None, tmp_path / "lat", backbone="wan", data=MICRO_DATA,
                    pipeline=tiny_pipeline("wan"), dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert hints == [nonfinite_hint(torch.bfloat16)] and "--dtype float32;" in hints[0]
    assert "--dtype float32 (or bfloat16" in nonfinite_hint(torch.float16)
    assert "--dtype" not in nonfinite_hint(torch.float32) and "weights" in nonfinite_hint(torch.float32)


def test_a_latents_cache_pins_the_vae_and_text_encoder_by_content(playground, tmp_path, capsys):
    """Resumed after the VAE's weights changed at the same path, a latents cache would mix two VAEs: refused,
    naming weights_sha256; the same command with the same weights has nothing left to do."""
    import torch
    from safetensors.torch import load_file, save_file

    from moalign.cli import main

    clips = playground(2)
    tiny_pipeline("wan").save_pretrained(tmp_path / "wan")
    argv = ["latents", "--data", str(clips), "--model", str(tmp_path / "wan"), "--out", str(tmp_path / "lat"),
            "--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert Cache(tmp_path / "lat").fingerprint["weights_sha256"]
    assert main(argv) == 0  # the same weights: the finished cache stands
    vae = tmp_path / "wan" / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(vae))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "built with different settings" in err and "weights_sha256" in err, err
    assert torch.is_tensor(Cache(tmp_path / "lat")[0]["latents"])  # the cache itself is untouched
