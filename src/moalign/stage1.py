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

import torch
from torch import nn
from tqdm.auto import tqdm

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
from moalign.run.atomic import write_json
from moalign.run.checkpoint import (
    check_resume_config,
    finished_run,
    load_module_file,
    resolve_resume,
    restore_training_state,
    save_module,
    save_training_checkpoint,
    training_state,
    write_run_config,
)
from moalign.run.launch import prepare_training, reduce_scalars, start_launch
from moalign.run.plots import plot_curves
from moalign.run.serialize import to_dict
from moalign.run.training import (
    RunLogger,
    batch_indices,
    check_finite,
    check_report_to,
    cosine_with_warmup,
    format_parameter_counts,
    parameter_counts,
)


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
    mixed_precision: str = "no"
    report_to: str = "tensorboard"  # also log to RUN/tensorboard/ ("none": RUN/log.jsonl only)

    def __post_init__(self) -> None:
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
    done_metrics = finished_run(out_dir, resume, "stage-1", cfg.steps)
    if done_metrics is not None:
        return done_metrics
    accelerator, micro, launch = start_launch("stage1", cfg.mixed_precision, cfg.batch_size)
    device = accelerator.device
    set_seed(cfg.seed)

    # float32 weights whatever the checkpoint stores (converted ViTs are often fp16, slow and lossy on CPU);
    # mixed precision, when asked for, comes from accelerate's autocast
    encoder = VideoEncoder.from_pretrained(cfg.encoder, torch_dtype=torch.float32).to(device)
    cfg = replace(
        cfg, projector=replace(cfg.projector, in_dim=encoder.width)
    )  # resolved: recorded in the run
    dataset = VideoClipDataset(data_dir, cfg.data, load_flow=flow_cache is None)
    flow_source = make_flow_source(cfg, dataset, flow_cache)
    n = len(dataset)
    if n <= cfg.val_clips + 1:
        raise MoalignError(
            f"{data_dir} has {n} usable clips; stage 1 holds out val_clips={cfg.val_clips}: add clips"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    val_ids, train_ids = perm[: cfg.val_clips].tolist(), perm[cfg.val_clips :].tolist()

    grid = encoder.grid(cfg.data.num_frames)
    projector = MotionProjector(cfg.projector)
    try:
        decoder = FlowDecoder(
            cfg.decoder, patch_size=encoder.patch_size, pairs_per_tubelet=encoder.tubelet_size
        )
    except ValueError as err:
        raise MoalignError(str(err)) from err
    flow_size = decoder.output_size(grid[1:])
    heads = Stage1Heads(projector, decoder)
    counts = parameter_counts(encoder=encoder, motion_projector=projector, flow_decoder=decoder)
    assert counts["encoder"][0] == 0, "the encoder must be frozen"
    accelerator.print(
        f"[stage1] encoder {cfg.encoder.path} block {encoder.layer_index} (0-based) of {encoder.num_layers}, "
        f"token grid {grid}, width {encoder.width}; flow targets {getattr(flow_source, 'name', 'cache')} at "
        f"{flow_size[0]}x{flow_size[1]}; {len(train_ids)} train / {len(val_ids)} val clips\n"
        f"[stage1] {format_parameter_counts(counts)}"
    )

    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    start_step = 0
    ckpt = resolve_resume(out_dir, resume)
    if ckpt is not None:
        check_resume_config(out_dir, to_dict(cfg))
        heads.projector.load_state_dict(
            load_module_file(ckpt / "motion_projector.safetensors", "motion_projector")[0]
        )
        heads.decoder.load_state_dict(load_module_file(ckpt / "flow_decoder.safetensors", "flow_decoder")[0])
        start_step = restore_training_state(ckpt, optimizer, scheduler)
        accelerator.print(f"[stage1] resumed from {ckpt} at step {start_step}")
    # the LR schedule stays ours: one step per global step
    heads, optimizer, params = prepare_training(
        accelerator, heads, optimizer, micro_batch=micro, grad_clip=cfg.grad_clip
    )

    prep = ClipPreparer(dataset, encoder, flow_source, flow_size, device, memo=cfg.feature_cache == "memory")
    if cfg.feature_cache == "memory":
        for i in tqdm(range(n), desc="encode clips (frozen)", disable=not progress):
            prep(i, full_flow=i in val_ids)

    if ckpt is None:  # the input standardisation is fixed once, from training features; resumed runs load it
        sample_ids = train_ids[: cfg.stats_clips]
        stats_tokens = torch.stack([prep(i)["tokens"] for i in sample_ids])  # (n, F'', H'', W'', D_v)
        accelerator.unwrap_model(heads).projector.set_feature_stats(stats_tokens)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(out_dir, to_dict(cfg), command, launch=launch)
    logger = RunLogger(
        out_dir, enabled=accelerator.is_main_process, resume_from_step=start_step - 1, report_to=cfg.report_to
    )
    module_meta = {
        "stage1": to_dict(cfg),
        "projector": to_dict(cfg.projector),
        "decoder": to_dict(cfg.decoder),
    }

    def save_final_modules() -> None:
        unwrapped = accelerator.unwrap_model(heads)
        save_module(
            out_dir / "motion_projector.safetensors", unwrapped.projector, "motion_projector", module_meta
        )
        save_module(out_dir / "flow_decoder.safetensors", unwrapped.decoder, "flow_decoder", module_meta)

    @torch.no_grad()
    def validate() -> tuple[float, float]:
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

    t0 = time.time()
    seen = 0  # clips this process trained on in this launch: its share of every global batch
    heads.train()
    bar = tqdm(
        range(start_step, cfg.steps), desc="stage1", disable=not (progress and accelerator.is_main_process)
    )
    for step in bar:
        idx = batch_indices(len(train_ids), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes].tolist()
        seen += len(idx)
        items = [prep(train_ids[j]) for j in idx]
        tokens = torch.stack([it["tokens"] for it in items]).to(device)  # (b, F'', H'', W'', D_v)
        target = torch.stack([it["flow"] for it in items]).to(device)  # (b, T-1, h, w, 2)
        with accelerator.autocast():
            _, pred = heads(tokens)
        parts = flow_loss(pred, target, kind=cfg.flow_loss, huber_delta=cfg.huber_delta)
        check_finite(step, parts)
        accelerator.backward(parts.total)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if step % cfg.log_every == 0 or done == cfg.steps:
            scalars = reduce_scalars(accelerator, parts.scalars())  # the global batch's mean
            logger.log(step, **{f"train_{k}": v for k, v in scalars.items()}, lr=scheduler.get_last_lr()[0])
            bar.set_postfix(l1=f"{scalars['l1']:.3f}", epe=f"{scalars['epe']:.3f}")
        if done % cfg.val_every == 0 or done == cfg.steps:
            val_epe, zero_epe = validate()
            logger.log(step, val_epe=val_epe, zero_flow_epe=zero_epe)
            accelerator.print(f"[stage1] step {done}: val_epe {val_epe:.4f} px (zero flow {zero_epe:.4f} px)")
        if done % cfg.checkpoint_every == 0 and done < cfg.steps and accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(heads)
            save_training_checkpoint(
                out_dir,
                done,
                {
                    "motion_projector": (unwrapped.projector, "motion_projector", module_meta),
                    "flow_decoder": (unwrapped.decoder, "flow_decoder", module_meta),
                },
                training_state(optimizer, scheduler),
                limit=2,
            )

    val_epe, zero_epe = validate()
    logger.close()
    steps_l1, l1 = logger.series("train_l1")
    metrics = {
        "val_epe": val_epe,
        "zero_flow_epe": zero_epe,
        "val_epe_ratio": val_epe / max(zero_epe, 1e-12),
        "final_train_l1": l1[-1] if l1 else None,
        "steps": cfg.steps,
        "train_seconds": round(time.time() - t0, 1),
        "val_clips": len(val_ids),
        "train_clips": len(train_ids),
        "num_processes": accelerator.num_processes,
        "engine": launch["engine"],
        "clips_per_process": accelerator.gather(torch.tensor([seen], device=device)).tolist(),
        "flow_resolution": list(flow_size),
        "token_grid": list(grid),
    }
    if accelerator.is_main_process:
        save_final_modules()
        write_json(out_dir / "metrics.json", metrics)
        vs, ve = logger.series("val_epe")
        plot_curves(
            out_dir / "loss_curve.png",
            {
                "train L1 (decoder px)": (steps_l1, l1),
                "train EPE (decoder px)": logger.series("train_epe"),
                "val EPE (video px)": (vs, ve),
            },
            title="stage 1: motion subspace, flow supervision",
            ylabel="flow error (px)",
            hlines={f"zero-flow EPE (video px) {zero_epe:.3f}": zero_epe},
        )
    accelerator.wait_for_everyone()
    accelerator.print(
        f"[stage1] done: val_epe {val_epe:.4f} px vs zero-flow {zero_epe:.4f} px "
        f"(ratio {metrics['val_epe_ratio']:.2f}); wrote {out_dir}"
    )
    return metrics
