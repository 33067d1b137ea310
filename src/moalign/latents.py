"""`moalign latents`: VAE latents and prompt embeddings of every clip into a cache, for stage 2.

Stage 2 then trains without the VAE or the text encoder in memory. Latents are the VAE posterior mean in the
family's layout and scaling (deterministic, so a resumed cache equals an uninterrupted one); prompt
embeddings come from the pipeline's own `encode_prompt` at the family's sequence length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moalign.backbones import get_backbone
from moalign.backbones.spec import dtype_kwargs, folder_config
from moalign.data.cache import dataset_identity
from moalign.data.cache_writer import CacheWriter, fill_cache
from moalign.data.dataset import VideoClipDataset
from moalign.data.sampling import DataConfig
from moalign.errors import loading
from moalign.generate import model_id
from moalign.run.digest import model_digest

LATENTS_KIND = "latents"


def _transformer_config(pipeline: Any, model: str | None) -> dict | None:
    """The transformer's config: from the in-memory pipeline, else the pipeline folder's transformer/."""
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None:
        return dict(transformer.config)
    if model is not None and (Path(model) / "transformer" / "config.json").is_file():
        return json.loads((Path(model) / "transformer" / "config.json").read_text())
    return None


def compute_latents(
    data_dir: str | os.PathLike,
    model: str | None,
    out: str | os.PathLike,
    *,
    backbone: str,
    data: DataConfig,
    pipeline: Any = None,
    dtype: torch.dtype = torch.float32,
    vae_tiling: bool = False,
    shard_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Encode every clip (VAE) and caption (text encoder) of a dataset into a resumable cache.

    Args:
        data_dir: dataset folder; clips are sampled with `data` (use the geometry the model was trained on).
        model: diffusers pipeline folder or hub id (its transformer is not loaded); ignored when `pipeline`
            is given.
        out: cache folder; item i holds "latents" (family layout, without batch) and "prompt_embeds" (L, D).
        backbone: "cogvideox" or "wan".
        pipeline: an already built pipeline (the demo's tiny one).
        dtype: dtype of the VAE and text encoder (when loaded here) and of the stored tensors.
        vae_tiling: encode in overlapping spatial tiles (the VAE's `enable_tiling`): far less memory at 480p,
            slightly different latents (recorded in the fingerprint).

    Returns:
        The cache folder.

    Raises:
        MoalignError: `data`'s geometry does not fit the family's VAE and the transformer to be trained (checked
            before loading, with the folder's configs, and again with the loaded VAE's), naming the flag and the
            nearest valid values; a clip whose latents or prompt embeddings are not finite (16-bit overflow):
            `fill_cache` names the clip and tensor, `nonfinite_hint` the --dtype to use; that clip's shard is not
            written and the cache is not finalized.
    """
    spec = get_backbone(backbone)
    transformer_config = _transformer_config(pipeline, model)
    geometry = dict(what=f"latents of {data_dir}", transformer_config=transformer_config, training=True)
    clip = (data.num_frames, data.height, data.width)
    if pipeline is None:
        spec.check_geometry(*clip, vae_config=folder_config(model, "vae"), **geometry)  # before loading
        with loading(f"the {spec.pipeline_class.__name__}", model):
            pipeline = spec.pipeline_class.from_pretrained(model, transformer=None, **dtype_kwargs(dtype))
    spec.check_geometry(*clip, vae_config=pipeline.vae.config, **geometry)
    pipeline.vae.to(device).eval()
    if vae_tiling:
        pipeline.vae.enable_tiling()
    pipeline.text_encoder.to(device).eval()
    dataset = VideoClipDataset(data_dir, data, load_flow=False)
    text_length = spec.text_length(_transformer_config(pipeline, model))
    fingerprint = {
        "backbone": backbone,
        "model": model_id(model) if model is not None else type(pipeline).__name__ + " (in memory)",
        "max_sequence_length": text_length,
        "dtype": str(dtype).removeprefix("torch."),
        "vae_tiling": vae_tiling,
        # the VAE's and text encoder's content: a cache resumed after either changed at the same path is refused
        "weights_sha256": model_digest(model, ("vae", "text_encoder")) if model is not None else None,
        **dataset_identity(dataset),
    }
    writer = CacheWriter(
        out, LATENTS_KIND, fingerprint, len(dataset), shard_size=shard_size, overwrite=overwrite
    )

    @torch.no_grad()
    def compute(sample: dict) -> dict[str, torch.Tensor]:
        latents = spec.encode_video(pipeline.vae, sample["frames"][None].to(device))[0]
        embeds, _ = pipeline.encode_prompt(
            sample["caption"],
            do_classifier_free_guidance=False,
            max_sequence_length=text_length,
            device=torch.device(device),
        )
        return {"latents": latents.to(dtype).cpu(), "prompt_embeds": embeds[0].to(dtype).cpu()}

    return fill_cache(
        writer, dataset, compute, desc="latents", progress=progress, rank=rank, world_size=world_size,
        nonfinite_hint=nonfinite_hint(dtype),
    )  # fmt: skip


def nonfinite_hint(dtype: torch.dtype) -> str:
    """What to change when a clip's latents or embeddings come out NaN/inf in `dtype` (fill_cache's check names
    the clip and tensor): float16 overflows in these VAEs and text encoders; in float32 it is the model."""
    redo = "; after changing --dtype, re-run with --overwrite (the cache records its dtype)"
    if dtype == torch.float16:
        return f"Encode with --dtype float32 (or bfloat16, whose range does not overflow){redo}."
    if dtype == torch.bfloat16:
        return f"Encode with --dtype float32{redo}."
    return "Check that clip's video and the pipeline's VAE and text encoder weights (NaN/inf in them?)."
