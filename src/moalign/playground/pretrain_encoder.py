"""`moalign pretrain-encoder`: masked-autoencoder pretraining of a small VideoMAE on a dataset.

The playground has no pretrained video encoder, so stage 1 there starts from one trained here with the
VideoMAE objective (transformers' `VideoMAEForPreTraining`: tube masking, normalised-pixel MSE on the masked
patches), then frozen. The output folder holds a `VideoMAEModel` that `VideoMAEModel.from_pretrained(ENC)` and
`moalign stage1 --encoder ENC` load, exactly like a converted VideoMAEv2 checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moalign.data.dataset import VideoClipDataset
from moalign.data.sampling import DataConfig
from moalign.encoder import EncoderConfig, preprocess_frames
from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.atomic import atomic_path, write_json, write_jsonl
from moalign.run.checkpoint import write_run_config
from moalign.run.checks import check_training_fields
from moalign.run.launch import prepare_training, reduce_scalars, start_launch
from moalign.run.plots import plot_curves
from moalign.run.serialize import to_dict
from moalign.run.training import RunLogger, batch_indices, check_finite, cosine_with_warmup, optimizer_step

logger = console.get_logger(__name__)


@dataclass(frozen=True)
class MAEModelConfig:
    """Architecture of a VideoMAE trained from scratch by `moalign pretrain-encoder` (transformers VideoMAEConfig)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 8
    tubelet_size: int = 2
    decoder_hidden_size: int = 96
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 384
    layer_norm_eps: float = 1e-6  # VideoMAEv2's value, so trained and converted encoders behave alike
    # VideoMAE normalises each target patch by its own mean/std. On the playground most patches are flat
    # colour, whose normalised targets are amplified compression noise, so the default predicts plain pixels.
    norm_pix_loss: bool = False


