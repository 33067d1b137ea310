"""Plumbing shared by the training loops: starting a run, one optimizer step, run logs, the LR schedule,
deterministic batch order, checks.

Plain functions and one small logger class, no Trainer class: every loop (stage 1, stage 2, encoder
pretraining, the demo's VAE) reads data -> forward -> backward -> `optimizer_step` -> log -> checkpoint in its
own file, and starts with the same calls:

    finished_run(out, resume, stage, steps)        # a finished run asked again: its metrics, nothing to do
    ckpt = resume_checkpoint(out, resume, config)  # the checkpoint to continue from, settings checked
    ...build the model, optimizer, scheduler; load ckpt...
    logger = open_run(accelerator, out, config, command, launch, start_step, report_to)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moalign.errors import Interrupted, MoalignError
from moalign.run import console
from moalign.run.atomic import json_safe, write_failure, write_json
from moalign.run.checkpoint import (
    check_resume_config,
    check_resume_inputs,
    list_checkpoints,
    remove_temporaries,
    resolve_resume,
    write_run_config,
)
from moalign.run.lock import FolderLock, hold_folder

logger = console.get_logger(__name__)

# report_to -> the trackers beside RUN/log.jsonl (which is always written)
REPORT_TO = {
    "none": (),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "all": ("tensorboard", "wandb"),
}
WANDB_RUN = "wandb_run.json"  # RUN/wandb_run.json: the wandb run id (and project) a resumed run continues


def check_report_to(value: str) -> None:
    """`report_to` names a tracker setting we have: "none" (RUN/log.jsonl only), "tensorboard", "wandb", "all"."""
    if value not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {value!r}")


class RunLogger:
    """Logs scalars to RUN/log.jsonl (append-only) and to the trackers `report_to` names: TensorBoard
    (RUN/tensorboard/) and wandb (project $WANDB_PROJECT or "moalign", run named after the run folder, the run's
    config); keeps the history for curve plots. `log_media` sends validation videos to the trackers.

    Only the main process writes; others keep the history in memory. A resumed run drops what a killed run
    logged after its last checkpoint from the JSON log and (through `purge_step`) from TensorBoard's view, and
    continues the same wandb run (its id is in RUN/wandb_run.json): wandb cannot take points back, so steps the
    wandb server already holds are not sent again.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        resume_from_step: int = -1,
        report_to: str = "none",
        config: dict[str, Any] | None = None,
    ):
        check_report_to(report_to)
        self.path = run_dir / "log.jsonl"
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.start = time.time()
        self.lock: Any = None  # the run folder's lock while the run writes it (`open_run`)
        if self.path.is_file():
            # keep what came before the resumed step, drop lines a killed run wrote after its last checkpoint
            self.history = [r for r in read_log(run_dir) if r.get("step", 0) <= resume_from_step]
            if enabled:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        trackers = REPORT_TO[report_to] if enabled else ()
        self.tensorboard = _TensorBoard(run_dir, resume_from_step) if "tensorboard" in trackers else None
        self.wandb = _Wandb(run_dir, config or {}) if "wandb" in trackers else None

    @property
    def trackers(self) -> list[Any]:
        return [t for t in (self.tensorboard, self.wandb) if t is not None]

    def log(self, step: int, **scalars: float) -> None:
        row = {"step": step, "time_s": round(time.time() - self.start, 2), **scalars}
        self.history.append(row)
        if self.enabled:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
            except OSError as err:
                raise write_failure(self.path, err) or err from err
        for tracker in self.trackers:
            tracker.scalars(step, scalars)

    def log_media(
        self,
        step: int,
        name: str,
        video: str | os.PathLike | np.ndarray,
        caption: str | None = None,
        fps: float = 8.0,
    ) -> None:
        """One video to the trackers (RUN/log.jsonl keeps scalars only; the video stays where it was written).

        Args:
            step: the step it belongs to (the step of the scalars logged with it).
            name: its tag, e.g. "validation/video_0".
            video: an mp4 (or any file `read_video` decodes) or uint8 frames (T, H, W, 3).
            caption: shown under it in wandb (e.g. the prompt).
            fps: frame rate of `frames` (a file keeps its own).

        wandb gets the mp4 (`wandb.Video`); TensorBoard an image of up to 8 evenly spaced frames in a row, since
        its `add_video` needs moviepy 1.x, which moalign does not depend on.
        """
        if not self.trackers:
            return
        path = Path(video) if isinstance(video, (str, os.PathLike)) else None
        frames = None if path is not None else np.asarray(video)
        for tracker in self.trackers:
            tracker.video(step, name, path, frames, caption, fps)

    def close(self) -> None:
        """Flush and close the trackers (the JSON log is written line by line)."""
        for tracker in self.trackers:
            tracker.close()
        self.tensorboard = self.wandb = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged scalar."""
        return series(self.history, key)


def frame_strip(frames: np.ndarray, count: int = 8) -> np.ndarray:
    """Up to `count` evenly spaced frames side by side: uint8 (T, H, W, 3) -> (H, count * W, 3)."""
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in idx], axis=1)


class _TensorBoard:
    """RUN/tensorboard/ through torch's SummaryWriter."""

    def __init__(self, run_dir: Path, resume_from_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MoalignError(
                "report_to=tensorboard needs the tensorboard package: pip install tensorboard "
                "(or --set report_to=none)"
            ) from err
        # TensorBoard hides events of earlier files at steps >= purge_step: a killed run's tail
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_from_step + 1)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def video(self, step, name, path, frames, caption, fps) -> None:
        if frames is None:
            from moalign.data.video_io import read_video

            frames, _ = read_video(path)
        self.writer.add_image(name, frame_strip(frames), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One wandb run per run folder: started with an id recorded in RUN/wandb_run.json, continued with it."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise MoalignError(
                "report_to=wandb needs the wandb package: pip install 'moalign[wandb]' (or pip install wandb), "
                "or --report-to tensorboard"
            ) from err
        record = run_dir / WANDB_RUN
        if record.is_file():  # a resumed run (or a restart before the first checkpoint): the same wandb run
            ids = json.loads(record.read_text())
        else:
            ids = {"id": secrets.token_hex(6), "project": os.environ.get("WANDB_PROJECT") or "moalign"}
            write_json(record, ids)  # before wandb starts, so a run killed at any point is continued
        try:
            self.run = wandb.init(
                project=ids["project"], id=ids["id"], name=run_dir.name, resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(run_dir),  # default RUN/wandb/; read at every start
                reinit="create_new",  # its own run even when another is active in this process
            )  # fmt: skip
        except wandb.Error as err:
            raise MoalignError(
                f"report_to=wandb could not start wandb run {ids['id']} (project {ids['project']}): "
                f"{str(err).rstrip('.')}. "
                "Log in with `wandb login` or set WANDB_API_KEY, or log offline with WANDB_MODE=offline "
                "(`wandb sync` later), or --report-to tensorboard"
            ) from err
        self.run.config.update(config, allow_val_change=True)  # `steps` etc. may change on resume
        # the steps the server already holds (0 for a new or offline run): a killed run's tail, not sent again
        self.first_step = self.run.starting_step
        self.video_type = wandb.Video

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(scalars, step=step)

    def video(self, step, name, path, frames, caption, fps) -> None:
        if step < self.first_step:
            return
        if path is not None:
            self.run.log({name: self.video_type(str(path), caption=caption)}, step=step)
            return
        from moalign.data.video_io import write_video

        with tempfile.TemporaryDirectory() as tmp:  # wandb copies the file into its run folder in `log`
            write_video(Path(tmp) / "video.mp4", frames, fps=fps)
            self.run.log({name: self.video_type(str(Path(tmp) / "video.mp4"), caption=caption)}, step=step)

    def close(self) -> None:
        self.run.finish()


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN/log.jsonl, skipping a last line cut by a kill."""
    rows = []
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged scalar."""
    picked = [r for r in rows if key in r]
    return [r["step"] for r in picked], [r[key] for r in picked]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up then cosine decay to 10% of the base LR (a LambdaLR)."""
    if warmup_steps >= total_steps > 0:
        logger.warning(
            f"[train] the warm-up ({warmup_steps} step(s)) is not shorter than the run ({total_steps} step(s)): "
            f"the learning rate never reaches its set value; lower it, e.g. --set "
            f"warmup_steps={max(0, total_steps // 10)}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The global batch of training step `step`: a fixed function of (seed, step), so resuming is exact.

    Each epoch is a seeded permutation of range(num_items); batches never straddle epochs (the tail is dropped).
    """
    if num_items < batch_size:
        raise MoalignError(
            f"only {num_items} training clips for a batch of {batch_size}: add clips or lower --batch-size"
        )
    per_epoch = num_items // batch_size
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=gen)
    return perm[pos * batch_size : (pos + 1) * batch_size]


