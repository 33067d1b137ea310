"""Writing `moalign.data.cache` folders: one shard at a time, atomically, resumable, split across processes.

See `moalign/data/cache.py` for the layout and why a killed run is safe to restart. One file more than that
layout: ``dropped_clips.json``, the clips the dataset dropped at construction (``skip_bad_videos``), written
by `fill_cache` before any shard and copied into ``manifest.json`` by `CacheWriter.finalize`. Those clips
have no cache index, so no shard can record them; a file of its own lets the process that finalizes a
multi-process cache (`finalize_cache`, which has no dataset) list them too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moalign.data.cache import (
    _HEADER,
    _MANIFEST,
    CACHE_FORMAT,
    _check_header,
    _normalise,
    _num_shards,
    _read_header,
    diff_fingerprints,
    fingerprint_digest,
    shard_name,
)
from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.atomic import save_safetensors, write_json
from moalign.run.digest import file_sha256
from moalign.run.lock import LOCK_NAME, hold_folder, holder_record

logger = console.get_logger(__name__)

_DROPPED = "dropped_clips.json"

# finished shards under their final names (`shard_name`); temporaries are hidden (".shard-...tmp")
_SHARDS = "shard-*.safetensors"

# keys of one dropped clip, as `VideoClipDataset.dropped` holds them
_DROPPED_KEYS = ("video", "caption", "reason", "kind", "row", "source")


def _lock_name(rank: int) -> str:
    """The lock file of process `rank` of a build: ``.moalign.lock`` for rank 0 (`moalign.run.lock`)."""
    return LOCK_NAME if rank == 0 else f".moalign-rank{rank}.lock"


def _is_lock(path: Path) -> bool:
    return path.name == LOCK_NAME or (path.name.startswith(".moalign-rank") and path.name.endswith(".lock"))


def _clear_folder(root: Path) -> None:
    """Delete everything in `root` but its lock files (held by this process: deleting one would free it)."""
    for p in root.iterdir():
        if _is_lock(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _launch_rank() -> int:
    """This process's rank in its launch (torchrun / accelerate launch set RANK; 0 outside a launch)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _check_finite(item: dict[str, torch.Tensor], where: str, root: Path, hint: str) -> None:
    """MoalignError naming `where` (the clip) and the tensor when a floating tensor of `item` holds NaN or inf."""
    for name, value in item.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            advice = hint or "Check that clip's video and the model the cache is computed with."
            raise MoalignError(
                f"{where} gave a non-finite {name!r} tensor {tuple(value.shape)} ({bad} of {value.numel()} values "
                f"are NaN or inf), so the cache in {root} would hold it; stopped before writing its shard. {advice}"
            )