@dataclass(frozen=True)
class PretrainEncoderConfig:
    """Masked-autoencoder pretraining of a small VideoMAE on a dataset (the playground has no pretrained encoder)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    input_size: tuple[int, int] = (64, 64)  # encoder input (H, W); frames are resized to it
    mask_ratio: float = 0.75  # tube masking (VideoMAE): the same spatial patches are hidden in every tubelet
    steps: int = 600
    batch_size: int = 8
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    hflip: bool = True  # random horizontal flips (appearance pretraining; flow is not involved here)
    seed: int = 0
    log_every: int = 25
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16", applied by accelerate

    def __post_init__(self) -> None:
        check_training_fields(self)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


def build_videomae_config(cfg: PretrainEncoderConfig, num_frames: int):
    """The transformers VideoMAEConfig of the encoder to pretrain (input geometry = the pretraining grid)."""
    from transformers import VideoMAEConfig

    m = cfg.model
    h, w = cfg.input_size
    return VideoMAEConfig(
        image_size=h if h == w else [h, w],
        patch_size=m.patch_size,
        num_channels=3,
        num_frames=num_frames,
        tubelet_size=m.tubelet_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=m.layer_norm_eps,
        use_mean_pooling=True,  # no final norm in VideoMAEModel: its output is the last block, pre-norm
        decoder_hidden_size=m.decoder_hidden_size,
        decoder_num_hidden_layers=m.decoder_num_hidden_layers,
        decoder_num_attention_heads=m.decoder_num_attention_heads,
        decoder_intermediate_size=m.decoder_intermediate_size,
        norm_pix_loss=m.norm_pix_loss,
    )


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float, gen: torch.Generator) -> torch.Tensor:
    """VideoMAE tube masking: (B, F*H*W) bool, True = masked; the same spatial patches in every tubelet."""
    f, h, w = grid
    num_masked = int(round(ratio * h * w))
    scores = torch.rand(batch, h * w, generator=gen)
    masked_spatial = scores.argsort(dim=1)[:, :num_masked]  # (B, M)
    spatial = torch.zeros(batch, h * w, dtype=torch.bool)
    spatial.scatter_(1, masked_spatial, True)
    return (
        spatial[:, None, :].expand(batch, f, h * w).reshape(batch, f * h * w)
    )  # frame-major, like the tokens


def _decode_clips(
    dataset: VideoClipDataset, enc_cfg: EncoderConfig, progress: bool
) -> tuple[torch.Tensor, float]:
    """Every clip decoded and preprocessed once: (N, T', 3, h, w) normalised pixels (pretraining is for small
    sets), and the MSE of predicting one constant colour per channel (the data's mean) in [0, 1] pixels."""
    clips = [
        preprocess_frames(dataset[i]["frames"][None], enc_cfg)[0]
        for i in console.progress(range(len(dataset)), enabled=progress, desc="decode clips")
    ]
    pixels = torch.stack(clips)
    mean = torch.tensor(enc_cfg.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(enc_cfg.std).view(1, 1, 3, 1, 1)
    raw = pixels * std + mean
    return pixels, float((raw - raw.mean(dim=(0, 1, 3, 4), keepdim=True)).square().mean())


def _token_grid(cfg: PretrainEncoderConfig, pixels: torch.Tensor) -> tuple[int, int, int]:
    num_frames, _, h, w = pixels.shape[1:]
    if num_frames % cfg.model.tubelet_size or h % cfg.model.patch_size or w % cfg.model.patch_size:
        raise MoalignError(
            f"encoder input {num_frames}x{h}x{w} does not divide into tubelet {cfg.model.tubelet_size} and "
            f"patch {cfg.model.patch_size}: choose --set input_size / data.num_frames accordingly"
        )
    return num_frames // cfg.model.tubelet_size, h // cfg.model.patch_size, w // cfg.model.patch_size


def pretrain_encoder(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: PretrainEncoderConfig,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Pretrain a VideoMAE with the masked-autoencoding objective and save it as a `VideoMAEModel` folder.

    Args:
        data_dir: a dataset folder (playground output, metadata.jsonl/csv, or prompts.txt + videos.txt).
        out_dir: the encoder folder to write (atomically; an existing folder is refused). Besides the model
            (config.json, model.safetensors) it holds run_config.json (the run record every stage writes, named
            so because config.json is the model's), metrics.json, log.jsonl and loss_curve.png.
        cfg: the resolved config.

    Returns:
        metrics: first and final reconstruction MSE on the masked patches (pixels in [0, 1], or per-patch
        normalised pixels with norm_pix_loss), the MSE of one constant colour for reference, steps, seconds.
    """
    from accelerate.utils import set_seed
    from transformers import VideoMAEForPreTraining

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise MoalignError(f"{out_dir} already holds an encoder; choose a new --out or delete it first")
    accelerator, micro, launch = start_launch("pretrain-encoder", cfg.mixed_precision, cfg.batch_size)
    set_seed(cfg.seed)
    dataset = VideoClipDataset(data_dir, cfg.data, load_flow=False)
    pixels, constant_mse = _decode_clips(
        dataset, EncoderConfig(input_size=cfg.input_size, drop_first_frame=True), progress
    )
    grid = _token_grid(cfg, pixels)
    model = VideoMAEForPreTraining(build_videomae_config(cfg, pixels.shape[1]))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    model, optimizer, params = prepare_training(
        accelerator, model, optimizer, micro_batch=micro, grad_clip=cfg.grad_clip
    )
    log = RunLogger(out_dir, enabled=False)  # written into the folder at the end, atomically
    mask_gen = torch.Generator().manual_seed(cfg.seed + 17 * accelerator.process_index)
    flip_gen = torch.Generator().manual_seed(cfg.seed + 31 * accelerator.process_index)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"[pretrain-encoder] {len(dataset)} clips, input {'x'.join(map(str, (pixels.shape[1], *pixels.shape[3:])))}, "
        f"token grid {grid}, {n_params:,} parameters (encoder + MAE decoder), {cfg.steps} steps"
    )

    model.train()
    start = time.time()
    bar = console.progress(range(cfg.steps), enabled=progress, desc="pretrain-encoder")
    for step in bar:
        idx = batch_indices(len(dataset), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]
        batch = pixels[idx]  # (b, T', 3, h, w)
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=flip_gen) < 0.5
            batch = torch.where(flip[:, None, None, None, None], batch.flip(-1), batch)
        mask = tube_mask(len(idx), grid, cfg.mask_ratio, mask_gen)
        with accelerator.autocast():
            loss = model(
                pixel_values=batch.to(accelerator.device), bool_masked_pos=mask.to(accelerator.device)
            ).loss
        check_finite(step, {"mse": loss})
        accelerator.backward(loss)
        optimizer_step(accelerator, optimizer, scheduler, params, cfg.grad_clip)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            scalars = reduce_scalars(accelerator, {"mse": float(loss.detach())})  # the global batch's mean
            log.log(step, **scalars, lr=scheduler.get_last_lr()[0])
            bar.set_postfix(mse=f"{scalars['mse']:.3f}")

    steps, mse = log.series("mse")
    metrics = {
        "first_mse": mse[0],
        "final_mse": sum(mse[-4:]) / len(mse[-4:]),
        "constant_colour_mse": constant_mse if not cfg.model.norm_pix_loss else 1.0,
        "steps": cfg.steps,
        "seconds": round(time.time() - start, 1),
        "token_grid": list(grid),
    }
    if accelerator.is_main_process:
        _write_encoder(out_dir, accelerator.unwrap_model(model), cfg, metrics, log, command, launch, data_dir)
    accelerator.wait_for_everyone()
    logger.info(f"[pretrain-encoder] wrote {out_dir}: final MSE {metrics['final_mse']:.3f}")
    return metrics


def _write_encoder(out_dir: Path, model, cfg: PretrainEncoderConfig, metrics, log, command, launch, data_dir):
    """The encoder folder, atomically: VideoMAEModel weights and config, run record, metrics, log, loss curve."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.videomae.save_pretrained(tmp, safe_serialization=True)
        write_run_config(tmp, to_dict(cfg), command, launch=launch, name="run_config.json")
        write_json(tmp / "metrics.json", metrics)
        write_jsonl(tmp / "log.jsonl", log.history)
        reference = "constant colour" if not cfg.model.norm_pix_loss else "patch mean"
        plot_curves(
            tmp / "loss_curve.png",
            {"masked-patch MSE (normalised pixels)": log.series("mse")},
            title="VideoMAE pretraining on " + Path(data_dir).name,
            ylabel="MSE",
            hlines={reference: metrics["constant_colour_mse"]},
        )
