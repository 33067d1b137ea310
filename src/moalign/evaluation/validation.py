"""Stage 2's validation videos and their motion: what `validate_every` makes, and the check that fine-tuning
has not taken the motion away (motion: `moalign/evaluation/video.py`). With `validation_judge` (playground
prompts) the toy judge scores every validation folder too (val_sa, val_pc, val_joint in the log). The videos go
to the run's trackers too (`RunLogger.log_media`: wandb videos, TensorBoard frame strips)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moalign.backbones.spec import unwrap
from moalign.run import console
from moalign.run.atomic import write_json

if TYPE_CHECKING:
    from moalign.stage2 import Stage2Config

logger = console.get_logger(__name__)


def validate(
    spec: Any, transformer: torch.nn.Module, cfg: Stage2Config, out: Path, device: torch.device
) -> float:
    """Validation videos with the transformer being trained, on its device, through the base pipeline's other
    parts; returns their mean motion (px/frame, `moalign/evaluation/video.py`), also written to OUT/motion.json."""
    from moalign.data.video_io import read_video
    from moalign.evaluation.video import video_metrics
    from moalign.generate import generate
    from moalign.run.launch import autocast_dtype

    base = cfg.validation_pipeline or cfg.model  # Stage2Config checks one is set
    pipe = spec.pipeline_class.from_pretrained(base, transformer=transformer)
    transformer.eval()
    h, w = cfg.validation_size
    # under mixed precision a LoRA run's frozen base is stored in 16 bit while the pipeline loads in float32:
    # sample in the dtype training computes in, as accelerate's autocast does for the losses
    half = autocast_dtype(cfg.mixed_precision)
    with torch.autocast(device_type=torch.device(device).type, dtype=half, enabled=half is not None):
        rows = generate(
            base, list(cfg.validation_prompts), out, num_frames=cfg.validation_frames, height=h, width=w,
            steps=cfg.validation_steps, seed=cfg.seed, pipeline=pipe, progress=False, device=str(device),
        )  # fmt: skip
    motion = [video_metrics(read_video(out / row["video"])[0]).motion for row in rows]
    mean = float(sum(motion) / len(motion))
    write_json(out / "motion.json", {"motion": motion, "mean": mean})
    return mean


def judge_validation(out: Path) -> dict[str, float]:
    """The toy judge's mean SA, PC and Joint of a validation folder of playground prompts (OUT/judge.json;
    `moalign/playground/judge.py`), for `validation_judge` runs: {"val_sa", "val_pc", "val_joint"}."""
    from moalign.playground.judge import judge_folder

    scores = judge_folder(out)["aggregate"]
    return {f"val_{k}": scores[k] for k in ("sa", "pc", "joint")}


def base_motion(
    spec: Any, model: Any, cfg: Stage2Config, out_dir: Path, device: Any, start_step: int
) -> float | None:
    """The mean motion of validation videos before any training step (RUN/validation/step-0, made once; a
    resumed run reads it back; None for a run resumed without one): what later validation motion is compared
    with."""
    path = out_dir / "validation" / "step-0" / "motion.json"
    if path.is_file():
        return json.loads(path.read_text())["mean"]
    if start_step > 0:
        return None
    motion = validate(spec, unwrap(model).transformer, cfg, path.parent, device)
    model.train()
    return motion


def check_motion(step: int, motion: float, base: float | None) -> None:
    """Warn when fine-tuning has taken the motion away: validation motion under half the base model's on the
    same prompts and seeds (the failure users report most after LoRA fine-tuning)."""
    if base is not None and base > 0 and motion < 0.5 * base:
        logger.warning(
            f"[stage2] step {step}: validation videos move {motion:.2f} px/frame, under half of the base model's "
            f"{base:.2f} on the same prompts and seeds; the fine-tune may be killing the motion (lower lr or "
            "lambda, fewer steps, or look at RUN/validation/)"
        )


def log_videos(log: Any, step: int, folder: Path) -> None:
    """Send a validation folder's videos to the run's trackers as "validation/video_<i>", captioned with their
    prompts (the folder's metadata.jsonl, written by `moalign/generate.py`)."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line]
    for i, row in enumerate(rows):
        log.log_media(step, f"validation/video_{i}", folder / row["video"], caption=row["caption"])


class MotionWatch:
    """Stage 2's validation: videos every `validate_every` steps (main process only), their mean motion logged
    as `val_motion`, and a warning when it falls under half of the base model's (`base_motion`, step 0). The
    videos go to the trackers at the step they are logged with; with `log`, the base model's step-0 videos too
    (when made in this launch), with their mean motion as `val_motion_base`."""

    def __init__(
        self,
        spec: Any,
        cfg: Stage2Config,
        out_dir: Path,
        device: Any,
        main: bool,
        model,
        start_step: int,
        log: Any = None,
    ):
        self.spec, self.cfg, self.out_dir, self.device = spec, cfg, out_dir, device
        self.enabled = bool(cfg.validate_every) and main
        made_here = self.enabled and not (out_dir / "validation" / "step-0" / "motion.json").is_file()
        self.base = base_motion(spec, model, cfg, out_dir, device, start_step) if self.enabled else None
        if log is not None and made_here and self.base is not None:
            log.log(0, val_motion_base=self.base)
            log_videos(log, 0, out_dir / "validation" / "step-0")

    def __call__(self, model: Any, done: int, step: int, log: Any) -> None:
        if not self.enabled or done % self.cfg.validate_every:
            return
        out = self.out_dir / "validation" / f"step-{done}"
        motion = validate(self.spec, unwrap(model).transformer, self.cfg, out, self.device)
        judged = judge_validation(out) if self.cfg.validation_judge else {}
        log.log(step, val_motion=motion, **judged)
        log_videos(log, step, out)
        check_motion(done, motion, self.base)
        model.train()