class CacheWriter:
    """Fills a sharded cache folder, resuming where an earlier (killed) run with the same arguments stopped.

    Args:
        root: the cache folder (created if missing).
        kind: what the cache holds, e.g. ``"flow"``; checked by readers.
        fingerprint: JSON-able dict of everything that determines the content (method and options, data
            config, dataset identity, dtype). A folder holding a cache with another kind is refused, and one
            with another fingerprint (or num_items, shard_size) once it holds a finished shard, with the
            differing keys listed; a cache of this kind without any finished shard (a build that stopped
            before its first shard) is started again with these settings, and the log says so.
        num_items: number of items (dataset indices ``0 .. num_items - 1``).
        shard_size: items per shard file; shard ``s`` covers ``[s * shard_size, min((s + 1) * shard_size, N))``.
        overwrite: delete an existing cache in ``root`` first. With several processes, let one process delete
            the folder before the others open it (they would otherwise delete each other's shards).
        rank: this process's rank in its launch (default: the RANK environment variable that torchrun and
            accelerate launch set, else 0), which picks its lock file.

    Locking: the writer holds an exclusive lock on the folder for its lifetime (`moalign.run.lock.hold_folder`;
    released when the writer is garbage-collected, by `release`, or when the process dies). Every process of
    a launch writes its own shards into the same folder, so each rank holds its own lock file:
    ``.moalign.lock`` for rank 0, ``.moalign-rank{r}.lock`` for rank r. A second build of the same folder is
    refused at the latest at its rank 0 (every launch has one, and the first build holds rank 0's lock), which
    stops that launch; its other ranks can at most write shards of the same settings, each atomically.

    Example::

        writer = CacheWriter(out, "flow", fingerprint, len(dataset))
        for shard in writer.shards_todo(rank, world_size):
            writer.write_shard(shard, {i: {"flow": compute(i)} for i in writer.items_of(shard)})
        if not writer.shards_todo():
            writer.finalize()
    """

    def __init__(
        self,
        root: str | os.PathLike,
        kind: str,
        fingerprint: dict,
        num_items: int,
        shard_size: int = 64,
        overwrite: bool = False,
        rank: int | None = None,
    ) -> None:
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.kind = kind
        self.fingerprint = _normalise(fingerprint)
        self.num_items = num_items
        self.shard_size = shard_size
        self.num_shards = _num_shards(num_items, shard_size)
        self.digest = fingerprint_digest(self.fingerprint)
        header = {
            "format": CACHE_FORMAT,
            "kind": kind,
            "fingerprint": self.fingerprint,
            "num_items": num_items,
            "shard_size": shard_size,
        }

        if self.root.exists() and not self.root.is_dir():
            raise MoalignError(f"cache path {self.root} is a file, not a folder. Pass a folder as --out.")
        old = _read_header(self.root) if self.root.is_dir() else None
        # A cache's header is the first file of it to appear under a visible name (hidden names are
        # temporaries), so list first, then read the header again: visible files without a header after the
        # listing are not a cache's. (Reading before the listing races with another process of the same
        # launch, which may be writing the header and its first files just now.)
        if (
            old is None
            and self.root.is_dir()
            and any(not p.name.startswith(".") for p in self.root.iterdir())
        ):
            old = _read_header(self.root)
            if old is None:
                # Never delete (or mix into) a folder that is not ours, even with overwrite=True.
                raise MoalignError(
                    f"{self.root} is not empty and holds no {_HEADER}, so it is not a moalign cache. "
                    "Pass a new or empty folder as --out."
                )
        rank = _launch_rank() if rank is None else rank
        self._lock = hold_folder(
            self.root, f"a {kind} cache build" + (f" (process {rank})" if rank else ""), _lock_name(rank)
        )
        if old is not None and overwrite:
            _clear_folder(self.root)
            old = None
        if old is not None and old.get("kind") == kind and _settings(old) != _settings(header):
            old = self._restart(old, header)  # None: nothing finished, so the header is written afresh below
        if old is not None:
            expected = {k: header[k] for k in ("num_items", "shard_size")}
            found = {k: old.get(k) for k in expected}
            fix = f"Use a new --out folder, or pass --overwrite to delete {self.root} and rebuild it."
            if old.get("kind") != kind or _settings(old) != _settings(header):
                held = len(list(self.root.glob(_SHARDS)))
                if held:
                    fix = f"It holds {held} finished shard(s), which starting again would lose. {fix}"
            _check_header(self.root, old, kind, self.fingerprint, fix)
            if found != expected:
                raise MoalignError(
                    f"the cache in {self.root} has num_items={found['num_items']}, "
                    f"shard_size={found['shard_size']}, but this run asks for num_items={num_items}, "
                    f"shard_size={shard_size}. {fix}"
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.root / _HEADER, header)
        missing = [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]
        if missing and (self.root / _MANIFEST).is_file():
            # a shard of a complete cache was deleted (e.g. a damaged one): the manifest no longer describes
            # the folder; it is written again by `finalize` once the missing shards are computed
            (self.root / _MANIFEST).unlink(missing_ok=True)
            logger.info(
                f"[cache] {self.root}: {len(missing)} shard(s) missing (first: {shard_name(missing[0])}); "
                f"computing them and writing {_MANIFEST} again"
            )

    def release(self) -> None:
        """Let the folder's lock go (also happens when the writer is garbage-collected or the process dies)."""
        self._lock.release()

    def _restart(self, old: dict, header: dict) -> dict | None:
        """None (start the cache again: nothing is lost) when the header `old`, of other settings, has no
        finished shard beside it; else the header now on disk, for the checks that refuse it.

        A build that stopped before its first shard (e.g. at a too-short clip) is re-run with other settings
        (--skip-bad-videos drops clips: num_clips and manifest_sha256 change). Race-free with several
        processes: each writes this same header atomically, and one that sees a finished shard reads the
        header again, since another process of the launch may have restarted the cache and written a shard
        meanwhile (that shard has the new settings; a shard of the old ones means the old header stands).
        """
        if not any(self.root.glob(_SHARDS)) and not (self.root / _MANIFEST).is_file():
            changes = diff_fingerprints(old.get("fingerprint", {}), header["fingerprint"])
            changes += [
                f"{k}: {old.get(k)} -> {header[k]}"
                for k in ("num_items", "shard_size")
                if old.get(k) != header[k]
            ]
            logger.info(
                f"[cache] {self.root} held no finished shard, only the start of a {self.kind} cache with other "
                f"settings ({'; '.join(changes)}): starting it again with this run's settings"
            )
            return None
        return _read_header(self.root) or old

    def shard_path(self, shard: int) -> Path:
        return self.root / shard_name(shard)

    def items_of(self, shard: int) -> range:
        """Dataset indices covered by one shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def shards_todo(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shard ids this process owns (``s % world_size == rank``) whose file does not exist yet."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return [s for s in range(rank, self.num_shards, world_size) if not self.shard_path(s).is_file()]

    def write_shard(
        self,
        shard: int,
        items: dict[int, dict[str, torch.Tensor]],
        skipped: dict[int, str] | None = None,
        written_by: tuple[int, int] = (0, 1),
        skipped_clips: dict[int, dict[str, str]] | None = None,
    ) -> Path:
        """Write one shard atomically.

        Args:
            shard: shard id.
            items: ``{index: {name: tensor}}`` for the computed items of this shard. Names may not contain "/".
            skipped: ``{index: reason}`` for items that could not be computed. ``items`` and ``skipped``
                together must cover `items_of(shard)` exactly.
            written_by: (rank, world size) of the process writing it, kept in the shard's metadata as
                "process" = "rank/world_size" (provenance of multi-process builds).
            skipped_clips: ``{index: {"video": path, "caption": text}}``: which clip each skipped item is, so
                the manifest can name it (keys: a subset of `skipped`'s).

        Returns:
            The shard file's path.

        Raises:
            MoalignError: a floating tensor holds NaN or inf (nothing is written).
        """
        skipped = dict(skipped or {})
        clips = dict(skipped_clips or {})
        if set(clips) - set(skipped):
            raise ValueError(
                f"shard {shard}: skipped_clips for items not skipped: {sorted(set(clips) - set(skipped))}"
            )
        expected = set(self.items_of(shard))
        got, skip = set(items), set(skipped)
        if got & skip:
            raise ValueError(f"shard {shard}: items both computed and skipped: {sorted(got & skip)}")
        if got | skip != expected:
            raise ValueError(
                f"shard {shard} must cover items {expected and min(expected)}..{expected and max(expected)}: "
                f"missing {sorted(expected - got - skip)}, unexpected {sorted((got | skip) - expected)}"
            )
        tensors: dict[str, torch.Tensor] = {}
        for index in sorted(items):
            _check_finite(items[index], f"item {index}", self.root, "")
            for name, value in items[index].items():
                if "/" in name or not isinstance(value, torch.Tensor):
                    raise ValueError(f"item {index}: entry {name!r} must be a tensor named without '/'")
                # clone: views of one buffer would share storage, which safetensors refuses
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous().clone()
        metadata = {
            "moalign_cache": str(CACHE_FORMAT),
            "kind": self.kind,
            "fingerprint": self.digest,
            "shard": str(shard),
            "process": f"{written_by[0]}/{written_by[1]}",
            "skipped": json.dumps({str(k): str(v) for k, v in sorted(skipped.items())}),
            "skipped_clips": json.dumps(
                {str(k): {n: str(x) for n, x in v.items()} for k, v in sorted(clips.items())}
            ),
        }
        path = self.shard_path(shard)
        save_safetensors(path, tensors, metadata=metadata)
        return path

    def record_dropped(self, clips: list[dict[str, Any]]) -> Path:
        """Write ``dropped_clips.json``: the clips the dataset dropped before indexing, for `finalize`.

        Every process of a build may call it with the same list (each write is atomic; identical content);
        a resumed build rewrites it from its own dataset, so the manifest names the drops of the dataset the
        cache was last filled from. The file is not part of the fingerprint: dropping decides which clips
        get an index, and the fingerprint already pins the kept clips (`dataset_identity`).

        Args:
            clips: one dict per dropped clip with keys "video" and "reason", and optionally "caption",
                "kind", "row" (0-based manifest row, int) and "source" (as `VideoClipDataset.dropped` holds
                them). Written sorted by (row, video).

        Raises:
            ValueError: a clip lacks "video" or "reason", or has another key.

        Returns:
            The file's path.
        """
        rows = []
        for clip in clips:
            unknown = set(clip) - set(_DROPPED_KEYS)
            if unknown or not {"video", "reason"} <= set(clip):
                raise ValueError(
                    f"a dropped clip needs 'video' and 'reason' and only {_DROPPED_KEYS}, got {clip}"
                )
            rows.append({k: clip[k] if k == "row" else str(clip[k]) for k in _DROPPED_KEYS if k in clip})
        rows.sort(key=lambda c: (c.get("row", -1), c["video"]))
        path = self.root / _DROPPED
        write_json(path, {"dropped_clips": rows})
        return path

    def _read_dropped(self) -> list[dict[str, Any]]:
        path = self.root / _DROPPED
        if not path.is_file():  # built before drops were recorded, or not through fill_cache
            return []
        try:
            return list(json.loads(path.read_text())["dropped_clips"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MoalignError(
                f"{path} is unreadable ({type(err).__name__}: {err}). Delete it and re-run the same command "
                "(it is rewritten from the dataset; the shards are kept)."
            ) from err

    def _recorded_hashes(self) -> dict[str, str]:
        """The shard hashes of the manifest on disk ({} without one, or one written before hashes)."""
        try:
            return dict(json.loads((self.root / _MANIFEST).read_text()).get("shard_sha256") or {})
        except (OSError, ValueError, AttributeError):
            return {}

    def finalize(self) -> Path:
        """Check every shard, then write ``manifest.json``: the cache becomes readable by `Cache`.

        The manifest keeps ``"skipped": {index: reason}`` (what `Cache.skipped` reads) and adds
        ``"skipped_clips": {index: {"video", "caption", "reason"}}`` naming each skipped clip (video and
        caption only where the shard recorded them: shards written before they were recorded hold the reason
        alone), and ``"dropped_clips": [{"video", "caption", "reason", "kind", "row", "source"}]``: the clips
        the dataset dropped at construction, which have no index (from ``dropped_clips.json``, see
        `record_dropped`; empty when the cache was built without it). It records every shard's sha256 and size
        (``"shard_sha256"``, ``"shard_bytes"``: `Cache` checks them) and the command line that finalized it
        (``"command"``, named in `Cache`'s repair advice). A shard whose hash the manifest on disk already
        records (finalizing a complete cache again) must still have it: a damaged shard is never re-hashed
        into a new manifest.

        Returns:
            The cache folder.

        Raises:
            MoalignError: a shard is missing (re-run the same command to resume), unreadable, differs from the
                hash the manifest recorded (delete it and re-run), or was written for another fingerprint.
        """
        from safetensors import safe_open

        recorded = self._recorded_hashes()

        missing = [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]
        if missing:
            raise MoalignError(
                f"cannot finalize the cache in {self.root}: {len(missing)} of {self.num_shards} shards are "
                f"missing (first: {shard_name(missing[0])}). Re-run the same command to compute them."
            )
        skipped: dict[str, str] = {}
        clips: dict[str, dict[str, str]] = {}
        hashes: dict[str, str] = {}
        sizes: dict[str, int] = {}
        fix = "Delete that file and re-run the same command: it computes only the missing shards."
        for s in range(self.num_shards):
            path = self.shard_path(s)
            try:
                hashes[path.name] = file_sha256(path)
                sizes[path.name] = path.stat().st_size
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception as err:  # SafetensorError, OSError: a damaged or foreign file
                raise MoalignError(
                    f"cache shard {path} is damaged: it is not a readable shard ({type(err).__name__}: {err}). "
                    f"{fix}"
                ) from err
            if recorded.get(path.name, hashes[path.name]) != hashes[path.name]:
                raise MoalignError(
                    f"cache shard {path} is damaged: its sha256 is {hashes[path.name][:16]}..., its manifest "
                    f"says {recorded[path.name][:16]}.... {fix}"
                )
            if meta.get("fingerprint") != self.digest or meta.get("kind") != self.kind:
                raise MoalignError(
                    f"{path} was written for a different cache (kind {meta.get('kind')!r}, fingerprint "
                    f"{meta.get('fingerprint')} instead of {self.kind!r}, {self.digest}). Delete it and re-run, "
                    "or pass --overwrite to rebuild the whole cache."
                )
            skipped.update(json.loads(meta.get("skipped", "{}")))
            clips.update(json.loads(meta.get("skipped_clips", "{}")))
        dropped = self._read_dropped()
        for tmp in self.root.glob(".*.tmp"):  # leftovers of killed runs: every shard is in place now
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        write_json(
            self.root / _MANIFEST,
            {
                "format": CACHE_FORMAT,
                "kind": self.kind,
                "fingerprint": self.fingerprint,
                "num_items": self.num_items,
                "shard_size": self.shard_size,
                "shards": [shard_name(s) for s in range(self.num_shards)],
                "num_present": self.num_items - len(skipped),
                "skipped": dict(sorted(skipped.items(), key=lambda kv: int(kv[0]))),
                "skipped_clips": {
                    k: {**clips.get(k, {}), "reason": reason}
                    for k, reason in sorted(skipped.items(), key=lambda kv: int(kv[0]))
                },
                "dropped_clips": dropped,
                "shard_sha256": hashes,
                "shard_bytes": sizes,
                "command": holder_record("")["command"],
                "complete": True,
            },
        )
        return self.root


def _settings(header: dict) -> tuple:
    """What a header pins besides its kind: fingerprint, item count and shard size (a header is read JSON)."""
    return (_normalise(header.get("fingerprint", {})), header.get("num_items"), header.get("shard_size"))


def fill_cache(
    writer: CacheWriter,
    dataset: Any,
    compute: Callable[[dict], dict[str, torch.Tensor]],
    *,
    desc: str,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    nonfinite_hint: str = "",
) -> Path:
    """Compute `compute(dataset[i])` for every item of this process's missing shards and write them.

    An unreadable clip (MoalignError from the dataset) raises, or with ``dataset.cfg.skip_bad_videos`` is
    recorded as skipped with its reason, video path and caption (from ``dataset.records[index]`` when the
    dataset has records). The clips the dataset dropped at construction (``dataset.dropped``, see
    `VideoClipDataset`) are recorded first (`CacheWriter.record_dropped`), by every process, so the manifest
    lists them under "dropped_clips" however the cache is finalized. Errors from `compute` always raise. One
    process finalizes the cache when every shard is present; with several processes, call `finalize_cache`
    after they are all done.

    Every floating tensor `compute` returns must be finite: a NaN or inf stops the build with a MoalignError
    naming the clip (index and video), the tensor, and ends with `nonfinite_hint` (what the caller's user can
    change, e.g. "use --dtype float32 or bfloat16"); nothing of that clip's shard is written.

    Returns:
        The cache folder.
    """
    skip_bad = bool(getattr(dataset.cfg, "skip_bad_videos", False))
    writer.record_dropped(list(getattr(dataset, "dropped", None) or []))
    todo = writer.shards_todo(rank, world_size)
    bar = console.progress(
        total=sum(len(writer.items_of(s)) for s in todo), desc=desc, unit="clip", enabled=progress
    )
    with bar:
        for shard in todo:
            items: dict[int, dict[str, torch.Tensor]] = {}
            skipped: dict[int, str] = {}
            clips: dict[int, dict[str, str]] = {}
            for index in writer.items_of(shard):
                try:
                    sample = dataset[index]
                except MoalignError as err:  # unreadable video: the only per-clip failure we may skip
                    if not skip_bad:
                        raise
                    skipped[index] = str(err)
                    clip = _clip_of(dataset, index)
                    if clip:
                        clips[index] = clip
                    bar.update(1)
                    continue
                items[index] = compute(sample)
                clip = _clip_of(dataset, index)
                where = f"clip {index}" + (f" ({clip['video']})" if "video" in clip else "")
                _check_finite(items[index], where, writer.root, nonfinite_hint)
                bar.update(1)
            writer.write_shard(shard, items, skipped, written_by=(rank, world_size), skipped_clips=clips)
            if skipped:
                logger.warning(
                    f"[cache] shard {shard}: skipped {len(skipped)} clip(s), e.g. {next(iter(skipped.values()))}"
                )
    if world_size == 1 and not writer.shards_todo():
        return writer.finalize()
    return writer.root


def _clip_of(dataset: Any, index: int) -> dict[str, str]:
    """{"video", "caption"} of item `index` from the dataset's records (empty when it has none)."""
    records = getattr(dataset, "records", None)
    try:
        record = records[index]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        return {}
    return {k: str(getattr(record, k)) for k in ("video", "caption") if hasattr(record, k)}


def finalize_cache(root: str | os.PathLike) -> Path:
    """Write the manifest of a cache whose shards were all written (by several processes): see the module doc."""
    root = Path(root)
    header = _read_header(root) if root.is_dir() else None
    if header is None:
        raise MoalignError(f"no cache at {root} (no {_HEADER}); build it first")
    writer = CacheWriter(
        root, header["kind"], header["fingerprint"], header["num_items"], header["shard_size"]
    )
    return writer.finalize()


def remove_cache(root: str | os.PathLike) -> None:
    """Delete a cache (for --overwrite); a folder that is not a moalign cache is refused, not deleted.

    The folder's lock is taken first (a cache another process is building is refused, naming it) and its lock
    files are kept (deleting a held one would free it); everything else goes.
    """
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir() or _read_header(root) is None:
        raise MoalignError(
            f"{root} is not a moalign cache (no {_HEADER}), so --overwrite will not delete it. Pass another --out."
        )
    with hold_folder(root, "a cache being deleted (--overwrite)", _lock_name(_launch_rank())):
        _clear_folder(root)
