"""`moalign stage1`: learn the motion subspace (paper Sec. 3.1).

    clip --frozen VideoMAE(v2)--> S (F'', H'', W'', D_v) --M_psi--> M (..., 64) --F_omega--> flow  ~L1~  optical flow

Only M_psi and F_omega train. The encoder is frozen and deterministic, so with `feature_cache="memory"`
each clip is encoded once (exactly what the per-step forward would compute, at a fraction of the cost).
Flow targets come from the manifest's exact flow (the playground), a flow cache (`moalign flow`), or a
flow method run on the fly. After training, RUN/motion_projector.safetensors alone is the stage-2 teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moalign.data.cache import Cache
from moalign.data.dataset import VideoClipDataset
from moalign.data.flow import build_flow_estimator
from moalign.data.flow_cache import load_flow_cache
from moalign.data.geometry import resize_flow
from moalign.data.sampling import DataConfig
from moalign.encoder import EncoderConfig, VideoEncoder
from moalign.errors import MoalignError
from moalign.flow_decoder import FlowDecoder, FlowDecoderConfig
from moalign.losses import end_point_error, flow_loss
from moalign.motion_projector import MotionProjector, MotionProjectorConfig
from moalign.run import console
from moalign.run.atomic import write_json
from moalign.run.checkpoint import (
    finished_run,
    load_module_file,
    restore_training_state,
    save_module,
    save_training_checkpoint,
    training_state,
)
from moalign.run.checks import check_training_fields
from moalign.run.launch import prepare_training, reduce_scalars, start_launch
from moalign.run.plots import plot_curves
from moalign.run.serialize import to_dict
from moalign.run.training import (
    StopOnSignal,
    batch_indices,
    check_finite,
    check_report_to,
    cosine_with_warmup,
    format_parameter_counts,
    hold_run_folder,
    open_run,
    optimizer_step,
    parameter_counts,
    resume_checkpoint,
)

logger = console.get_logger(__name__)


STILL_EPE = 1e-6  # px: held-out clips whose zero-flow EPE is below this do not move


def epe_ratio_text(metrics: dict[str, Any]) -> str:
    """val_epe_ratio for a message: two decimals, or why there is none."""
    ratio = metrics.get("val_epe_ratio")
    return f"{ratio:.2f}" if ratio is not None else "undefined: the held-out clips do not move"


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: learn the motion subspace M_psi (and the flow decoder F_omega) on the frozen encoder."""

    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(input_size=(64, 64)))
    projector: MotionProjectorConfig = field(default_factory=lambda: MotionProjectorConfig(hidden_dim=256))
    decoder: FlowDecoderConfig = field(default_factory=lambda: FlowDecoderConfig(hidden_dim=96))
    flow_method: str = "auto"  # "auto": exact ground truth when the manifest has it, else "dis"
    flow_loss: str = (
        "l1"  # the paper's L1; "huber" escapes the all-zero plateau on sparse (playground) motion
    )
    huber_delta: float = 1.0  # px at the decoder resolution, for flow_loss="huber"
    stats_clips: int = 64  # training clips whose features fix M_psi's input standardisation
    val_clips: int = 8  # held out for val_epe, chosen by a seeded permutation of the manifest
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 40
    grad_clip: float = 1.0
    feature_cache: str = "memory"  # "memory": encode each clip once (the encoder is frozen and deterministic)
    seed: int = 0
    log_every: int = 25
    val_every: int = 200
    checkpoint_every: int = 400
    checkpoint_limit: int = 2  # checkpoint-N folders kept (the newest)
    # playground runs: linear probes of colour and flow on this many clips (0: none); see evaluation/probes.py
    probe_clips: int = 32
    mixed_precision: str = "no"
    report_to: str = "tensorboard"  # also log to RUN/tensorboard/ ("none": RUN/log.jsonl only)

    def __post_init__(self) -> None:
        check_training_fields(self)
        check_report_to(self.report_to)
        if self.feature_cache not in ("memory", "none"):
            raise ValueError(f"feature_cache must be 'memory' or 'none', got {self.feature_cache!r}")
        if self.flow_loss not in ("l1", "huber", "l2"):
            raise ValueError(f"flow_loss must be 'l1', 'huber' or 'l2', got {self.flow_loss!r}")
        if self.val_clips < 1:
            raise ValueError("val_clips must be >= 1: val_epe is measured on held-out clips")


