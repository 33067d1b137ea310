"""Stage-2 representation probes (moalign/evaluation/dit_probes.py): rows line up, noise is fixed, end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import MICRO_DATA, tiny_pipeline, tiny_transformer

from moalign.backbones import get_backbone
from moalign.capture import FeatureCapture
from moalign.evaluation.dit_probes import probe_inputs, probe_run, transformer_probes


def _inputs(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random probe inputs for the tiny CogVideoX transformer: 3x4x4 latents -> a 3x2x2 token grid."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents": torch.randn(3, 4, 4, 4, generator=g),
            "prompt_embeds": torch.randn(8, 32, generator=g),
            "motion": torch.randn(3, 2, 2, 6, generator=g),
            "flow": torch.randn(3, 2, 2, 2, generator=g),
        }
        for _ in range(n)
    ]


def _block_tokens(model, spec, inputs, block: int, level: float, seed: int) -> list[torch.Tensor]:
    """Per clip, the block's video tokens (N, D) under the probes' noise: the slow reference, one clip at a time."""
    out = []
    for i, item in enumerate(inputs):
        gen = [torch.Generator().manual_seed(seed * 1_000_003 + i)]
        with torch.no_grad(), FeatureCapture(spec.blocks(model), [block], select=spec.video_tokens) as cap:
            spec.diffusion_loss(
                model, item["latents"][None], item["prompt_embeds"][None], gen, noise_level=level
            )
        out.append(cap[block][0])
    return out


def test_probe_finds_a_target_planted_in_one_block_and_ignores_batching():
    spec, model = (
        get_backbone("cogvideox"),
        tiny_transformer("cogvideox", text_embed_dim=32, num_layers=3, max_text_seq_length=8),
    )
    inputs = _inputs(12)
    # plant: the motion target is a linear map of block 1's tokens at noise level 0.5, clip by clip
    weights = torch.randn(16 * 2, 6, generator=torch.Generator().manual_seed(5))
    for item, tokens in zip(inputs, _block_tokens(model, spec, inputs, 1, 0.5, seed=3), strict=True):
        item["motion"] = (tokens @ weights).reshape(3, 2, 2, 6)
    r = transformer_probes(model, spec, inputs, noise_levels=(0.5, 0.9), seed=3, batch_size=4, alpha=1e-3)
    assert r["blocks"] == 3 and r["clips"] == 12 and len(r["per_level"]) == 2
    at_half = r["per_level"][0]["motion_r2"]
    # the planted block holds it exactly; its neighbours share the residual stream, so nearly, but less
    assert at_half[1] > 0.9999 and at_half[1] > max(at_half[0], at_half[2])
    assert r["per_level"][1]["motion_r2"][1] < 0.999  # another noise level: other tokens, no longer exact
    # targets moved to the next clip: rows no longer line up, nothing is found
    shifted = [dict(item, motion=inputs[(i + 1) % len(inputs)]["motion"]) for i, item in enumerate(inputs)]
    off = transformer_probes(model, spec, shifted, noise_levels=(0.5,), seed=3, batch_size=4, alpha=1e-3)
    assert off["per_level"][0]["motion_r2"][1] < 0.5
    # random flow targets hold nothing a probe could find on held-out clips
    assert max(r["per_level"][0]["flow_r2"]) < 0.2
    # the same clips, noise and result whatever the batch size; another seed draws other noise
    again = transformer_probes(model, spec, inputs, noise_levels=(0.5, 0.9), seed=3, batch_size=5, alpha=1e-3)
    np.testing.assert_allclose(again["per_level"][0]["motion_r2"], at_half, atol=1e-6)
    assert again["per_level"][0]["diffusion"] == pytest.approx(r["per_level"][0]["diffusion"], rel=1e-5)
    other = transformer_probes(model, spec, inputs, noise_levels=(0.5,), seed=4, batch_size=4, alpha=1e-3)
    assert other["per_level"][0]["diffusion"] != pytest.approx(r["per_level"][0]["diffusion"], rel=1e-3)
    assert other["per_level"][0]["motion_r2"][1] < 0.999
    # the loss grows with the noise level, and a level outside [0, 1] is refused
    assert r["per_level"][1]["diffusion"] != r["per_level"][0]["diffusion"]
    with pytest.raises(ValueError, match="noise_level"):
        transformer_probes(model, spec, inputs, noise_levels=(1.5,))


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_fixed_noise_level_sets_every_timestep(family):
    kw = {"max_text_seq_length": 8} if family == "cogvideox" else {"text_dim": 32}
    spec, model = get_backbone(family), tiny_transformer(family, **kw)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    shape = (2, 3, 4, 4, 4) if family == "cogvideox" else (2, 4, 3, 4, 4)
    spec.diffusion_loss(model, torch.randn(shape), torch.randn(2, 8, 32), None, noise_level=0.5)
    expected = 500.0 if family == "wan" else round(0.5 * 999)
    assert seen[0].tolist() == [expected, expected]


def test_probe_run_on_a_pipeline_with_playground_flow(playground, stage1_run, tmp_path):
    from moalign.latents import compute_latents
    from moalign.teacher import compute_targets

    data = stage1_run.data  # 10 playground clips with exact flow
    pipe = tiny_pipeline("cogvideox")
    pipe.save_pretrained(tmp_path / "pipe")
    compute_latents(
        data, None, tmp_path / "lat", backbone="cogvideox", data=MICRO_DATA, pipeline=pipe, progress=False
    )
    compute_targets(data, stage1_run.folder, tmp_path / "tgt", progress=False)
    inputs = probe_inputs(tmp_path / "lat", tmp_path / "tgt", data, stage1_run.cfg.data, clips=6)
    assert len(inputs) == 6 and inputs[0]["flow"].shape == (4, 4, 4, 2)
    assert max(float(i["flow"].abs().max()) for i in inputs) > 0.1  # the balls move: the flow is not all zero
    r = probe_run(tmp_path / "pipe", inputs, noise_levels=(0.3,), batch_size=3)
    assert r["blocks"] == 4 and len(r["mean"]["motion_r2"]) == 4 and np.isfinite(r["mean"]["diffusion"])
    # the command: the same figures (8 clips: probe_run's default batch) into a JSON file
    from moalign.cli import main

    argv = ["probe", "--model", str(tmp_path / "pipe"), "--data", str(data), "--latents", str(tmp_path / "lat"),
            "--targets", str(tmp_path / "tgt"), "--teacher", str(stage1_run.folder), "--clips", "6",
            "--noise-levels", "0.3", "--out", str(tmp_path / "p.json"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    written = json.loads((tmp_path / "p.json").read_text())
    np.testing.assert_allclose(written["mean"]["motion_r2"], r["mean"]["motion_r2"], atol=1e-6)
    assert (
        written["model"] == str(tmp_path / "pipe") and written["state"] is None
    )  # what the figures describe
    with pytest.raises(Exception, match="not a checkpoint's transformer weights"):
        probe_run(tmp_path / "pipe", inputs, state=tmp_path / "training_state.pt")
    with pytest.raises(Exception, match="at least 4"):
        probe_inputs(tmp_path / "lat", tmp_path / "tgt", data, stage1_run.cfg.data, clips=3)
