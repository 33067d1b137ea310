"""`moalign targets`: precompute the stage-2 teacher targets of every clip into a cache.

After stage 1 the teacher is fixed, so per clip the motion tokens M = M_psi(V(x)) (and, for the ablation
arms, the raw encoder tokens S = V(x)) can be computed once. The stage-2 loop then reads them from the
cache and needs neither the encoder nor the raw frames (SPEC Sec. 3 and 6). Item i of the cache holds
"motion" (F'', H'', W'', D_m) and, with `raw=True`, "encoder" (F'', H'', W'', D_v), both in float16 by
default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moalign.cache import Cache, CacheWriter, dataset_identity, file_digest, fill_cache
from moalign.checkpoint import load_motion_teacher
from moalign.config import to_dict
from moalign.data import VideoClipDataset
from moalign.encoder import VideoEncoder

TARGETS_KIND = "teacher_targets"


def compute_targets(
    data_dir: str | os.PathLike,
    teacher_run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    raw: bool = False,
    dtype: torch.dtype = torch.float16,
    shard_size: int = 64,
    overwrite: bool = False,
    skip_bad_videos: bool = False,
    progress: bool = True,
    device: str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Encode every clip with the frozen encoder and M_psi of a stage-1 run into a resumable cache.

    Args:
        data_dir: the stage-2 dataset; clips are sampled with the teacher's own data config, so the targets
            line up with what M_psi was trained on.
        teacher_run: a stage-1 run folder (or its motion_projector.safetensors).
        out: cache folder (resumable: re-run the same command after a stop).
        raw: also store the raw encoder tokens (for the REPA / TRD ablation arms).
        dtype: storage dtype.

    Returns:
        The cache folder; open it with `load_targets`.
    """
    from dataclasses import replace

    teacher = load_motion_teacher(teacher_run)
    data_cfg = replace(teacher.data, skip_bad_videos=skip_bad_videos)
    dataset = VideoClipDataset(data_dir, data_cfg, load_flow=False)
    encoder = VideoEncoder.from_pretrained(teacher.encoder, torch_dtype=torch.float32).to(device)
    projector = teacher.projector.to(device)
    fingerprint = {
        "teacher_sha256": file_digest(teacher.source),
        "encoder": to_dict(teacher.encoder),
        "raw": raw,
        "dtype": str(dtype).removeprefix("torch."),
        **dataset_identity(dataset),
    }
    writer = CacheWriter(
        out, TARGETS_KIND, fingerprint, len(dataset), shard_size=shard_size, overwrite=overwrite
    )

    @torch.no_grad()
    def compute(sample: dict) -> dict[str, torch.Tensor]:
        tokens = encoder.encode(sample["frames"][None].to(device))  # (1, F'', H'', W'', D_v)
        item = {"motion": projector(tokens)[0].to(dtype).cpu()}  # (F'', H'', W'', D_m)
        if raw:
            item["encoder"] = tokens[0].to(dtype).cpu()
        return item

    return fill_cache(
        writer, dataset, compute, desc="teacher targets", progress=progress, rank=rank, world_size=world_size
    )


def load_targets(path: str | os.PathLike) -> Cache:
    """Open a complete targets cache: ``cache[i]["motion"]`` (F'', H'', W'', D_m), optionally "encoder"."""
    return Cache(path, kind=TARGETS_KIND)
