"""Sharded, atomic, resumable tensor caches: flow targets, encoder tokens, motion targets, latents, embeddings.

Layout of a cache folder::

    root/cache.json                     kind, fingerprint, num_items, shard_size (written at first open)
    root/shard-00000.safetensors        items [0, K): tensors under "{index}/{name}", skipped items in metadata
    root/shard-00001.safetensors        items [K, 2K) ...
    root/manifest.json                  written last, only once every shard exists: the cache is complete;
                                        holds every shard's sha256 and size
    root/.moalign.lock                  held by the process building the cache (`moalign.run.lock`)

Why it is safe to kill and restart:

- Every file is written under a temporary name and renamed into place (`moalign.run.atomic`), so a shard that
  exists under its final name is complete. A killed run leaves at most a hidden ``.shard-*.tmp`` file, which
  readers ignore and `CacheWriter.finalize` removes.
- Skipped items (with their reasons) live in the shard's own safetensors metadata, so shard and skip record
  appear together in one rename.
- `cache.json` is written before any work; a restarted run with the same arguments finds it, checks its
  kind and fingerprint match, and computes only the shards that are missing. With deterministic producers the
  result is tensor-equal to an uninterrupted run. A run with other settings is refused once a shard is
  finished (nothing is deleted without --overwrite); before that, nothing would be lost, so it starts the
  cache again with its own settings (e.g. re-run with --skip-bad-videos after a build stopped at a bad clip).
- A shard damaged on disk (flipped, zeroed or truncated bytes) is caught by `Cache`: a size that differs from
  the manifest's when the cache is opened, a sha256 that differs the first time the shard is read. The message
  names the shard; deleting it and re-running the build command recomputes that shard alone and rewrites the
  manifest. Caches written before the manifest held hashes still load, unchecked.
- Several processes can fill one cache: process ``rank`` takes shards ``s`` with ``s % world_size == rank``.
  Each writes only its own shards; once all are done (a barrier), one process calls `finalize_cache`
  (`moalign precompute` does this under `accelerate launch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import torch

from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.digest import file_sha256

logger = console.get_logger(__name__)

CACHE_FORMAT = 1


_HEADER = "cache.json"


_MANIFEST = "manifest.json"


def _normalise(fingerprint: dict) -> dict:
    """JSON round trip, so tuples and lists (and int/str dict keys) compare as they will after reloading."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except TypeError as err:
        raise TypeError(f"cache fingerprint must be JSON-serialisable: {err}") from err