# what a non-finite stop advises; --lr and --mixed-precision may change when a run is resumed
# (RESUMABLE_CHANGES in run/checkpoint.py), so the advice and the resume rules agree
NONFINITE_FIX = (
    "Lower the learning rate (--lr) or train in fp32 (--mixed-precision no) and continue from the last checkpoint "
    "with --resume latest (both may change on resume), or start a new run with a smaller --lambda"
)


def check_finite(step: int, parts: dict[str, torch.Tensor]) -> None:
    """Stop the run with the step and every loss part when the loss is not finite."""
    if not all(torch.isfinite(v.detach()).all() for v in parts.values()):
        shown = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in parts.items())
        raise MoalignError(f"non-finite loss at step {step}: {shown}. {NONFINITE_FIX}.")


def parameter_counts(**modules: nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (trainable, frozen) parameter counts, for the start-up log."""
    out = {}
    for name, module in modules.items():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        out[name] = (trainable, frozen)
    return out


def format_parameter_counts(counts: dict[str, tuple[int, int]]) -> str:
    return "; ".join(f"{k}: {t:,} trainable, {f:,} frozen" for k, (t, f) in counts.items())


def resume_checkpoint(
    run_dir: Path, resume: str | None, config: dict[str, Any], inputs: dict[str, Any] | None = None
) -> Path | None:
    """The checkpoint-N folder a run continues from (None: a fresh start), verified and of this run
    (`resolve_resume`), after checking that the run folder was started with the same settings
    (`check_resume_config`) and inputs (`check_resume_inputs`)."""
    # other settings: listed, before any checkpoint is judged foreign to them
    if resume is not None and (resume != "latest" or list_checkpoints(run_dir)):
        check_resume_config(run_dir, config)
    ckpt = resolve_resume(run_dir, resume, config)
    if ckpt is not None:
        check_resume_inputs(run_dir, inputs)
    return ckpt


def open_run(
    accelerator: Any,
    run_dir: Path,
    config: dict[str, Any],
    command: str,
    launch: dict[str, Any] | None,
    start_step: int,
    report_to: str = "none",
    inputs: dict[str, Any] | None = None,
) -> RunLogger:
    """Create the run folder and its RUN/config.json on the main process; the run's logger, continuing after
    `start_step` (what a killed run logged later is dropped), with `config` as the wandb run's config.

    The main process holds the run folder's lock (`hold_run_folder`) for as long as the logger lives: a second
    run into the same folder is refused, naming this one."""
    lock = None
    if accelerator.is_main_process:
        lock = hold_run_folder(run_dir)
        remove_temporaries(run_dir)  # hidden leftovers of writes a killed run left
        write_run_config(
            run_dir, config, command, launch=launch, resumed_at=start_step or None, inputs=inputs
        )
    log = RunLogger(
        run_dir,
        enabled=accelerator.is_main_process,
        resume_from_step=start_step - 1,
        report_to=report_to,
        config=config,
    )
    log.lock = lock
    return log


def hold_run_folder(run_dir: Path, create: bool = True) -> FolderLock | None:
    """The run folder's lock (`moalign.run.lock.hold_folder`), taken by the launch's main process (RANK 0);
    None on other processes, and with `create=False` when the folder does not exist yet (a training function
    takes it early, before loading models, so a second run into a folder in use stops at once; `open_run`
    takes it for good, creating the folder).

    Raises:
        MoalignError: another process holds the folder (the message names it).
    """
    if not console.is_main_process() or (not create and not Path(run_dir).is_dir()):
        return None
    return hold_folder(run_dir, "a training run")


def optimizer_step(
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: Any,
    grad_clip: float,
    step: int | None = None,
) -> float | None:
    """Clip the gradient norm (when `grad_clip` > 0), step the optimizer and the LR schedule, clear gradients.

    The schedule steps once per global step, not once per process (accelerate's scheduler wrapper would make a
    run's schedule depend on its number of processes). Under DeepSpeed the clip happens inside its step, from
    the value `launch.prepare_training` put into its config.

    A non-finite gradient norm stops the run before the optimizer steps (a finite loss can still overflow the
    gradient, e.g. an absurd alignment weight: clipping would then zero every update and train nothing),
    except under fp16 loss scaling, whose scaler skips such steps itself, and under DeepSpeed, which reports
    the norm only after its step (its non-finite weights then stop the next step's loss check).

    Returns:
        The total gradient norm before clipping (None under DeepSpeed).

    Raises:
        MoalignError: the gradient norm is inf or NaN (`step` names the step).
    """
    from accelerate.utils import DistributedType

    # max_norm inf: the norm without clipping
    norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if norm is not None and not deepspeed and accelerator.scaler is None and not math.isfinite(float(norm)):
        raise MoalignError(
            f"non-finite gradient norm ({float(norm)}) at step {step}; the loss was finite. {NONFINITE_FIX}."
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return None if norm is None or deepspeed else float(norm)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Turns SIGTERM (a cluster's preemption, `scancel`, `kill`) and SIGINT (Ctrl-C) during a training loop into a
    stop at the next step boundary, with a checkpoint, instead of losing every step since the last one.

    Used as a context manager around the loop; the loop asks `due(accelerator)` after each step, and when it
    says so writes a checkpoint of the step just finished and calls `stop`, which raises `Interrupted` (the CLI
    exits 143 for SIGTERM, 130 for SIGINT). With several processes `due` agrees across them (a max over the
    processes, one tiny all-reduce per step), so every process stops at the same step and joins the same
    checkpoint, whichever process got the signal. A second SIGINT stops at once (KeyboardInterrupt), for a step
    that takes too long; a second SIGTERM is ignored (the first is being honoured).

    Outside the main thread (signals cannot be caught there) it does nothing. The step in flight when the signal
    comes is finished first: a scheduler's grace period (SLURM's KillWait, Kubernetes'
    terminationGracePeriodSeconds) must cover one step plus one checkpoint write.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write: a handler may run while the logging module holds its lock
        os.write(
            2,
            f"\n[{self.stage}] {name} received: stopping after this step with a checkpoint "
            f"{'(Ctrl-C again stops at once, losing the step)' if signum == signal.SIGINT else ''}\n".encode(),
        )

    def due(self, accelerator: Any) -> bool:
        """Whether any process got a stop signal; every process must call it at the same step."""
        if accelerator.num_processes > 1:
            flag = torch.tensor([self.signum or 0], device=accelerator.device)
            self.signum = int(accelerator.reduce(flag, "max").item()) or None
        return self.signum is not None

    def stop(self, done: int, steps: int, checkpoint: Path | None) -> None:
        """Raise `Interrupted` saying where the run stopped and how to continue it."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        kept = (
            f"{checkpoint} holds it: run the same command with --resume latest to continue (`moalign demo` and "
            "`moalign study` continue when run again as they were)"
            if checkpoint is not None
            else "nothing was saved"
        )
        raise Interrupted(
            self.signum or signal.SIGTERM, f"stopped by {name} after step {done} of {steps}; {kept}"
        )
