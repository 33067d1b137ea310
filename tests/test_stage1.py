"""Stage 1 end to end at a tiny size: files, metrics, frozen encoder, gradients, exact resume, teacher loading.
The run under test is tests/conftest.py's `stage1_run` (6 steps on 10 playground clips), shared with
tests/test_precompute.py as its teacher."""

from dataclasses import replace

import pytest
import torch
from conftest import interrupted_at_call
from safetensors.torch import load_file

import moalign.stage1 as stage1_mod
from moalign.encoder import VideoEncoder
from moalign.errors import MoalignError
from moalign.flow_decoder import FlowDecoder
from moalign.teacher import load_motion_teacher


def test_stage1_run_folder_and_metrics(stage1_run, videomae_folder):
    run, cfg, metrics = stage1_run.folder, stage1_run.cfg, stage1_run.metrics
    for name in ("config.json", "log.jsonl", "metrics.json", "loss_curve.png", "motion_projector.safetensors",
                 "flow_decoder.safetensors", "checkpoint-3"):  # fmt: skip
        assert (run / name).exists(), name
    assert metrics["zero_flow_epe"] > 0 and metrics["val_epe"] > 0
    assert metrics["token_grid"] == [4, 4, 4] and metrics["flow_resolution"] == [8, 8]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run is not silently overwritten
    with pytest.raises(MoalignError, match="finished stage-1 run"):
        stage1_mod.train_stage1(stage1_run.data, run, cfg, progress=False)

    teacher = load_motion_teacher(run)
    assert not any(p.requires_grad for p in teacher.projector.parameters())
    assert teacher.encoder.path == cfg.encoder.path and teacher.projector.cfg.in_dim == 32
    assert teacher.projector(torch.randn(1, 4, 4, 4, 32)).shape == (1, 4, 4, 4, 64)
    with pytest.raises(MoalignError, match="expected a 'motion_projector'"):
        load_motion_teacher(run / "flow_decoder.safetensors")
    with pytest.raises(MoalignError, match="not a finished stage-1 run"):
        load_motion_teacher(videomae_folder)


def test_gradients_reach_heads_never_encoder(stage1_run):
    cfg = stage1_run.cfg
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