def fingerprint_digest(fingerprint: dict) -> str:
    """Short sha256 of a fingerprint's canonical JSON: stamped into every shard's metadata."""
    blob = json.dumps(_normalise(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff_fingerprints(old: dict, new: dict) -> list[str]:
    """Readable lines ``key: old -> new`` for every (dotted, nested) key whose value differs."""
    a, b = _flatten(_normalise(old)), _flatten(_normalise(new))
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            sa = "(absent)" if va is missing else json.dumps(va)
            sb = "(absent)" if vb is missing else json.dumps(vb)
            lines.append(f"{key}: {sa[:80]} -> {sb[:80]}")
    return lines


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _num_shards(num_items: int, shard_size: int) -> int:
    return (num_items + shard_size - 1) // shard_size


def _read_header(root: Path) -> dict | None:
    path = root / _HEADER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MoalignError(
            f"{path} is unreadable ({err}). Delete the folder {root} (or pass --overwrite) and rebuild the cache."
        ) from err


# the single-cache command that (re)builds a cache of each kind into any folder (--out)
_BUILDERS = {"flow": "moalign flow", "teacher_targets": "moalign targets", "latents": "moalign latents"}


def _rebuild_hint(manifest: dict, root: Path | None = None) -> str:
    """How to repair a cache whose shard is damaged or gone: the command that built it, when recorded, or (for a
    cache moved or copied elsewhere, or built inside another command such as `moalign demo`) the kind's own
    command with the same settings and --out this folder."""
    command = manifest.get("command")
    how = f" ({command})" if command else ""
    builder = _BUILDERS.get(str(manifest.get("kind")))
    alt = (
        f"; for a cache moved or copied here, or built by another command, `{builder} ... --out {root}` with the "
        "settings it was built with does the same (other settings are refused, listed)"
        if builder and root is not None
        else ""
    )
    return (
        f"re-run the command that built the cache{how}: it computes only the missing shards and rewrites "
        f"{_MANIFEST}{alt}"
    )


def _check_header(root: Path, header: dict, kind: str | None, fingerprint: dict | None, fix: str) -> None:
    """Raise a MoalignError listing what differs between a cache on disk and what the caller expects."""
    diffs = []
    if kind is not None and header.get("kind") != kind:
        diffs.append(f"kind: {json.dumps(header.get('kind'))} -> {json.dumps(kind)}")
    if fingerprint is not None:
        diffs += diff_fingerprints(header.get("fingerprint", {}), fingerprint)
    if diffs:
        listing = "\n  ".join(diffs)
        raise MoalignError(
            f"the cache in {root} was built with different settings (on disk -> requested):\n  {listing}\n{fix}"
        )


class Cache:
    """Read-only view of a complete cache: ``cache[index] -> {name: tensor}``, loaded lazily per shard.

    Args:
        root: the cache folder.
        kind: expected kind (e.g. ``"flow"``); None accepts any.
        fingerprint: expected fingerprint; None accepts any. Mismatches list the differing keys.
        max_open: how many shard files to keep open (least recently used are dropped).

    Raises:
        MoalignError: the folder is missing, not a cache, incomplete (re-run the same command to resume), or
            holds another kind or fingerprint.

    Items are memory-mapped through `safetensors.safe_open`; a returned tensor is a copy owned by the caller.
    The object pickles without its open handles, so it can be handed to DataLoader workers.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        kind: str | None = None,
        fingerprint: dict | None = None,
        max_open: int = 8,
    ) -> None:
        self.root = Path(root)
        header = _read_header(self.root) if self.root.is_dir() else None
        what = f"{kind} cache" if kind else "cache"
        if header is None:
            raise MoalignError(
                f"no {what} at {self.root} (no {_HEADER} there). Check the path, or build the cache first."
            )
        manifest_path = self.root / _MANIFEST
        if not manifest_path.is_file():
            n = _num_shards(header.get("num_items", 0), header.get("shard_size", 1))
            done = sum((self.root / shard_name(s)).is_file() for s in range(n))
            raise MoalignError(
                f"the {what} at {self.root} is incomplete ({done} of {n} shards written, no {_MANIFEST}). "
                "Re-run the same command to resume it; only the missing shards are computed."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MoalignError(
                f"{manifest_path} is unreadable ({err}). Re-run the same command to rewrite it."
            ) from err
        fix = "Point to the cache built with these settings, or rebuild it (new --out, or --overwrite)."
        _check_header(
            self.root, manifest, kind, None if fingerprint is None else _normalise(fingerprint), fix
        )
        self.kind: str = manifest["kind"]
        self.fingerprint: dict = manifest["fingerprint"]
        self.num_items: int = manifest["num_items"]
        self.shard_size: int = manifest["shard_size"]
        self.shard_files: list[str] = manifest["shards"]
        self.skipped: dict[int, str] = {int(k): v for k, v in manifest["skipped"].items()}
        self.indices: list[int] = [i for i in range(self.num_items) if i not in self.skipped]
        # sha256 and size of each shard (caches written before they were recorded: empty, unchecked)
        self.shard_sha256: dict[str, str] = dict(manifest.get("shard_sha256") or {})
        self.shard_bytes: dict[str, int] = dict(manifest.get("shard_bytes") or {})
        self._rebuild = _rebuild_hint(manifest, self.root)
        absent = [name for name in self.shard_files if not (self.root / name).is_file()]
        if absent:
            raise MoalignError(
                f"the {what} at {self.root} is damaged: {len(absent)} shard files are gone "
                f"(first: {absent[0]}). To repair it, {self._rebuild}."
            )
        for name, size in self.shard_bytes.items():
            found = (self.root / name).stat().st_size
            if found != size:
                self._damaged(name, f"it is {found} bytes, its manifest says {size} (truncated or replaced)")
        if not self.shard_sha256:
            logger.info(f"[cache] {self.root} was written before caches recorded shard hashes: not verified")
        self._verified: set[int] = set()  # shards whose sha256 this process has checked
        self.max_open = max_open
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        """Number of present (not skipped) items."""
        return len(self.indices)

    def __contains__(self, index: object) -> bool:
        try:
            i = operator.index(index)  # accepts numpy and torch integers too
        except TypeError:
            return False
        return 0 <= i < self.num_items and i not in self.skipped

    @property
    def digest(self) -> str:
        """sha256 (16 hex digits) of what this cache is: its kind, fingerprint (which pins the data, settings
        and the content of the weights it was computed with), item count and skipped items.

        Equal for two builds with the same settings (so a run can record it and refuse a resume onto another
        cache), and unchanged when a damaged shard is deleted and recomputed by the same command: the bytes of
        each shard are checked separately, against `shard_sha256`.
        """
        blob = json.dumps(
            [self.kind, fingerprint_digest(self.fingerprint), self.num_items, sorted(self.skipped)],
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _damaged(self, name: str, what: str) -> NoReturn:
        raise MoalignError(
            f"cache shard {self.root / name} is damaged: {what}. Delete that file and {self._rebuild}."
        )

    def verify(self, shard: int) -> None:
        """Check a shard's sha256 against the manifest (once per process; streamed, never whole in memory).

        Raises:
            MoalignError: the shard's bytes differ from those the manifest recorded, naming the shard file and
                how to rebuild it.
        """
        name = self.shard_files[shard]
        expected = self.shard_sha256.get(name)
        if shard in self._verified or expected is None:
            return
        try:
            found = file_sha256(self.root / name)
        except OSError as err:
            self._damaged(name, f"it cannot be read ({err})")
        if found != expected:
            self._damaged(name, f"its sha256 is {found[:16]}..., its manifest says {expected[:16]}...")
        self._verified.add(shard)

    def _open(self, shard: int) -> tuple[Any, dict[int, list[str]]]:
        """(safe_open handle, {index: [tensor names]}) of a shard, from a small LRU; verified at first open."""
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        self.verify(shard)
        name = self.shard_files[shard]
        names: dict[int, list[str]] = {}
        try:
            handle = safe_open(str(self.root / name), framework="pt")
            for key in handle.keys():
                index, tensor = key.split("/", 1)
                names.setdefault(int(index), []).append(tensor)
        except Exception as err:  # SafetensorError, OSError, a foreign key layout: all mean a bad shard
            self._damaged(name, f"it is not a readable cache shard ({type(err).__name__}: {err})")
        self._handles[shard] = (handle, names)
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)  # the handle closes when garbage-collected
        return handle, names

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of one item, e.g. ``{"flow": (T-1, H, W, 2)}``; KeyError for skipped or out-of-range items."""
        try:
            i = operator.index(index)
        except TypeError:
            raise KeyError(f"cache index must be an integer, got {index!r}") from None
        if i in self.skipped:
            raise KeyError(f"item {i} was skipped when the cache was built: {self.skipped[i]}")
        if not 0 <= i < self.num_items:
            raise KeyError(f"item {i} not in cache {self.root} (items 0..{self.num_items - 1})")
        shard = i // self.shard_size
        handle, names = self._open(shard)
        try:
            return {name: handle.get_tensor(f"{i}/{name}") for name in names.get(i, [])}
        except Exception as err:  # a shard damaged after its header (only unverified, hash-less caches)
            self._damaged(self.shard_files[shard], f"item {i} cannot be read ({type(err).__name__}: {err})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.root)!r}, kind={self.kind!r}, items={len(self)}/{self.num_items}, "
            f"skipped={len(self.skipped)}, shards={len(self.shard_files)})"
        )


def _data_config(dataset: Any) -> dict[str, Any]:
    """The dataset's DataConfig as a dict, minus fields that do not change any clip's content."""
    cfg = dataset.cfg
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    # decide whether bad clips or empty captions raise or are kept going, not what a clip holds
    for name in ("skip_bad_videos", "allow_empty_captions"):
        d.pop(name, None)
    for name in ("caption_column", "video_column"):  # which column is read: the manifest hash pins the clips
        d.pop(name, None)
    return json.loads(json.dumps(d, default=str))


def _record_identity(record: Any) -> Any:
    """(video path, caption) of a manifest record; the whole record when it names them differently."""
    if hasattr(record, "video") and hasattr(record, "caption"):
        return [str(record.video), str(record.caption)]
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else vars(record)


def manifest_digest(dataset: Any) -> str:
    """sha256 (16 hex digits) of the dataset's (video path, caption) list, in order."""
    rows = [_record_identity(r) for r in dataset.records]
    blob = json.dumps(rows, separators=(",", ":"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a file's bytes, streamed and memoised per process
    (`moalign.run.digest.file_sha256`): pins weights in a fingerprint."""
    return file_sha256(path)[:16]


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """The part of a cache fingerprint that pins the clips: data config, clip count, manifest hash."""
    return {
        "data": _data_config(dataset),
        "num_clips": len(dataset),
        "manifest_sha256": manifest_digest(dataset),
    }
