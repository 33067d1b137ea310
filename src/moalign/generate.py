"""`moalign generate`: videos from a fine-tuned (or base) model through the family's diffusers pipeline.

`--model` is a stage-2 run folder (its config names the base pipeline; a LoRA is loaded with
`load_lora_weights`, a full fine-tune's transformer/ replaces the pipeline's) or a plain diffusers pipeline
folder. Each prompt gets its own seeded generator (seed + prompt index), so a run is reproducible and the
arms of a comparison see the same noise. Writes DIR/video_#####.mp4, DIR/metadata.jsonl (the playground's
manifest format: video, caption, seed, model, geometry and sampler settings; `moalign judge` reads it) and DIR/contact_sheet.png. The clip geometry
and sampler settings are a `GenerateConfig`, a field of every recipe (src/moalign/presets.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moalign.data.video_io import write_video
from moalign.errors import MoalignError, loading
from moalign.run.atomic import atomic_path, write_jsonl

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GenerateConfig:
    """Clip geometry and sampler settings of `moalign generate`; the fields are `generate()`'s keywords.

    The defaults are CogVideoX's (49 frames at 480x720, 50 steps, guidance 6, 8 fps); each preset sets its
    model's own (src/moalign/presets.py).
    """

    num_frames: int = 49  # 4k+1, what the video VAEs decode
    height: int = 480
    width: int = 720
    steps: int = 50  # sampling steps
    guidance_scale: float = 6.0  # classifier-free guidance (1.0: none)
    fps: float = 8.0  # frame rate written to the mp4s
    seed: int = 0  # video i uses seed + i

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.fps < float("inf"):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if not abs(self.guidance_scale) < float("inf"):  # NaN or inf: every video would be NaN
            raise ValueError(
                f"guidance_scale must be a finite number (1.0: no guidance), got {self.guidance_scale}"
            )


def family(pipeline_class_name: str) -> str:
    """The backbone family (a `moalign.backbones.BACKBONES` key) of a diffusers pipeline class name: the family
    whose pipeline class shares its prefix (WanPipeline -> wan, CogVideoXPipeline -> cogvideox); cogvideox when
    none does."""
    from moalign.backbones import BACKBONES

    for key, make in BACKBONES.items():
        prefix = make().pipeline_class.__name__.removesuffix("Pipeline")
        if pipeline_class_name.startswith(prefix):
            return key
    return "cogvideox"


def pipeline_family(model: str | os.PathLike | None, backbone: str | None = None) -> str | None:
    """The backbone family of a local pipeline folder, from its model_index.json (None: no such folder, e.g. a
    hub id); a given `backbone` that contradicts the folder is a user error naming both."""
    index = Path(model) / "model_index.json" if model is not None else None
    if index is None or not index.is_file():
        return backbone
    class_name = json.loads(index.read_text()).get("_class_name", "")
    found = family(class_name)
    if backbone is not None and backbone != found:
        raise MoalignError(
            f"--backbone {backbone}, but {model} is a {class_name} ({found}): drop --backbone, or pass a {backbone} "
            "pipeline"
        )
    return found


_NOT_TRANSFORMER = ("text_encoder", "tokenizer", "vae")  # pipeline components a probe does not need


def load_pipeline(
    model: str | os.PathLike,
    backbone: str | None = None,
    base: str | None = None,
    torch_dtype: torch.dtype | None = None,
    transformer_only: bool = False,
):
    """A ready pipeline from a stage-2 run folder or a diffusers pipeline folder / hub id.

    Args:
        model: a stage-2 run folder, or a pipeline folder / hub id.
        backbone: family of a plain pipeline (default: from its model_index.json).
        base: the base pipeline of a run (default: the run config's `model`).
        transformer_only: skip the text encoder, tokenizer and VAE (None in the pipeline): for probing the
            transformer, with a run's LoRA loaded the same way.

    Returns:
        (pipeline, backbone spec).
    """
    from moalign.backbones import get_backbone  # torch: imported when a command runs, not for --help
    from moalign.backbones.spec import dtype_kwargs

    path = Path(model)
    kw = {**dtype_kwargs(torch_dtype), **(dict.fromkeys(_NOT_TRANSFORMER) if transformer_only else {})}
    run_cfg = path / "config.json"
    cfg = json.loads(run_cfg.read_text()).get("config") if run_cfg.is_file() else None
    if isinstance(cfg, dict) and "align" in cfg and "backbone" in cfg:  # a stage-2 run folder
        spec = get_backbone(cfg["backbone"])
        base = base or cfg.get("model")
        if base is None:
            raise MoalignError(
                f"{run_cfg} names no base pipeline (its model is null): pass the base pipeline folder with --base"
            )
        with loading(f"the base {spec.pipeline_class.__name__} of {path}", base):
            pipe = spec.pipeline_class.from_pretrained(base, **kw)
        if (path / "pytorch_lora_weights.safetensors").is_file():
            pipe.load_lora_weights(path)
        elif (path / "transformer" / "config.json").is_file():
            pipe.transformer = spec.load_transformer(str(path / "transformer"), torch_dtype=torch_dtype)
        else:
            raise MoalignError(
                f"{path} has neither pytorch_lora_weights.safetensors nor transformer/: unfinished run?"
            )
        return pipe, spec
    if backbone is None:
        index = path / "model_index.json"
        backbone = family(json.loads(index.read_text()).get("_class_name", "") if index.is_file() else "")
    spec = get_backbone(backbone)
    with loading(f"the {spec.pipeline_class.__name__}", model):
        return spec.pipeline_class.from_pretrained(str(model), **kw), spec


def folder_geometry_configs(
    model: str | os.PathLike | None, backbone: str | None = None, base: str | None = None
) -> tuple[str | None, dict | None, dict | None]:
    """(family, transformer config, VAE config) of a stage-2 run folder or a pipeline folder, read from their JSON
    files without loading weights, for checking a clip geometry before the (slow) load; the family is None
    when neither the folder nor `backbone` tells it (a hub id without --backbone), a config None when no local
    file holds it."""
    from moalign.backbones.spec import folder_config

    if model is None:
        return backbone, None, None
    path = Path(model)
    run_cfg = path / "config.json"
    try:
        cfg = json.loads(run_cfg.read_text()).get("config") if run_cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        cfg = None
    if isinstance(cfg, dict) and "align" in cfg and "backbone" in cfg:  # a stage-2 run folder
        base = base or cfg.get("model")
        transformer = folder_config(path, "transformer") or folder_config(base, "transformer")
        return backbone or cfg["backbone"], transformer, folder_config(base, "vae")
    try:
        found = pipeline_family(model, backbone)
    except (OSError, ValueError):
        found = backbone  # an unreadable model_index.json: loading says what is wrong with it
    return found, folder_config(path, "transformer"), folder_config(path, "vae")


def check_finite_frames(frames: np.ndarray, index: int, prompt: str, dtype: str) -> None:
    """Stop with a MoalignError naming the prompt when a decoded video holds NaN or infinite values (they would
    be written as black or garbage frames)."""
    bad = ~np.isfinite(frames)
    if bad.any():
        raise MoalignError(
            nonfinite_message(
                f"the video of prompt {index} ({prompt!r})", f"{bad.mean():.0%} of its pixel values", dtype
            )
        )


def nonfinite_message(what: str, where: str, dtype: str) -> str:
    """The message for non-finite sampling output: 16-bit overflow is the usual cause, else the weights."""
    if dtype in ("float16", "bfloat16"):
        fix = (
            "float16 overflows in these models: generate with --dtype bfloat16 (float32's range) or float32"
            if dtype == "float16"
            else "generate with --dtype float32"
        )
    else:
        fix = "the model's weights hold NaN/inf or its activations overflow even in float32: check the model (a diverged run?)"
    return f"{what} is not finite ({where} are NaN or inf) in {dtype}: {fix}; nothing of it was written"


def contact_sheet(videos: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """One row per video, `columns` evenly spaced frames: list of uint8 (T, H, W, 3) -> uint8 image."""
    rows = []
    for frames in videos:
        idx = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in idx], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def generate(
    model: str | os.PathLike,
    prompts: list[str],
    out_dir: str | os.PathLike,
    *,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    steps: int = 25,
    guidance_scale: float = 6.0,
    seed: int = 0,
    fps: float = 8.0,
    backbone: str | None = None,
    base: str | None = None,
    pipeline: Any = None,
    device: str = "cpu",
    dtype: str = "auto",
    vae_tiling: bool = False,
    cpu_offload: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Generate one video per prompt; returns the manifest rows.

    Args:
        model: stage-2 run folder or pipeline folder / hub id (ignored when `pipeline` is given).
        prompts: one caption per video.
        out_dir: output folder (mp4s, metadata.jsonl, contact_sheet.png).
        num_frames, height, width: the clip geometry (4k+1 frames; sizes divisible by 16 for CogVideoX and
            Wan2.1: `BackboneSpec.geometry_rule`).
        steps, guidance_scale: sampler settings.
        seed: video i uses seed + i.
        dtype: weights' dtype when the pipeline is loaded here: "auto" (bfloat16 on CUDA, float32 on CPU),
            "float32", "bfloat16" or "float16" (16 bit on a GPU: half the memory, several times faster).
        vae_tiling: decode in spatial tiles (the VAE's `enable_tiling`; less memory at 480p).
        cpu_offload: keep each model (text encoder, transformer, VAE) on the CPU until the pipeline calls it
            (diffusers' `enable_model_cpu_offload`): peak GPU memory is the largest model instead of all of them,
            a little slower; CUDA only.

    Raises:
        MoalignError: no prompts; cpu_offload on a CPU device; a geometry the family's VAE and transformer do not
            take (checked before loading when the folder or `backbone` names the family, naming the flag and the
            nearest valid values); a model that does not load; a video whose latents or pixels are not finite
            (naming the prompt and the --dtype to use; its mp4 is not written and no metadata.jsonl is).
    """
    import torch
    from PIL import Image

    if not prompts:
        raise MoalignError("no prompts to generate: the prompts file is empty")
    if cpu_offload and not str(device).startswith("cuda"):
        raise MoalignError(
            f"--cpu-offload keeps models on the CPU and moves each to the GPU when it runs: it needs a CUDA device "
            f"(--device cuda), not {device}"
        )
    geometry = (num_frames, height, width)
    pipeline, dtype, text_length = _ready_pipeline(
        model, pipeline, geometry, backbone=backbone, base=base, device=device, dtype=dtype,
        vae_tiling=vae_tiling, cpu_offload=cpu_offload, progress=progress,
    )  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, videos = [], []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        result = pipeline(
            prompt=prompt,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=text_length,
            generator=gen,
            output_type="np",
            callback_on_step_end=_finite_latents(i, prompt, dtype),
            callback_on_step_end_tensor_inputs=["latents"],
        )
        check_finite_frames(np.asarray(result.frames[0]), i, prompt, dtype)
        frames = (
            (np.clip(np.asarray(result.frames[0]), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        )  # (T, H, W, 3)
        name = f"video_{i:05d}.mp4"
        write_video(out_dir / name, frames, fps=fps)
        rows.append({
            "video": name, "caption": prompt, "seed": seed + i, "model": None if model is None else model_id(model),
            "num_frames": num_frames, "height": height, "width": width, "steps": steps,
            "guidance_scale": guidance_scale,
        })  # fmt: skip
        videos.append(frames)
    write_jsonl(out_dir / "metadata.jsonl", rows)
    with atomic_path(out_dir / "contact_sheet.png") as tmp:
        Image.fromarray(contact_sheet(videos)).save(tmp, format="PNG")
    return rows


def _ready_pipeline(
    model, pipeline, geometry, *, backbone, base, device, dtype, vae_tiling, cpu_offload, progress
) -> tuple[Any, str, int]:
    """`generate`'s set-up: the pipeline loaded (unless given) in `dtype`, the geometry checked against the
    family (before loading when the folder names it, and with the loaded parts' configs), placed on `device`.

    Returns:
        (pipeline, the dtype it runs in, the prompt length to pad to).
    """
    from moalign.backbones import get_backbone
    from moalign.backbones.spec import parse_dtype

    dtype = auto_dtype(dtype, device)
    torch_dtype = parse_dtype(dtype)
    if pipeline is None:
        known, transformer_config, vae_config = folder_geometry_configs(model, backbone, base)
        if known is not None:  # before the load: a wrong geometry costs no minutes of loading
            get_backbone(known).check_geometry(
                *geometry, what="generate", transformer_config=transformer_config, vae_config=vae_config
            )
        pipeline, spec = load_pipeline(model, backbone, base, torch_dtype=torch_dtype)
    else:
        spec = get_backbone(backbone or family(type(pipeline).__name__))
        dtype = str(pipeline.transformer.dtype).removeprefix("torch.")  # what it runs in, for messages
    spec.check_geometry(  # the loaded parts' own configs (a hub id's are known only now)
        *geometry,
        what="generate",
        transformer_config=pipeline.transformer.config,
        vae_config=pipeline.vae.config,
    )
    # prompts padded as in training (`moalign latents`): CogVideoX without RoPE needs max_text_seq_length
    text_length = spec.text_length(pipeline.transformer.config)
    if cpu_offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    if vae_tiling:
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=not progress)
    return pipeline, dtype, text_length


def _finite_latents(index: int, prompt: str, dtype: str):
    """A pipeline step callback that stops at the first sampling step whose latents are not finite (the rest of
    the steps, and the decode, would be wasted)."""
    import torch

    def check(pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        if not torch.isfinite(latents).all():
            share = (~torch.isfinite(latents)).float().mean().item()
            raise MoalignError(
                nonfinite_message(
                    f"the video of prompt {index} ({prompt!r})",
                    f"after sampling step {step + 1}, {share:.0%} of its latents",
                    dtype,
                )
            )
        return {}

    return check


def model_id(model: str | os.PathLike) -> str:
    """How a run, cache or manifest records a model: a local folder as an absolute path (named from any working
    directory), a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def auto_dtype(dtype: str, device: str) -> str:
    """`dtype`, with "auto" resolved for `device`: "bfloat16" on CUDA (what the released models run in), else
    "float32" (CPUs are slow and inexact in 16 bit)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a prompts file (UTF-8, a byte-order mark dropped, lines ended by LF, CRLF or CR only:
    `moalign.data.manifest.text_lines`)."""
    from moalign.data.manifest import text_lines

    p = Path(path)
    if not p.is_file():
        raise MoalignError(f"prompts file not found: {p}")
    return [line.strip() for line in text_lines(p) if line.strip()]