def test_resume_after_interruption_matches_uninterrupted_run(stage1_run, tmp_path):
    data, cfg, cut = stage1_run.data, stage1_run.cfg, tmp_path / "cut"
    # killed in step 5: after checkpoint-3 was written, before the run finishes
    with interrupted_at_call("moalign.stage1.flow_loss", 5), pytest.raises(KeyboardInterrupt):
        stage1_mod.train_stage1(data, cut, cfg, progress=False)
    assert (cut / "checkpoint-3").is_dir() and not (cut / "metrics.json").exists()
    stage1_mod.train_stage1(data, cut, cfg, resume="latest", progress=False)
    for name in ("motion_projector.safetensors", "flow_decoder.safetensors"):  # stage1_run: the same, uncut
        a, b = load_file(stage1_run.folder / name), load_file(cut / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_teacher_targets_cache_equals_direct_computation_and_resumes(stage1_run, tmp_path):
    from moalign.cli import main
    from moalign.data.dataset import VideoClipDataset
    from moalign.teacher import load_targets

    data, run = stage1_run.data, stage1_run.folder
    out = tmp_path / "targets"
    assert main(["targets", "--data", str(data), "--teacher", str(run), "--out", str(out), "--raw",
                 "--shard-size", "4", "--quiet"]) == 0  # fmt: skip
    cache = load_targets(out)
    assert len(cache) == 10
    teacher = load_motion_teacher(run)
    encoder = VideoEncoder.from_pretrained(teacher.encoder)
    ds = VideoClipDataset(data, teacher.data, load_flow=False)
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
    assert main(["targets", "--data", str(data), "--teacher", str(run), "--out", str(out), "--raw",
                 "--shard-size", "4", "--quiet"]) == 0  # fmt: skip
    after = load_file(out / "shard-00001.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # other settings on the same folder are refused
    assert main(["targets", "--data", str(data), "--teacher", str(run), "--out", str(out),
                 "--shard-size", "4", "--quiet"]) == 2  # fmt: skip


def test_held_out_clips_without_motion_give_a_null_ratio_with_a_note(playground, videomae_folder, tmp_path):
    """Zero-flow EPE 0 on still held-out clips: val_epe_ratio is null with a note, not val_epe / 1e-12."""
    import json
    import shutil

    from conftest import MICRO_DATA

    from moalign.encoder import EncoderConfig
    from moalign.flow_decoder import FlowDecoderConfig
    from moalign.motion_projector import MotionProjectorConfig

    data = tmp_path / "still"
    shutil.copytree(playground(40), data)
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    still = [r for r in rows if r["motion"] == "static"]
    assert len(still) >= 5
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in still))
    cfg = stage1_mod.Stage1Config(
        data=MICRO_DATA, encoder=EncoderConfig(path=str(videomae_folder), input_size=(32, 32)),
        projector=MotionProjectorConfig(hidden_dim=16), decoder=FlowDecoderConfig(hidden_dim=8), val_clips=2,
        steps=2, batch_size=2, warmup_steps=0, log_every=1, val_every=2, checkpoint_every=2, probe_clips=0,
        report_to="none",
    )  # fmt: skip
    metrics = stage1_mod.train_stage1(data, tmp_path / "run", cfg, progress=False)
    assert metrics["zero_flow_epe"] == 0.0 and metrics["val_epe"] >= 0.0
    assert metrics["val_epe_ratio"] is None and "do not move" in metrics["val_epe_ratio_note"]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["val_epe_ratio"] is None and written["val_epe_ratio_note"] == metrics["val_epe_ratio_note"]
    assert stage1_mod.epe_ratio_text(written) == "undefined: the held-out clips do not move"


def test_json_files_hold_no_nan():
    """JSON has no NaN or Infinity: undefined values are written as null (other readers refuse NaN)."""
    import json
    import math

    from moalign.evaluation.probes import r2_score
    from moalign.run.atomic import json_safe

    assert json_safe({"a": [1.0, math.nan, {"b": math.inf}], "c": 2}) == {
        "a": [1.0, None, {"b": None}],
        "c": 2,
    }
    assert json.loads(json.dumps(json_safe({"x": -math.inf}), allow_nan=False)) == {"x": None}
    still = [[0.0, 0.0]] * 4  # a target without variance: R^2 undefined
    assert math.isnan(r2_score(still, [[0.1, 0.0]] * 4))
    assert r2_score([[0.0], [1.0]], [[0.0], [1.0]]) == 1.0


def test_sigterm_stops_stage1_at_the_step_boundary_with_a_checkpoint(stage1_run, tmp_path):
    """SIGTERM arriving in step 2 (stage1_run checkpoints every 3): step 2 finishes, checkpoint-2 is written,
    Interrupted says so (the CLI exits 143), and the resumed run ends with the uninterrupted weights."""
    import os
    import signal

    from run_cli import die_at_call

    from moalign.errors import Interrupted

    data, cfg, cut = stage1_run.data, stage1_run.cfg, tmp_path / "cut"
    before = signal.getsignal(signal.SIGTERM)
    restore = die_at_call("moalign.stage1.flow_loss", 2, lambda args: os.kill(os.getpid(), signal.SIGTERM))
    try:
        with pytest.raises(Interrupted, match="stopped by SIGTERM after step 2 of 6") as info:
            stage1_mod.train_stage1(data, cut, cfg, progress=False)
    finally:
        restore()
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is gone with the run
    assert (cut / "checkpoint-2").is_dir() and not (cut / "metrics.json").exists()
    stage1_mod.train_stage1(data, cut, cfg, resume="latest", progress=False)
    for name in ("motion_projector.safetensors", "flow_decoder.safetensors"):
        a, b = load_file(stage1_run.folder / name), load_file(cut / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
