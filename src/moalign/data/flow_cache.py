"""The stage-1 flow cache: a flow backend run over a dataset into a sharded, resumable cache.

`compute_flow_cache` fills it (`moalign flow` / `moalign precompute --flow`); `load_flow_cache` opens it and
checks it matches the dataset.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moalign.data.cache import Cache, dataset_identity, diff_fingerprints, manifest_digest
from moalign.data.cache_writer import CacheWriter, fill_cache
from moalign.data.flow import FlowEstimator, build_flow_estimator
from moalign.errors import MoalignError
from moalign.run.digest import tensors_digest

FLOW_KIND = "flow"


def flow_fingerprint(dataset: Any, estimator: FlowEstimator, dtype: torch.dtype) -> dict[str, Any]:
    """Everything that determines a flow cache's content (see `compute_flow_cache`).

    A network estimator's weights are pinned by content: RAFT's weights file by its sha256 (in its `config`),
    a module built in memory (`RAFTFlow.from_module`) by a digest of its state dict.
    """
    method = estimator.config()
    net = getattr(estimator, "net", None)
    if "weights_sha256" in method and method["weights_sha256"] is None and isinstance(net, torch.nn.Module):
        method = {**method, "weights_sha256": "state:" + tensors_digest(net.state_dict())}
    return {
        "method": method,
        "dtype": str(dtype).removeprefix("torch."),
        **dataset_identity(dataset),
    }


def compute_flow_cache(
    dataset: Any,
    method: str | FlowEstimator,
    out: str | os.PathLike,
    *,
    shard_size: int = 64,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Estimate the flow of every clip of a dataset into a sharded, resumable cache folder.

    Killed and restarted with the same arguments it computes only the missing shards. Several processes can
    share the work: process ``rank`` of ``world_size`` takes shards ``s % world_size == rank``; once all are done,
    one of them calls `moalign.data.cache_writer.finalize_cache` (`moalign precompute` does both under accelerate).

    Args:
        dataset: a `moalign.data.dataset.VideoClipDataset` (map-style; items hold "frames" uint8 (T, H, W, 3), and
            for the synthetic playground "flow" and "flow_valid"); needs ``cfg`` and ``records``.
        method: a `FLOW_METHODS` key (built with default options) or a built `FlowEstimator`.
        out: cache folder.
        shard_size: clips per shard file.
        dtype: storage dtype of the flow. float16 (default) costs < 0.05 px at |flow| < 64 px (its spacing
            there is at most 2**-5 = 0.03 px, rounding error half that) and halves the size.
        overwrite: delete an existing cache in ``out`` first (with one process only).
        progress: show a progress bar over clips.
        rank, world_size: this process's share of the shards.

    Returns:
        The cache folder. Open it with `load_flow_cache`; item i holds "flow" (T-1, H, W, 2) in ``dtype``
        and, for method "exact" when the dataset has it, "valid" bool (T-1, H, W).

    The fingerprint (checked on resume, mismatch -> MoalignError) is: the method and its effective options,
    the storage dtype, the dataset's DataConfig (without ``skip_bad_videos``), the clip count and a hash of
    the manifest's video paths and captions; a network's weights by content (`flow_fingerprint`). An
    unreadable video raises, or with ``dataset.cfg.skip_bad_videos`` is recorded as skipped with its reason.
    A NaN or inf flow stops the build with a MoalignError naming the clip.
    """
    if overwrite and world_size > 1:
        raise MoalignError(
            f"--overwrite with {world_size} processes would let them delete each other's shards. "
            f"Delete {out} once (or run the overwrite with one process), then launch without --overwrite."
        )
    estimator = build_flow_estimator(method) if isinstance(method, str) else method
    fingerprint = flow_fingerprint(dataset, estimator, dtype)
    writer = CacheWriter(
        out, FLOW_KIND, fingerprint, len(dataset), shard_size=shard_size, overwrite=overwrite
    )

    def compute(sample: dict) -> dict[str, torch.Tensor]:
        flow = estimator.estimate(sample)  # (T-1, H, W, 2)
        t, h, w = np.shape(sample["frames"])[:3]
        if tuple(flow.shape) != (t - 1, h, w, 2):
            raise ValueError(f"{estimator!r} returned flow {tuple(flow.shape)} for frames {(t, h, w)}")
        return {"flow": flow.to(dtype), **estimator.extras(sample)}

    return fill_cache(
        writer,
        dataset,
        compute,
        desc=f"flow ({estimator.name})",
        progress=progress,
        rank=rank,
        world_size=world_size,
        nonfinite_hint=(
            f"The {estimator.name} flow estimator gave it: look at that clip's video (e.g. frames of one "
            "colour), use another flow method (--method / precompute --flow), or remove the clip from the manifest."
        ),
    )


def load_flow_cache(path: str | os.PathLike, dataset: Any = None) -> Cache:
    """Open a complete flow cache written by `compute_flow_cache`.

    Args:
        path: the cache folder.
        dataset: optional dataset the flows will be paired with; its DataConfig (frames, size, fps, window)
            and clip count must match the cache's. A different manifest (video paths or captions) only warns,
            as moving a dataset folder changes the paths but not the clips.

    Returns:
        A `moalign.data.cache.Cache`: ``cache[i]["flow"]`` is (T-1, H, W, 2) for clip i.

    Raises:
        MoalignError: missing or incomplete cache, not a flow cache, or a cache made for other data settings.
    """
    cache = Cache(path, kind=FLOW_KIND)
    if dataset is None:
        return cache
    fp = cache.fingerprint
    ours = {k: v for k, v in dataset_identity(dataset).items() if k != "manifest_sha256"}
    diffs = diff_fingerprints({"data": fp.get("data"), "num_clips": fp.get("num_clips")}, ours)
    if diffs:
        listing = "\n  ".join(diffs)
        raise MoalignError(
            f"the flow cache in {cache.root} does not match the dataset (cache -> dataset):\n  {listing}\n"
            "Recompute the flow with the same data settings (compute_flow_cache / the flow command with a new "
            "--out), or load the dataset with the settings the cache was made for."
        )
    if fp.get("manifest_sha256") != manifest_digest(dataset):
        warnings.warn(
            f"the flow cache in {cache.root} was computed for a manifest with other video paths or captions. "
            "Fine if you only moved the dataset; otherwise recompute the flow.",
            stacklevel=2,
        )
    return cache
