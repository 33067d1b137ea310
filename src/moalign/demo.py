"""`moalign demo`: the pipeline end to end on the synthetic physics playground.

Steps (each skipped when its output is already complete, so a re-run resumes):
  1. synth            OUT/data      playground clips with exact flow and captions
  2. pretrain-encoder OUT/encoder   a small VideoMAE trained with masked autoencoding, then frozen
  3. stage1           OUT/stage1    the motion subspace M_psi + flow decoder F_omega (val_epe vs zero flow)
The report (OUT/report.md) collects the figures. Stage 2 and its comparison arms come next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moalign.atomic import write_text
from moalign.config import get_preset


def run_demo(out: str | Path, preset: str = "tiny", progress: bool = True) -> dict:
    """Run (or resume) the demo in `out` with a named preset; returns the collected metrics."""
    from dataclasses import replace

    from moalign.playground import write_playground
    from moalign.pretrain_encoder import pretrain_encoder
    from moalign.stage1 import train_stage1

    out = Path(out)
    recipe = get_preset(preset)
    data_dir, enc_dir, s1_dir = out / "data", out / "encoder", out / "stage1"
    t0 = time.time()
    timings = {}

    def step(name: str, done: bool, fn) -> None:
        if done:
            print(f"[demo] {name}: already done, skipped")
            return
        print(f"[demo] {name} ...")
        start = time.time()
        fn()
        timings[name] = round(time.time() - start, 1)

    step("1/3 synth", False, lambda: write_playground(data_dir, recipe.synth, progress=progress))
    step(
        "2/3 pretrain-encoder",
        (enc_dir / "config.json").is_file(),
        lambda: pretrain_encoder(
            data_dir, enc_dir, recipe.pretrain, progress=progress, command="moalign demo"
        ),
    )
    s1_cfg = replace(recipe.stage1, encoder=replace(recipe.stage1.encoder, path=str(enc_dir)))
    step(
        "3/3 stage1",
        (s1_dir / "metrics.json").is_file(),
        lambda: train_stage1(
            data_dir, s1_dir, s1_cfg, resume="latest", progress=progress, command="moalign demo"
        ),
    )

    pre = json.loads((enc_dir / "pretrain.json").read_text())["metrics"]
    s1 = json.loads((s1_dir / "metrics.json").read_text())
    summary = {
        "preset": preset,
        "pretrain": pre,
        "stage1": s1,
        "step_seconds": timings,  # the steps run this time (finished ones were skipped)
        "seconds_this_run": round(time.time() - t0, 1),
    }
    report = f"""# moalign demo ({preset} preset)

Data: {recipe.synth.num_clips} playground clips, {recipe.synth.num_frames} frames at
{recipe.synth.height}x{recipe.synth.width} (`{data_dir}`).

| step | result |
|---|---|
| encoder pretraining (masked autoencoding) | masked-patch MSE {pre["first_mse"]:.3f} -> {pre["final_mse"]:.3f} (one constant colour: {pre.get("constant_colour_mse", float("nan")):.3f}) |
| stage 1 val EPE (held-out clips, px) | {s1["val_epe"]:.4f} |
| zero-motion EPE on the same clips (px) | {s1["zero_flow_epe"]:.4f} |
| ratio (lower is better; 1.0 = no motion learnt) | {s1["val_epe_ratio"]:.2f} |

Curves: `encoder/loss_curve.png`, `stage1/loss_curve.png`. The stage-2 teacher is
`stage1/motion_projector.safetensors`.
"""
    write_text(out / "report.md", report)
    print(report)
    print(f"[demo] finished in {summary['seconds_this_run']} s; report: {out / 'report.md'}")
    return summary
