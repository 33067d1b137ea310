"""`moalign precompute`: the caches stage 1 and stage 2 train from, in one command, split across processes.

    DATA --flow METHOD-------> OUT/flow      optical flow, stage 1's supervision          (before stage 1)
    DATA --teacher RUN1------> OUT/targets   motion tokens (+ raw encoder tokens, --raw)  (after stage 1)
    DATA --model PIPELINE----> OUT/latents   VAE latents + prompt embeddings              (any time)

Under `accelerate launch ... -m moalign.cli precompute ...` (or torchrun) process r of w computes shards
s % w == r of each cache on its own device; after a barrier the main process writes the cache's manifest.
Killed and started again with the same command, every process computes only its missing shards, and the
result equals an uninterrupted run (the producers are deterministic). Stage 2 then trains with no encoder,
VAE or text encoder in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moalign.backbones.spec import parse_dtype
from moalign.data.cache_writer import finalize_cache, remove_cache
from moalign.data.dataset import VideoClipDataset
from moalign.data.sampling import DataConfig
from moalign.errors import MoalignError
from moalign.run.console import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Share:
    """This process's part of a launch: rank r of w, its device, and a barrier over all processes."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            from moalign.run.launch import launch_state

            launch_state().wait_for_everyone()


def process_share(device: str | None = None) -> Share:
    """The share of this process in its launch (`moalign.run.launch.launch_state`: torchrun / accelerate launch
    honoured on GPUs and on CPU; one process, rank 0, outside a launch).

    Args:
        device: force a device ("cpu"); default: accelerate's device for this process (cuda:LOCAL_RANK on GPUs).
    """
    from moalign.run.launch import launch_state

    state = launch_state()
    return Share(state.process_index, state.num_processes, device or str(state.device))


def precompute(
    data_dir: str | os.PathLike,
    out: str | os.PathLike | dict[str, Path],
    *,
    data: DataConfig,
    flow: str | None = None,
    raft_weights: str | None = None,
    teacher: str | os.PathLike | None = None,
    raw: bool = False,
    model: str | None = None,
    backbone: str = "cogvideox",
    latents_dtype: str = "float32",
    vae_tiling: bool = False,
    shard_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    share: Share | None = None,
) -> dict[str, Path]:
    """Build the asked-for caches under `out` (flow/, targets/, latents/), this process's share of each.

    Args:
        data_dir: dataset folder.
        out: folder for the caches (OUT/flow, OUT/targets, OUT/latents), or name -> folder (the single-cache
            commands `flow`, `targets`, `latents` write where they are told).
        data: clip sampling (geometry, fps) for flow and latents; targets use the teacher's own, so they line up
            with what M_psi was trained on.
        flow: flow method ("dis", "farneback", "raft", "exact"); None: no flow cache.
        teacher: stage-1 run folder; None: no targets cache. `raw` also stores the raw encoder tokens.
        model: diffusers pipeline folder or hub id for latents; None: no latents cache.
        backbone: the model's family ("cogvideox" or "wan").
        latents_dtype: dtype of the VAE and text encoder and of the stored latents / embeddings.
        vae_tiling: encode with the VAE's spatial tiling (less memory at 480p and above).
        overwrite: delete the caches first (the main process does, before the others start).
        share: this process's share (default: from accelerate).

    Returns:
        name -> cache folder, for the caches built.
    """
    from moalign.data.flow import build_flow_estimator
    from moalign.data.flow_cache import compute_flow_cache
    from moalign.latents import compute_latents
    from moalign.teacher import compute_targets

    share = share or process_share()
    if flow is None and teacher is None and model is None:
        raise MoalignError(
            "nothing to precompute: pass --flow METHOD (before stage 1), --teacher STAGE1_RUN and/or "
            "--model PIPELINE (after stage 1)"
        )
    torch_dtype = parse_dtype(latents_dtype)
    where = out if isinstance(out, dict) else {n: Path(out) / n for n in ("flow", "targets", "latents")}
    common = dict(
        shard_size=shard_size,
        progress=progress and share.is_main,
        rank=share.rank,
        world_size=share.world_size,
    )
    jobs: list[tuple[str, Any]] = []
    if flow is not None:

        def flow_job(path: Path) -> None:
            dataset = VideoClipDataset(data_dir, data, load_flow=flow == "exact")
            estimator = build_flow_estimator(flow, raft_weights=raft_weights, device=share.device)
            compute_flow_cache(dataset, estimator, path, **common)

        jobs.append(("flow", flow_job))
    if teacher is not None:
        jobs.append(
            ("targets", lambda path: compute_targets(
                data_dir, teacher, path, raw=raw, skip_bad_videos=data.skip_bad_videos, allow_empty_captions=data.allow_empty_captions,
                device=share.device,
                caption_column=data.caption_column, video_column=data.video_column, **common,
            ))
        )  # fmt: skip
    if model is not None:
        jobs.append(
            ("latents", lambda path: compute_latents(
                data_dir, model, path, backbone=backbone, data=data, dtype=torch_dtype,
                vae_tiling=vae_tiling, device=share.device, **common,
            ))
        )  # fmt: skip
    return _run_jobs(jobs, where, share, overwrite=overwrite, progress=progress)


def _run_jobs(
    jobs: list[tuple[str, Any]], where: dict[str, Path], share: Share, *, overwrite: bool, progress: bool
) -> dict[str, Path]:
    """Run each cache's job on every process between barriers: the main process deletes first, finalizes after."""
    if share.is_main and progress and share.world_size > 1:
        logger.info(
            f"[precompute] {share.world_size} processes: process r writes the shards s with s % {share.world_size} == r"
        )
    built = {}
    for name, job in jobs:
        path = Path(where[name])
        if overwrite and share.is_main:
            remove_cache(path)
        share.barrier()  # nobody opens a cache the main process is deleting
        job(path)
        share.barrier()  # every shard of every process is written
        if share.is_main and not (path / "manifest.json").is_file():
            finalize_cache(path)
        share.barrier()
        built[name] = path
        if share.is_main and progress:
            logger.info(f"[precompute] {name}: {path}")
    return built


__all__ = ["Share", "precompute", "process_share"]