class Stage1Heads(nn.Module):
    """M_psi then F_omega: tokens (B, F, H, W, D_v) -> (motion (B, F, H, W, D_m), flow (B, P, h, w, 2))."""

    def __init__(self, projector: MotionProjector, decoder: FlowDecoder):
        super().__init__()
        self.projector = projector
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        motion = self.projector(tokens)
        return motion, self.decoder(motion)


class ClipPreparer:
    """Turns dataset items into stage-1 tensors: encoder tokens and flow targets (optionally memoised)."""

    def __init__(
        self, dataset, encoder: VideoEncoder, flow_source, flow_size: tuple[int, int], device, memo: bool
    ):
        self.dataset, self.encoder, self.flow_source = dataset, encoder, flow_source
        self.flow_size, self.device, self.memo = flow_size, device, memo
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def flow_of(self, i: int, sample: dict) -> torch.Tensor:
        """Target flow at the dataset resolution, (T-1, H, W, 2) float32."""
        if hasattr(self.flow_source, "estimate"):
            return torch.as_tensor(self.flow_source.estimate(sample)).float()
        return self.flow_source[int(sample["index"])]["flow"].float()  # a flow cache

    def __call__(self, i: int, full_flow: bool = False) -> dict[str, torch.Tensor]:
        if i in self.cache:
            return self.cache[i]
        sample = self.dataset[i]
        pixels = self.encoder.preprocess(sample["frames"][None].to(self.device))  # (1, T', 3, h, w)
        tokens = self.encoder(pixels)[0]  # (F'', H'', W'', D_v), no grad
        flow = self.flow_of(i, sample)  # (T-1, H, W, 2) at the dataset resolution
        item = {"tokens": tokens, "flow": resize_flow(flow, *self.flow_size)}  # flow in decoder pixels
        if full_flow:
            item["flow_full"] = flow
        if self.memo:
            self.cache[i] = item
        return item


def make_flow_source(cfg: Stage1Config, dataset, flow_cache: str | None):
    """The stage's flow targets: a flow cache folder, or an estimator ('exact' reads the manifest's flow)."""
    if flow_cache is not None:
        return load_flow_cache(flow_cache, dataset)
    method = cfg.flow_method
    if method == "auto":
        method = "exact" if all(r.flow is not None for r in dataset.records) else "dis"
    return build_flow_estimator(method)


@dataclass
class _Stage1Parts:
    """What stage 1's set-up builds: the frozen encoder, the clips and their split, the heads, the flow targets."""

    cfg: Stage1Config  # resolved: the projector's input width is the encoder's
    encoder: VideoEncoder
    dataset: VideoClipDataset
    flow_source: Any
    train_ids: list[int]
    val_ids: list[int]
    heads: Stage1Heads
    grid: tuple[int, int, int]
    flow_size: tuple[int, int]


