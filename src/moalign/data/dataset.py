"""`VideoClipDataset`: one loader for real data and the synthetic playground.

A dataset is a folder with a manifest (`moalign/data/manifest.py`: metadata.jsonl, metadata.csv, caption +
video text files, a train/ split, or videos with .txt captions beside them). Item i is clip i: a deterministic window of ``num_frames`` frames
(`moalign/data/sampling.py`; no random crops in time or space), resized so the frames cover the target size
and centre-cropped (`moalign/data/geometry.py`), with its caption and, when the manifest has it, the
ground-truth flow under exactly the same geometric transform. So cached teacher targets and flow fields stay
aligned with the frames they were computed from.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moalign.data.geometry import resize_center_crop, transform_flow, transform_valid
from moalign.data.manifest import ClipRecord, duplicate_rows, empty_captions, read_manifest, where
from moalign.data.sampling import (
    _SKIP_HINT,
    NATIVE_FPS_FIX,
    DataConfig,
    _offsets,
    _probe,
    is_consecutive,
    read_clip,
    sample_indices,
)
from moalign.errors import MoalignError
from moalign.run.console import get_logger

logger = get_logger(__name__)


def _load_flow(
    path: Path, indices: np.ndarray, src_hw: tuple[int, int], cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flow (and validity) of the window's frame pairs, transformed to the target size."""
    from safetensors import safe_open

    if not path.is_file():
        raise MoalignError(
            f"flow file not found: {path}. Fix the 'flow' column of the manifest, or load the dataset "
            "with load_flow=False and compute flow with a flow method such as dis."
        )
    lo, hi = int(indices[0]), int(indices[-1])  # consecutive window: pairs lo..hi-1
    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
            if "flow" not in keys:
                raise MoalignError(
                    f"{path} has no tensor named 'flow' (it has: {', '.join(keys) or 'none'}). Ground-truth "
                    "flow files hold 'flow' float32 (T-1, H, W, 2) and optionally 'valid' uint8 (T-1, H, W)."
                )
            sl = f.get_slice("flow")
            shape = tuple(sl.get_shape())
            if len(shape) != 4 or shape[-1] != 2 or tuple(shape[1:3]) != tuple(src_hw) or shape[0] < hi:
                raise MoalignError(
                    f"{path}: 'flow' has shape {shape}, but the video is {src_hw[0]}x{src_hw[1]} and the clip "
                    f"needs pairs {lo}..{hi - 1}, i.e. a (>= {hi}, {src_hw[0]}, {src_hw[1]}, 2) tensor. "
                    "Regenerate the flow file for this video."
                )
            flow = np.asarray(sl[lo:hi], dtype=np.float32)
            valid = None
            if "valid" in keys:
                vs = f.get_slice("valid")
                if tuple(vs.get_shape()) != shape[:3]:
                    raise MoalignError(
                        f"{path}: 'valid' has shape {tuple(vs.get_shape())}, expected {shape[:3]}. Regenerate it."
                    )
                valid = np.asarray(vs[lo:hi]) != 0
    except MoalignError:
        raise
    except Exception as err:
        raise MoalignError(
            f"cannot read flow file {path}: {type(err).__name__}: {err}. It must be a safetensors file "
            "with a 'flow' tensor; regenerate it."
        ) from err
    flow = transform_flow(flow, src_hw, cfg)
    if valid is not None:
        valid = transform_valid(valid, src_hw, cfg)
    return flow, valid


DROP_KINDS = ("missing", "unreadable", "frame_rate", "too_short")


def drop_reason(video: Path, cfg: DataConfig) -> tuple[str, str] | None:
    """Why ``cfg.skip_bad_videos`` drops a video, from a header probe (frame count and rate, first frame).

    The one rule for dropping: `VideoClipDataset` applies it at construction and `moalign.data.check`
    reports it, so a check and a run drop the same videos.

    Args:
        video: the video file.
        cfg: the data config (num_frames, fps, window).

    Returns:
        None when the video is kept, else (kind, message): kind is one of `DROP_KINDS`: "missing" (no such
        file), "unreadable" (corrupt, not a video, no video stream, no frames), "frame_rate" (no usable rate
        for cfg.fps, or cfg.fps above the native rate), "too_short" (fewer frames than the window spans);
        the message is the MoalignError a run with `cfg` raises for it (without the "--skip-bad-videos"
        hint when cfg.skip_bad_videos is on: then it is the reason the video is skipped).
    """
    try:
        count, fps = _probe(video, cfg.skip_bad_videos)
    except MoalignError as err:
        return ("unreadable" if video.is_file() else "missing"), str(err)
    try:
        _offsets(fps, cfg, video)
    except MoalignError as err:
        return "frame_rate", str(err)
    try:
        sample_indices(count, fps, cfg, video=video)
    except MoalignError as err:
        return "too_short", str(err)
    return None


