"""The stage-1 teacher for stage 2: `load_motion_teacher` (a stage-1 run as encoder + frozen M_psi) and
`compute_targets` (`moalign targets`: the teacher targets of every clip in a cache).

After stage 1 the teacher is fixed, so per clip the motion tokens M = M_psi(V(x)) (and, for the ablation
arms, the raw encoder tokens S = V(x)) can be computed once. The stage-2 loop then reads them from the
cache and needs neither the encoder nor the raw frames (our addition; docs/data.md). Item i of the cache holds
"motion" (F'', H'', W'', D_m) and, with `raw=True`, "encoder" (F'', H'', W'', D_v), both in float16 by
default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moalign.data.cache import Cache, dataset_identity, file_digest
from moalign.data.cache_writer import CacheWriter, fill_cache
from moalign.data.dataset import VideoClipDataset
from moalign.encoder import VideoEncoder
from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.checkpoint import load_module_file
from moalign.run.digest import model_digest
from moalign.run.serialize import to_dict

logger = console.get_logger(__name__)

TARGETS_KIND = "teacher_targets"


def encoder_digest(path: str | None, model: Any = None) -> str | None:
    """sha256 (16 hex digits) of an encoder's content: its folder's config.json and weights files
    (`moalign.run.digest.model_digest`).

    A hub id (no local folder) is pinned by the commit transformers loaded (``model.config._commit_hash``)
    when `model` is given; None when neither is known. So a targets cache resumed after the encoder's weights
    changed at the same path is refused (`compute_targets`'s fingerprint holds it).
    """
    if path and Path(path).expanduser().is_dir():
        return model_digest(path)
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"hub:{commit}" if commit else None


@dataclass
class MotionTeacher:
    """The frozen stage-1 result stage 2 needs: M_psi plus the encoder settings it was trained on."""

    projector: nn.Module  # MotionProjector, frozen, eval mode
    encoder: Any  # EncoderConfig (path, layer, input geometry)
    data: Any  # DataConfig the projector was trained with
    source: Path


def load_motion_teacher(path: str | os.PathLike) -> MotionTeacher:
    """Load the motion projector M_psi from a stage-1 run folder (or its motion_projector.safetensors).

    The returned projector is frozen (no parameter requires grad) and in eval mode.
    """
    from moalign.motion_projector import MotionProjector, MotionProjectorConfig
    from moalign.run.serialize import from_dict
    from moalign.stage1 import Stage1Config

    path = Path(path)
    file = path / "motion_projector.safetensors" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise MoalignError(
            f"{path} has no motion_projector.safetensors: it is not a finished stage-1 run. "
            "Run `moalign stage1 --out RUN` to completion, or pass a checkpoint-N folder of one."
        )
    state, config = load_module_file(file, kind="motion_projector")
    try:
        stage1 = from_dict(Stage1Config, config["stage1"])
        projector = MotionProjector(from_dict(MotionProjectorConfig, config["projector"]))
    except (KeyError, TypeError, ValueError) as err:  # a file from another version, or edited by hand
        raise MoalignError(
            f"{file} holds a stage-1 config this version cannot read ({err!r}); re-run stage 1 with this "
            "version, or load the run with the moalign version that wrote it"
        ) from err
    projector.load_state_dict(state)
    projector.requires_grad_(False).eval()
    return MotionTeacher(projector=projector, encoder=stage1.encoder, data=stage1.data, source=file)


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
    allow_empty_captions: bool = False,
    caption_column: str | None = None,
    video_column: str | None = None,
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
        caption_column, video_column: the manifest's columns (`moalign/data/manifest.py`), as for the other
            caches of the same dataset; the clip window and size are the teacher's.

    Returns:
        The cache folder; open it with `load_targets`.

    The cache's fingerprint pins the content of what the targets depend on, not only paths: the sha256 of the
    teacher's motion_projector.safetensors and of the encoder folder's config and weights (`encoder_digest`),
    with the encoder settings, storage dtype and the clips. A non-finite target stops the build naming the clip.
    """
    from dataclasses import replace

    teacher = load_motion_teacher(teacher_run)
    data_cfg = replace(
        teacher.data,
        skip_bad_videos=skip_bad_videos,
        allow_empty_captions=allow_empty_captions,
        caption_column=caption_column,
        video_column=video_column,
    )
    if rank == 0:
        logger.info(
            f"[targets] clips as the teacher {teacher_run} cuts them: {data_cfg.describe()} (its stage-1 data config)"
        )
    dataset = VideoClipDataset(data_dir, data_cfg, load_flow=False)
    encoder = VideoEncoder.from_pretrained(teacher.encoder, torch_dtype=torch.float32).to(device)
    projector = teacher.projector.to(device)
    if encoder.width != projector.cfg.in_dim:  # the encoder at that path changed since stage 1
        raise MoalignError(
            f"the stage-1 run {teacher_run} was trained on {projector.cfg.in_dim}-wide encoder tokens, but the "
            f"encoder at {teacher.encoder.path} now gives {encoder.width}-wide ones: it is not the encoder stage 1 "
            "used. Put that encoder back at the path, or train stage 1 again on this one"
        )
    encoder.check_clip(data_cfg.num_frames, flag="the teacher's --num-frames")
    fingerprint = {
        "teacher_sha256": file_digest(teacher.source),
        "encoder": to_dict(teacher.encoder),
        "encoder_sha256": encoder_digest(teacher.encoder.path, getattr(encoder, "model", None)),
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

    top = torch.finfo(dtype).max if dtype == torch.float16 else None  # the one storage dtype that overflows
    hint = (
        f"The teacher {teacher_run} (M_psi) or its encoder {teacher.encoder.path} gave it: check that the "
        "stage-1 run trained to a finite loss (its log.jsonl) and re-run it if not"
        + (f"; the targets are stored as {dtype}, which overflows above {top:g}" if top else "")
        + "."
    )
    return fill_cache(
        writer,
        dataset,
        compute,
        desc="teacher targets",
        progress=progress,
        rank=rank,
        world_size=world_size,
        nonfinite_hint=hint,
    )


def load_targets(path: str | os.PathLike) -> Cache:
    """Open a complete targets cache: ``cache[i]["motion"]`` (F'', H'', W'', D_m), optionally "encoder"."""
    return Cache(path, kind=TARGETS_KIND)
