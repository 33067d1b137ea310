"""Generation through tiny real pipelines: files, determinism per seed, LoRA runs change the output."""

import inspect
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from moalign.data.video_io import read_video
from moalign.errors import MoalignError
from moalign.generate import GenerateConfig, contact_sheet, generate, load_pipeline, read_prompts
from moalign.run.lora import add_lora, save_lora


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_generate_writes_videos_manifest_and_sheet(family, tmp_path, capsys):
    pipe = tiny_pipeline(family)
    pipe.save_pretrained(tmp_path / "base")
    prompts = ["a red ball falls", "a blue ball rolls to the left"]
    kw = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=1.0, seed=3, progress=False)
    rows = generate(tmp_path / "base", prompts, tmp_path / "out", **kw)
    assert [r["caption"] for r in rows] == prompts and [r["seed"] for r in rows] == [3, 4]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert manifest == rows
    frames, _ = read_video(tmp_path / "out" / rows[0]["video"])
    assert frames.shape == (9, 32, 32, 3)
    assert (tmp_path / "out" / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"
    generate(tmp_path / "base", prompts, tmp_path / "again", **kw)
    assert (tmp_path / "out" / "video_00000.mp4").read_bytes() == (
        tmp_path / "again" / "video_00000.mp4"
    ).read_bytes()

    # a stage-2 LoRA run folder: the run's config names the base; the LoRA changes the videos
    run = tmp_path / "run"
    trained = pipe.transformer
    add_lora(trained, rank=2, alpha=2)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    save_lora(type(pipe), trained, run)
    (run / "config.json").write_text(
        json.dumps({"config": {"backbone": family, "align": {}, "model": str(tmp_path / "base")}})
    )
    generate(run, prompts[:1], tmp_path / "lora", **kw)
    a, _ = read_video(tmp_path / "out" / "video_00000.mp4")
    b, _ = read_video(tmp_path / "lora" / "video_00000.mp4")
    assert np.abs(a.astype(int) - b).mean() > 0.5

    # the command, without geometry flags, makes the run's clips (its config's validation geometry) and says so
    from moalign.cli import main

    config = json.loads((run / "config.json").read_text())
    config["config"].update(validation_frames=9, validation_size=[16, 32])
    (run / "config.json").write_text(json.dumps(config))
    (tmp_path / "p.txt").write_text("a red ball, bouncing\n")
    argv = ["generate", "--model", str(run), "--prompts", str(tmp_path / "p.txt"), "--steps", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    row = json.loads((tmp_path / "cli" / "metadata.jsonl").read_text())
    assert (row["num_frames"], row["height"], row["width"], row["model"]) == (9, 16, 32, str(run))
    assert read_video(tmp_path / "cli" / "video_00000.mp4")[0].shape == (9, 16, 32, 3)
    assert main([*argv, "--out", str(tmp_path / "cli2"), "--height", "32"]) == 0  # a flag wins, and is said
    assert json.loads((tmp_path / "cli2" / "metadata.jsonl").read_text())["height"] == 32
    assert "32x32 (the run's clips, --height as given)" in capsys.readouterr().out


def test_contact_sheet_and_errors(tmp_path):
    sheet = contact_sheet([np.zeros((9, 8, 8, 3), np.uint8), np.ones((5, 8, 8, 3), np.uint8)], columns=4)
    assert sheet.shape == (16, 32, 3)
    with pytest.raises(MoalignError, match="prompts file not found"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"config": {"backbone": "wan", "align": {}, "model": None}})
    )
    with pytest.raises(MoalignError, match="--base"):
        load_pipeline(tmp_path / "run")


def test_generate_config_fields_are_generate_keywords():
    """`moalign generate` passes a GenerateConfig to generate() as keywords (src/moalign/cli.py)."""
    keywords = inspect.signature(generate).parameters
    assert all(keywords[f.name].kind is inspect.Parameter.KEYWORD_ONLY for f in fields(GenerateConfig))
    bad_values = (dict(num_frames=0), dict(steps=0), dict(height=-16), dict(fps=0.0), dict(fps=float("inf")),
                  dict(fps=float("nan")), dict(guidance_scale=float("nan")), dict(guidance_scale=float("inf")))  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ValueError, match="must be"):
            GenerateConfig(**bad)


def test_family_of_a_pipeline_class_comes_from_the_backbone_registry():
    from moalign.backbones import BACKBONES
    from moalign.generate import family

    assert family("WanPipeline") == "wan" and family("CogVideoXPipeline") == "cogvideox"
    assert {family(make().pipeline_class.__name__) for make in BACKBONES.values()} == set(BACKBONES)
    assert family("SomethingElsePipeline") == "cogvideox"  # the default, as before


def test_dtype_auto_and_cpu_offload(tmp_path, monkeypatch):
    """--dtype auto is bfloat16 on CUDA and float32 on CPU; --cpu-offload goes through diffusers'
    enable_model_cpu_offload (stand-in here: no GPU) instead of moving the whole pipeline, and needs CUDA."""
    from moalign.generate import auto_dtype

    assert auto_dtype("auto", "cuda") == auto_dtype("auto", "cuda:1") == "bfloat16"
    assert auto_dtype("auto", "cpu") == "float32" and auto_dtype("float16", "cuda") == "float16"
    pipe = tiny_pipeline("cogvideox")
    kw = dict(num_frames=5, height=16, width=16, steps=1, progress=False)
    with pytest.raises(MoalignError, match="--cpu-offload .* needs a CUDA device"):
        generate(None, ["a ball"], tmp_path / "x", pipeline=pipe, cpu_offload=True, **kw)
    calls = []
    monkeypatch.setattr(type(pipe), "enable_model_cpu_offload", lambda self, device: calls.append(device))
    monkeypatch.setattr(type(pipe), "to", lambda self, *a, **k: calls.append(("to", a)) or self)
    generate(None, ["a ball"], tmp_path / "y", pipeline=pipe, cpu_offload=True, device="cuda", **kw)
    assert calls == ["cuda"] and (tmp_path / "y" / "video_00000.mp4").is_file()