class VideoClipDataset(torch.utils.data.Dataset):
    """Deterministic video clips from a manifest folder.

    Items are dicts:
        index: int, the record's manifest row;
        frames: uint8 tensor (T, H, W, 3), RGB, T = cfg.num_frames, (H, W) = (cfg.height, cfg.width);
        caption: str; video: str (absolute path);
        frame_indices: int64 tensor (T,), the source frames of the clip;
        fps: float, the clip's frame rate (cfg.fps, or the native rate);
        flow: float32 tensor (T-1, H, W, 2), forward flow t -> t+1 in target pixels, when the record has a
            flow file and load_flow is True; flow_valid: bool tensor (T-1, H, W) when the file has `valid`.

    Captions: a clip whose caption is empty, blank or null stops construction with an error naming the rows,
    unless cfg.allow_empty_captions (then they are counted in the log and train as the empty prompt). A row
    that repeats an earlier one (same video and caption) is kept, as the manifest says, and counted in a
    warning: it weighs double (docs/data.md says why it is not dropped).

    With cfg.skip_bad_videos, every video is probed at construction (header frame count and rate, first
    frame decoded) and missing, unreadable or too-short ones are dropped and listed in `skipped` as
    (video path, reason), and in `dropped` as one dict per clip, in manifest order: "video" (absolute path),
    "caption", "reason" (the MoalignError message a run without skip_bad_videos would raise, less its hint
    to pass --skip-bad-videos), "kind" (one of `DROP_KINDS`), "row" (the record's `ClipRecord.index`, 0-based
    manifest row) and "source" (file:line or the sidecar caption file; "" for records passed in without
    one). Caches built from the dataset list them (`moalign.data.cache_writer.fill_cache`). A video that
    still fails to decode later raises; it is never substituted.

    Args:
        root: the dataset folder (see `read_manifest`; cfg.caption_column / cfg.video_column pick the columns).
        cfg: the data config.
        records: use these records instead of reading the manifest (e.g. a train/validation split).
        load_flow: load the ground-truth flow of records that have a flow file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cfg: DataConfig,
        records: list[ClipRecord] | None = None,
        load_flow: bool = True,
    ) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.load_flow = load_flow
        self.skipped: list[tuple[str, str]] = []
        self.dropped: list[dict[str, str | int]] = []
        if records is None:
            records = read_manifest(root, cfg.caption_column, cfg.video_column)
        records = list(records)
        if not records:
            raise MoalignError(f"no clips to load from {root}: the record list is empty.")
        caption_error: MoalignError | None = None
        try:
            _check_captions(records, cfg)
        except MoalignError as err:  # said together with any bad video below: one round trip, not two
            caption_error = err
        _warn_duplicates(records)
        if load_flow:
            self._check_flow_records(records)
        if cfg.skip_bad_videos:
            records = self._drop_bad(records)
        else:
            missing = [r for r in records if not r.video.is_file()]
            if missing:
                shown = "; ".join(f"{r.video} ({r.source or f'row {r.index}'})" for r in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise MoalignError(
                    f"{len(missing)} of {len(records)} video files not found: {shown}{more}. Fix the paths "
                    f"in the manifest, {_SKIP_HINT}."
                    + (f" Also: {caption_error}" if caption_error is not None else "")
                )
            self._refuse_bad(records, caption_error)
        if caption_error is not None:
            raise caption_error
        self.records = records

    def _check_flow_records(self, records: list[ClipRecord]) -> None:
        """Fail early on missing flow files, and on fps subsampling when the manifest states the rate."""
        for r in records:
            if r.flow is None:
                continue
            if not r.flow.is_file():
                raise MoalignError(
                    f"flow file not found: {r.flow} ({r.source or f'row {r.index}'}). Fix the 'flow' column, "
                    "or load the dataset with load_flow=False."
                )
            native = r.extra.get("fps")
            if isinstance(native, int | float) and native > 0 and not is_consecutive(float(native), self.cfg):
                raise MoalignError(_flow_needs_native(r.flow, float(native), self.cfg))

    def _probe_all(self, records: list[ClipRecord]) -> list[tuple[str, str] | None]:
        """`drop_reason` of every record (a header probe each, 8 threads)."""
        workers = min(8, os.cpu_count() or 1, len(records))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda r: drop_reason(r.video, self.cfg), records))

    def _refuse_bad(self, records: list[ClipRecord], caption_error: MoalignError | None = None) -> None:
        """Without skip_bad_videos: every video is probed before any work, and the unusable ones stop the
        dataset at once, all of them named. (Found mid-build, one would stop a cache after finished shards,
        and the advised re-run with --skip-bad-videos, which indexes fewer clips, could not continue it.)"""
        bad = [
            (r, drop) for r, drop in zip(records, self._probe_all(records), strict=True) if drop is not None
        ]
        if not bad:
            return
        also = f" Also: {caption_error}" if caption_error is not None else ""
        if len(bad) == 1:
            raise MoalignError(bad[0][1][1] + also)
        kinds = Counter(kind for _, (kind, _) in bad)
        shown = "; ".join(f"{r.video} ({r.source or f'row {r.index}'}: {kind})" for r, (kind, _) in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise MoalignError(
            f"{len(bad)} of {len(records)} videos cannot be used ({', '.join(f'{n} {k}' for k, n in kinds.items())}"
            f"): {shown}{more}. The first: {bad[0][1][1]} `moalign check-data` lists them all.{also}"
        )

    def _drop_bad(self, records: list[ClipRecord]) -> list[ClipRecord]:
        found = self._probe_all(records)
        kept = []
        for r, drop in zip(records, found, strict=True):
            if drop is None:
                kept.append(r)
                continue
            kind, reason = drop
            self.skipped.append((str(r.video), reason))
            self.dropped.append(
                {
                    "video": str(r.video),
                    "caption": r.caption,
                    "reason": reason,
                    "kind": kind,
                    "row": r.index,
                    "source": r.source,
                }
            )
        if self.skipped:
            logger.warning(
                "[data] skipped %d of %d videos (missing, unreadable or too short); first: %s",
                len(self.skipped),
                len(records),
                self.skipped[0][1],
            )
        if not kept:
            raise MoalignError(
                f"all {len(records)} videos of {self.root} were skipped; the first because: {self.skipped[0][1]}"
            )
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        cfg = self.cfg
        frames, indices, fps = read_clip(rec.video, cfg)
        src_hw = (frames.shape[1], frames.shape[2])
        item = {
            "index": rec.index,
            "frames": torch.from_numpy(resize_center_crop(frames, cfg.height, cfg.width)),
            "caption": rec.caption,
            "video": str(rec.video),
            "frame_indices": torch.from_numpy(indices),
            "fps": float(cfg.fps if cfg.fps is not None else fps),
        }
        if rec.flow is not None and self.load_flow:
            if not is_consecutive(fps, cfg):
                raise MoalignError(_flow_needs_native(rec.flow, fps, cfg))
            flow, valid = _load_flow(rec.flow, indices, src_hw, cfg)
            item["flow"] = torch.from_numpy(flow)
            if valid is not None:
                item["flow_valid"] = torch.from_numpy(valid)
        return item


def _shown(records: list[ClipRecord], limit: int = 5) -> str:
    """'SOURCE (video name); ...' for the first `limit` records, and how many more."""
    shown = "; ".join(f"{where(r)} ({r.video.name})" for r in records[:limit])
    return shown + (f" and {len(records) - limit} more" if len(records) > limit else "")


def _check_captions(records: list[ClipRecord], cfg: DataConfig) -> None:
    """Stop on empty / blank / null captions unless cfg.allow_empty_captions (then count them in the log)."""
    empty = empty_captions(records)
    if not empty:
        return
    if cfg.allow_empty_captions:
        logger.warning(
            f"[data] {len(empty)} of {len(records)} clips have an empty or null caption and train as the empty "
            f"prompt (data.allow_empty_captions): {_shown(empty, 3)}"
        )
        return
    raise MoalignError(
        f"{len(empty)} of {len(records)} clips have an empty or null caption: {_shown(empty)}. They would train "
        "as the empty prompt (unconditional). Write their captions into the manifest (or remove those rows); "
        "to train them unconditionally on purpose, pass --set data.allow_empty_captions=true. "
        "`moalign check-data` lists them all."
    )


def _warn_duplicates(records: list[ClipRecord]) -> None:
    """Count rows that repeat an earlier row (same video and caption): kept, as the manifest says."""
    repeats = duplicate_rows(records)
    if not repeats:
        return
    row, first = repeats[0]
    logger.warning(
        f"[data] {len(repeats)} of {len(records)} rows repeat an earlier row (same video and caption), so those "
        f"clips are trained more often than the others; kept, as the manifest lists them. First: {where(row)} "
        f"repeats {where(first)} ({row.video.name}). Remove the repeated rows to train each clip once; "
        "`moalign check-data` lists them all."
    )


def _flow_needs_native(flow: Path, native_fps: float, cfg: DataConfig) -> str:
    return (
        f"{flow}: exact ground-truth flow is between consecutive native frames, but fps={cfg.fps:g} "
        f"subsamples this {native_fps:g} fps video (every {native_fps / cfg.fps:.3g} frames). Pass "
        f"{NATIVE_FPS_FIX}, or use flow computed on the sampled frames: a dis flow cache (`moalign flow "
        "--method dis`, `moalign precompute --flow dis`), given to stage 1 as --flow-cache."
    )