def _build(data_dir: str | Path, cfg: Stage1Config, flow_cache: str | None, device: Any) -> _Stage1Parts:
    """Set-up phase: load the frozen encoder, read the dataset, hold out validation clips, build the heads."""
    # float32 weights whatever the checkpoint stores (converted ViTs are often fp16, slow and lossy on CPU);
    # mixed precision, when asked for, comes from accelerate's autocast
    encoder = VideoEncoder.from_pretrained(cfg.encoder, torch_dtype=torch.float32).to(device)
    encoder.check_clip(cfg.data.num_frames)  # before the dataset is read
    cfg = replace(
        cfg, projector=replace(cfg.projector, in_dim=encoder.width)
    )  # resolved: recorded in the run
    dataset = VideoClipDataset(data_dir, cfg.data, load_flow=flow_cache is None)
    flow_source = make_flow_source(cfg, dataset, flow_cache)
    n = len(dataset)
    if n <= cfg.val_clips + 1:
        raise MoalignError(
            f"{data_dir} has {n} usable clips; stage 1 holds out val_clips={cfg.val_clips}: add clips, or hold out "
            f"fewer with --set val_clips={max(1, n // 5)}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    val_ids, train_ids = perm[: cfg.val_clips].tolist(), perm[cfg.val_clips :].tolist()
    grid = encoder.grid(cfg.data.num_frames)
    projector = MotionProjector(
        cfg.projector
    )  # before the decoder: the seeded initialisation draws in this order
    try:
        decoder = FlowDecoder(
            cfg.decoder, patch_size=encoder.patch_size, pairs_per_tubelet=encoder.tubelet_size
        )
    except ValueError as err:
        raise MoalignError(str(err)) from err
    heads = Stage1Heads(projector, decoder)
    flow_size = decoder.output_size(grid[1:])
    return _Stage1Parts(cfg, encoder, dataset, flow_source, train_ids, val_ids, heads, grid, flow_size)


def _announce(parts: _Stage1Parts) -> None:
    cfg, encoder, heads = parts.cfg, parts.encoder, parts.heads
    counts = parameter_counts(encoder=encoder, motion_projector=heads.projector, flow_decoder=heads.decoder)
    assert counts["encoder"][0] == 0, "the encoder must be frozen"
    h, w = parts.flow_size
    logger.info(
        f"[stage1] encoder {cfg.encoder.path} block {encoder.layer_index} (0-based) of {encoder.num_layers}, "
        f"token grid {parts.grid}, width {encoder.width}; flow targets "
        f"{getattr(parts.flow_source, 'name', 'cache')} at {h}x{w}; {len(parts.train_ids)} train / "
        f"{len(parts.val_ids)} val clips\n[stage1] {format_parameter_counts(counts)}"
    )


def _module_meta(cfg: Stage1Config) -> dict[str, Any]:
    return {"stage1": to_dict(cfg), "projector": to_dict(cfg.projector), "decoder": to_dict(cfg.decoder)}


def _resume(ckpt: Path | None, heads: Stage1Heads, optimizer: Any, scheduler: Any) -> int:
    """Load a checkpoint's heads and training state; the step to continue from (0: a fresh start)."""
    if ckpt is None:
        return 0
    heads.projector.load_state_dict(
        load_module_file(ckpt / "motion_projector.safetensors", "motion_projector")[0]
    )
    heads.decoder.load_state_dict(load_module_file(ckpt / "flow_decoder.safetensors", "flow_decoder")[0])
    start_step = restore_training_state(ckpt, optimizer, scheduler)
    logger.info(f"[stage1] resumed from {ckpt} at step {start_step}")
    return start_step


def _features(parts: _Stage1Parts, device: Any, progress: bool, fresh: bool) -> ClipPreparer:
    """Tokens and flow targets of every clip, encoded once (feature_cache="memory") or per step ("none");
    a fresh run fixes M_psi's input standardisation from training features (a resumed one loads it)."""
    cfg = parts.cfg
    memo = cfg.feature_cache == "memory"
    prep = ClipPreparer(parts.dataset, parts.encoder, parts.flow_source, parts.flow_size, device, memo=memo)
    if memo:
        for i in console.progress(range(len(parts.dataset)), enabled=progress, desc="encode clips (frozen)"):
            prep(i, full_flow=i in parts.val_ids)
    if fresh:
        stats_tokens = torch.stack([prep(i)["tokens"] for i in parts.train_ids[: cfg.stats_clips]])
        parts.heads.projector.set_feature_stats(stats_tokens)  # (n, F'', H'', W'', D_v)
    return prep


@torch.no_grad()
def _validate(heads: nn.Module, prep: ClipPreparer, val_ids: list[int], device: Any) -> tuple[float, float]:
    """(val_epe, zero_flow_epe) in px at the dataset resolution, over all pixels of all held-out pairs."""
    heads.eval()
    epes, zeros = [], []
    for i in val_ids:
        item = prep(i, full_flow=True)
        _, pred = heads(item["tokens"][None].to(device))  # (1, P, h, w, 2)
        target = item["flow_full"].to(device)  # (P, H, W, 2)
        pred_full = resize_flow(pred[0].float(), target.shape[1], target.shape[2])
        epes.append(end_point_error(pred_full, target))
        zeros.append(target.norm(dim=-1).mean())
    heads.train()
    return float(torch.stack(epes).mean()), float(torch.stack(zeros).mean())


def _save_checkpoint(out_dir: Path, done: int, heads: Stage1Heads, cfg: Stage1Config, optimizer, scheduler):
    meta = _module_meta(cfg)
    save_training_checkpoint(
        out_dir,
        done,
        {
            "motion_projector": (heads.projector, "motion_projector", meta),
            "flow_decoder": (heads.decoder, "flow_decoder", meta),
        },
        training_state(optimizer, scheduler),
        limit=cfg.checkpoint_limit,
        config=to_dict(cfg),
    )


def train_stage1(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: Stage1Config,
    flow_cache: str | None = None,
    resume: str | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Train M_psi and F_omega on the frozen encoder and write a stage-1 run folder.

    Args:
        data_dir: dataset folder (playground output or any supported manifest).
        out_dir: the run folder: config.json, log.jsonl, checkpoint-N/, motion_projector.safetensors,
            flow_decoder.safetensors, metrics.json, loss_curve.png.
        cfg: resolved config; `cfg.encoder.path` must name the encoder folder.
        flow_cache: optional `moalign flow` cache of the same dataset and data config.
        resume: "latest" (the newest checkpoint-N; a fresh start when there is none; returns at once when the run
            is finished) or a checkpoint-N folder to continue from.

    Returns:
        metrics: val_epe and zero_flow_epe (px at the dataset resolution, held-out clips), train losses, timing.
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    if cfg.encoder.path is None:
        raise MoalignError(
            "stage 1 needs a frozen encoder: pass --encoder ENC (moalign pretrain-encoder or convert-videomaev2)"
        )
    _lock = hold_run_folder(out_dir, create=False)  # held while this run works: a folder in use stops at once
    done_metrics = finished_run(
        out_dir, resume, "stage-1", cfg.steps, to_dict(cfg), resolved=("projector.in_dim",)
    )
    if done_metrics is not None:
        return done_metrics
    accelerator, micro, launch = start_launch("stage1", cfg.mixed_precision, cfg.batch_size)
    device = accelerator.device
    set_seed(cfg.seed)
    parts = _build(data_dir, cfg, flow_cache, device)
    cfg, train_ids = parts.cfg, parts.train_ids
    _announce(parts)
    optimizer = torch.optim.AdamW(parts.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    inputs = {"flow": parts.flow_source.digest} if isinstance(parts.flow_source, Cache) else None
    ckpt = resume_checkpoint(out_dir, resume, to_dict(cfg), inputs)
    start_step = _resume(ckpt, parts.heads, optimizer, scheduler)
    heads, optimizer, params = prepare_training(
        accelerator, parts.heads, optimizer, micro_batch=micro, grad_clip=cfg.grad_clip
    )
    prep = _features(parts, device, progress, fresh=ckpt is None)
    log = open_run(accelerator, out_dir, to_dict(cfg), command, launch, start_step, cfg.report_to, inputs)

    t0 = time.time()
    seen = 0  # clips this process trained on in this launch: its share of every global batch
    heads.train()
    bar = console.progress(range(start_step, cfg.steps), enabled=progress, desc="stage1")
    with StopOnSignal("stage1") as stop:
        for step in bar:
            idx = batch_indices(len(train_ids), cfg.batch_size, step, cfg.seed)
            idx = idx[accelerator.process_index :: accelerator.num_processes].tolist()
            seen += len(idx)
            items = [prep(train_ids[j]) for j in idx]
            tokens = torch.stack([it["tokens"] for it in items]).to(device)  # (b, F'', H'', W'', D_v)
            target = torch.stack([it["flow"] for it in items]).to(device)  # (b, T-1, h, w, 2)
            with accelerator.autocast():
                _, pred = heads(tokens)
            loss = flow_loss(pred, target, kind=cfg.flow_loss, huber_delta=cfg.huber_delta)
            check_finite(step, loss)
            accelerator.backward(loss.total)
            optimizer_step(accelerator, optimizer, scheduler, params, cfg.grad_clip, step=step)

            done = step + 1
            if step % cfg.log_every == 0 or done == cfg.steps:
                scalars = reduce_scalars(accelerator, loss.scalars())  # the global batch's mean
                log.log(step, **{f"train_{k}": v for k, v in scalars.items()}, lr=scheduler.get_last_lr()[0])
                bar.set_postfix(l1=f"{scalars['l1']:.3f}", epe=f"{scalars['epe']:.3f}")
            if done % cfg.val_every == 0 or done == cfg.steps:
                val_epe, zero_epe = _validate(heads, prep, parts.val_ids, device)
                log.log(step, val_epe=val_epe, zero_flow_epe=zero_epe)
                logger.info(f"[stage1] step {done}: val_epe {val_epe:.4f} px (zero flow {zero_epe:.4f} px)")
            due = stop.due(accelerator)  # every process asks at every step
            # the last step too (a run can be extended), and the step a stop signal came in
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or due:
                if accelerator.is_main_process:
                    _save_checkpoint(
                        out_dir, done, accelerator.unwrap_model(heads), cfg, optimizer, scheduler
                    )
            if due:
                accelerator.wait_for_everyone()
                log.close()
                stop.stop(done, cfg.steps, out_dir / f"checkpoint-{done}")

    seen_all = accelerator.gather(torch.tensor([seen], device=device)).tolist()  # every process joins
    metrics = _finish(accelerator, out_dir, parts, heads, prep, log, seen_all, launch, time.time() - t0)
    return metrics


@torch.no_grad()
def _probes(parts: _Stage1Parts, heads: Stage1Heads, prep: ClipPreparer) -> dict[str, Any]:
    """Disentanglement probes (`moalign/evaluation/probes.py`) on the held-out clips, then training clips."""
    from moalign.evaluation.probes import stage1_disentanglement

    clips = []
    for i in (parts.val_ids + parts.train_ids)[: parts.cfg.probe_clips]:
        sample = parts.dataset[i]
        tokens = prep(i)["tokens"]
        motion = heads.projector(tokens[None].to(next(heads.parameters()).device))[0]
        frames = np.asarray(sample["frames"])
        clips.append({"encoder": tokens, "motion": motion, "frames": frames, "flow": prep.flow_of(i, sample)})
    result = stage1_disentanglement(clips)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result["flow_r2"].items())
    colour = result.get("colour_accuracy", {})
    logger.info(
        f"[stage1] probes on {len(clips)} clips: flow R^2 {shown}; colour accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in colour.items())
        + (f" (chance {result['colour_chance']:.3f})" if colour else "n/a")
    )
    return result


def _finish(accelerator, out_dir: Path, parts: _Stage1Parts, heads, prep, log, seen_all, launch, seconds):
    """Final phase: validate, write the heads, metrics.json and the loss curves (main process)."""
    cfg = parts.cfg
    val_epe, zero_epe = _validate(heads, prep, parts.val_ids, accelerator.device)
    log.close()
    steps_l1, l1 = log.series("train_l1")
    metrics = {
        "val_epe": val_epe,
        "zero_flow_epe": zero_epe,
        # undefined when the held-out clips do not move (zero-flow EPE 0): null with a note, not ~1e10
        "val_epe_ratio": val_epe / zero_epe if zero_epe > STILL_EPE else None,
        "final_train_l1": l1[-1] if l1 else None,
        "steps": cfg.steps,
        "train_seconds": round(seconds, 1),
        "val_clips": len(parts.val_ids),
        "train_clips": len(parts.train_ids),
        "num_processes": accelerator.num_processes,
        "engine": launch["engine"],
        "clips_per_process": seen_all,
        "flow_resolution": list(parts.flow_size),
        "token_grid": list(parts.grid),
    }
    if metrics["val_epe_ratio"] is None:
        metrics["val_epe_ratio_note"] = (
            f"the held-out clips do not move (zero-flow EPE {zero_epe:.2g} px): the ratio is undefined; judge "
            "val_epe alone, or hold out clips with motion (--set val_clips=N, a seeded choice)"
        )
    if accelerator.is_main_process and cfg.probe_clips and all(r.flow for r in parts.dataset.records):
        metrics["probes"] = _probes(parts, accelerator.unwrap_model(heads), prep)
    if accelerator.is_main_process:
        unwrapped, meta = accelerator.unwrap_model(heads), _module_meta(cfg)
        save_module(out_dir / "motion_projector.safetensors", unwrapped.projector, "motion_projector", meta)
        save_module(out_dir / "flow_decoder.safetensors", unwrapped.decoder, "flow_decoder", meta)
        write_json(out_dir / "metrics.json", metrics)
        plot_curves(
            out_dir / "loss_curve.png",
            {
                "train L1 (decoder px)": (steps_l1, l1),
                "train EPE (decoder px)": log.series("train_epe"),
                "val EPE (video px)": log.series("val_epe"),
            },
            title="stage 1: motion subspace, flow supervision",
            ylabel="flow error (px)",
            hlines={f"zero-flow EPE (video px) {zero_epe:.3f}": zero_epe},
        )
    accelerator.wait_for_everyone()
    logger.info(
        f"[stage1] done: val_epe {val_epe:.4f} px vs zero-flow {zero_epe:.4f} px "
        f"(ratio {epe_ratio_text(metrics)}); wrote {out_dir}"
    )
    return metrics
