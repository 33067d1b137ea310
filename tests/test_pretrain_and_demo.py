"""Encoder pretraining (masked autoencoding) and the demo's resume logic, at micro size."""

import json

import pytest
import torch
from conftest import MICRO_DATA, MICRO_MODEL, micro_recipe
from transformers import VideoMAEModel

import moalign.playground.demo as demo_mod
from moalign.alignment import MODE_TITLES
from moalign.encoder import EncoderConfig, VideoEncoder
from moalign.errors import MoalignError
from moalign.playground.pretrain_encoder import (
    PretrainEncoderConfig,
    pretrain_encoder,
    tube_mask,
)


def test_tube_mask_hides_the_same_patches_in_every_tubelet():
    mask = tube_mask(3, (4, 5, 6), 0.75, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 4 * 5 * 6) and mask.dtype == torch.bool
    per_frame = mask.reshape(3, 4, 30)
    assert (per_frame == per_frame[:, :1]).all()  # a tube: same spatial mask at every time
    assert (per_frame[:, 0].sum(-1) == round(0.75 * 30)).all()  # same count per sample (HF needs it)
    assert not torch.equal(per_frame[0, 0], per_frame[1, 0])


def test_pretrain_encoder_learns_and_saves_a_videomae_folder(playground, tmp_path):
    clips = playground(6)
    cfg = PretrainEncoderConfig(
        data=MICRO_DATA, model=MICRO_MODEL, input_size=(32, 32), steps=40, batch_size=4, lr=3e-3, warmup_steps=2,
        log_every=1,
    )  # fmt: skip
    metrics = pretrain_encoder(clips, tmp_path / "enc", cfg, progress=False)
    assert metrics["final_mse"] < 0.5 * metrics["first_mse"]  # it learns to reconstruct masked tubes
    assert metrics["token_grid"] == [4, 4, 4]
    model = VideoMAEModel.from_pretrained(tmp_path / "enc")
    assert model.config.hidden_size == 32 and model.config.num_frames == 8
    enc = VideoEncoder.from_pretrained(EncoderConfig(path=str(tmp_path / "enc"), input_size=(32, 32)))
    assert enc.grid(9) == (4, 4, 4)
    for name in ("run_config.json", "metrics.json", "log.jsonl", "loss_curve.png", "config.json"):
        assert (tmp_path / "enc" / name).is_file()
    with pytest.raises(MoalignError, match="already holds an encoder"):
        pretrain_encoder(clips, tmp_path / "enc", cfg, progress=False)


def test_demo_runs_end_to_end_and_resumes_finished_steps(tmp_path, monkeypatch):
    monkeypatch.setattr("moalign.presets.get_preset", lambda name: micro_recipe())
    summary = demo_mod.run_demo(tmp_path / "demo", progress=False)
    out = tmp_path / "demo"
    assert summary["stage1"]["steps"] == 4 and summary["stage1"]["zero_flow_epe"] > 0
    report = (out / "report.md").read_text()
    assert "val EPE" in report and f"{summary['stage1']['val_epe']:.4f}" in report
    # every arm was judged on every held-out prompt, and the table reports each with an interval
    assert set(summary["judge"]) >= {"base model (before fine-tuning)", "playground clips (reference)"}
    for arm in ("none", "trd", "moalign"):
        judged = json.loads((out / "arms" / arm / "videos" / "judge.json").read_text())
        assert len(judged["videos"]) == 2
        assert f"| {arm}: {MODE_TITLES[arm]} |" in report
        cfg = json.loads((out / "arms" / arm / "config.json").read_text())["config"]
        assert cfg["align"]["mode"] == arm and cfg["model"] == str(out / "base" / "pipeline")
        assert f"base_model: {out / 'base' / 'pipeline'}" in (out / "arms" / arm / "README.md").read_text()
    assert summary["arms"]["none"]["align_mode"] == "none" and summary["arms"]["moalign"]["align"] > 0
    # the arms differ only in alignment: the same data order and noise make step 0's diffusion loss equal
    first = {
        a: json.loads((out / "arms" / a / "log.jsonl").read_text().splitlines()[0]) for a in ("none", "trd")
    }
    assert first["none"]["diffusion"] == first["trd"]["diffusion"]
    assert (out / "side_by_side.gif").is_file() and (out / "arms_diffusion.png").is_file()
    # the playground clips themselves are the judge's ceiling
    assert summary["judge"]["playground clips (reference)"]["pc"] > 0.5
    stamp = (out / "stage1" / "metrics.json").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr("moalign.playground.pretrain_encoder.pretrain_encoder", must_not_run)
    monkeypatch.setattr("moalign.stage1.train_stage1", must_not_run)
    monkeypatch.setattr("moalign.playground.basemodel.train_vae", must_not_run)
    monkeypatch.setattr("moalign.stage2.train_stage2", must_not_run)
    monkeypatch.setattr("moalign.generate.generate", must_not_run)
    again = demo_mod.run_demo(tmp_path / "demo", progress=False)
    assert again["stage1"] == json.loads((tmp_path / "demo" / "stage1" / "metrics.json").read_text())
    assert (tmp_path / "demo" / "stage1" / "metrics.json").stat().st_mtime_ns == stamp
