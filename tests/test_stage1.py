"""Stage 1 end to end at a tiny size: files, metrics, frozen encoder, gradients, exact resume, teacher loading."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tiny_parts import save_tiny_videomae

import moalign.stage1 as stage1_mod
from moalign.data.sampling import DataConfig
from moalign.encoder import EncoderConfig, VideoEncoder
from moalign.errors import MoalignError
from moalign.flow_decoder import FlowDecoder, FlowDecoderConfig
from moalign.motion_projector import MotionProjectorConfig
from moalign.playground.scenes import SynthConfig
from moalign.playground.synth import write_playground
from moalign.stage1 import Stage1Config
from moalign.teacher import load_motion_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_playground(
        root / "data", SynthConfig(num_clips=10, num_frames=9, height=32, width=32), progress=False
    )
    save_tiny_videomae(root / "encoder")
    cfg = Stage1Config(
        data=DataConfig(num_frames=9, height=32, width=32),
        encoder=EncoderConfig(path=str(root / "encoder"), input_size=(32, 32)),
        projector=MotionProjectorConfig(hidden_dim=16),
        decoder=FlowDecoderConfig(hidden_dim=8),
        val_clips=3,
        steps=6,
        batch_size=4,
        warmup_steps=1,
        log_every=1,
        val_every=3,
        checkpoint_every=3,
    )
    return root, cfg


def test_stage1_run_folder_and_metrics(world):
    root, cfg = world
    metrics = stage1_mod.train_stage1(root / "data", root / "run", cfg, progress=False)
    run = root / "run"
    for name in ("config.json", "log.jsonl", "metrics.json", "loss_curve.png", "motion_projector.safetensors",
                 "flow_decoder.safetensors", "checkpoint-3"):  # fmt: skip
        assert (run / name).exists(), name
    assert metrics["zero_flow_epe"] > 0 and metrics["val_epe"] > 0
    assert metrics["token_grid"] == [4, 4, 4] and metrics["flow_resolution"] == [8, 8]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run is not silently overwritten
    with pytest.raises(MoalignError, match="finished stage-1 run"):
        stage1_mod.train_stage1(root / "data", run, cfg, progress=False)

    teacher = load_motion_teacher(run)
    assert not any(p.requires_grad for p in teacher.projector.parameters())
    assert teacher.encoder.path == cfg.encoder.path and teacher.projector.cfg.in_dim == 32
    assert teacher.projector(torch.randn(1, 4, 4, 4, 32)).shape == (1, 4, 4, 4, 64)
    with pytest.raises(MoalignError, match="expected a 'motion_projector'"):
        load_motion_teacher(run / "flow_decoder.safetensors")
    with pytest.raises(MoalignError, match="not a finished stage-1 run"):
        load_motion_teacher(root / "encoder")


def test_gradients_reach_heads_never_encoder(world):
    root, cfg = world
    encoder = VideoEncoder.from_pretrained(cfg.encoder)
    frames = torch.randint(0, 255, (2, 9, 32, 32, 3), dtype=torch.uint8)
    pixels = encoder.preprocess(frames).requires_grad_(True)
    tokens = encoder(pixels)
    assert tokens.grad_fn is None  # the frozen encoder builds no graph
    proj_cfg = replace(cfg.projector, in_dim=encoder.width)
    heads = stage1_mod.Stage1Heads(
        stage1_mod.MotionProjector(proj_cfg), FlowDecoder(cfg.decoder, patch_size=8, pairs_per_tubelet=2)
    )
    _, pred = heads(tokens)
    assert pred.shape == (2, 8, 8, 8, 2)
    pred.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in encoder.parameters())
    assert pixels.grad is None


def test_resume_after_interruption_matches_uninterrupted_run(world, monkeypatch):
    root, cfg = world
    stage1_mod.train_stage1(root / "data", root / "full", cfg, progress=False)

    real_loss, calls = stage1_mod.flow_loss, {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after checkpoint-3 was written, before the run finishes
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(stage1_mod, "flow_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        stage1_mod.train_stage1(root / "data", root / "cut", cfg, progress=False)
    assert (root / "cut" / "checkpoint-3").is_dir() and not (root / "cut" / "metrics.json").exists()
    monkeypatch.setattr(stage1_mod, "flow_loss", real_loss)
    stage1_mod.train_stage1(root / "data", root / "cut", cfg, resume="latest", progress=False)
    for name in ("motion_projector.safetensors", "flow_decoder.safetensors"):
        a, b = load_file(root / "full" / name), load_file(root / "cut" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_teacher_targets_cache_equals_direct_computation_and_resumes(world, tmp_path):
    from moalign.cli import main
    from moalign.data.dataset import VideoClipDataset
    from moalign.teacher import load_targets

    root, cfg = world
    run = root / "run"
    if not (run / "metrics.json").exists():
        stage1_mod.train_stage1(root / "data", run, cfg, progress=False)
    out = tmp_path / "targets"
    assert main(["targets", "--data", str(root / "data"), "--teacher", str(run), "--out", str(out), "--raw",
                 "--shard-size", "4", "--quiet"]) == 0  # fmt: skip
    cache = load_targets(out)
    assert len(cache) == 10
    teacher = load_motion_teacher(run)
    encoder = VideoEncoder.from_pretrained(teacher.encoder)
    ds = VideoClipDataset(root / "data", teacher.data, load_flow=False)
    for i in (0, 7):
        tokens = encoder.encode(ds[i]["frames"][None])
        with torch.no_grad():
            motion = teacher.projector(tokens)[0]
        assert cache[i]["motion"].shape == (4, 4, 4, 64) and cache[i]["encoder"].shape == (4, 4, 4, 32)
        torch.testing.assert_close(cache[i]["motion"].float(), motion, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(cache[i]["encoder"].float(), tokens[0], rtol=1e-2, atol=2e-2)
    # a lost shard is recomputed alone; the result is identical
    before = load_file(out / "shard-00001.safetensors")
    (out / "shard-00001.safetensors").unlink()
    (out / "manifest.json").unlink()
    assert main(["targets", "--data", str(root / "data"), "--teacher", str(run), "--out", str(out), "--raw",
                 "--shard-size", "4", "--quiet"]) == 0  # fmt: skip
    after = load_file(out / "shard-00001.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # other settings on the same folder are refused
    assert main(["targets", "--data", str(root / "data"), "--teacher", str(run), "--out", str(out),
                 "--shard-size", "4", "--quiet"]) == 2  # fmt: skip
