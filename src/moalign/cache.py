"""Sharded, atomic, resumable tensor caches: flow targets, encoder tokens, motion targets, latents, embeddings.

Layout of a cache folder::

    root/cache.json                     kind, fingerprint, num_items, shard_size (written at first open)
    root/shard-00000.safetensors        items [0, K): tensors under "{index}/{name}", skipped items in metadata
    root/shard-00001.safetensors        items [K, 2K) ...
    root/manifest.json                  written last, only once every shard exists: the cache is complete

Why it is safe to kill and restart:

- Every file is written under a temporary name and renamed into place (`moalign.atomic`), so a shard that
  exists under its final name is complete. A killed run leaves at most a hidden ``.shard-*.tmp`` file, which
  readers ignore and `CacheWriter.finalize` removes.
- Skipped items (with their reasons) live in the shard's own safetensors metadata, so shard and skip record
  appear together in one rename.
- `cache.json` is written before any work; a restarted run with the same arguments finds it, checks its
  kind and fingerprint match, and computes only the shards that are missing. With deterministic producers the
  result is tensor-equal to an uninterrupted run.
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
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moalign.atomic import save_safetensors, write_json
from moalign.errors import MoalignError

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


class CacheWriter:
    """Fills a sharded cache folder, resuming where an earlier (killed) run with the same arguments stopped.

    Args:
        root: the cache folder (created if missing).
        kind: what the cache holds, e.g. ``"flow"``; checked by readers.
        fingerprint: JSON-able dict of everything that determines the content (method and options, data
            config, dataset identity, dtype). A folder holding a cache with another kind or fingerprint is
            refused, with the differing keys listed.
        num_items: number of items (dataset indices ``0 .. num_items - 1``).
        shard_size: items per shard file; shard ``s`` covers ``[s * shard_size, min((s + 1) * shard_size, N))``.
        overwrite: delete an existing cache in ``root`` first. With several processes, let one process delete
            the folder before the others open it (they would otherwise delete each other's shards).

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
        # hidden names are temporaries: another process of the same launch may be writing the header just now
        if (
            old is None
            and self.root.is_dir()
            and any(not p.name.startswith(".") for p in self.root.iterdir())
        ):
            # Never delete (or mix into) a folder that is not ours, even with overwrite=True.
            raise MoalignError(
                f"{self.root} is not empty and holds no {_HEADER}, so it is not a moalign cache. "
                "Pass a new or empty folder as --out."
            )
        if old is not None and overwrite:
            shutil.rmtree(self.root)
            old = None
        if old is not None:
            expected = {k: header[k] for k in ("num_items", "shard_size")}
            found = {k: old.get(k) for k in expected}
            fix = f"Use a new --out folder, or pass --overwrite to delete {self.root} and rebuild it."
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
    ) -> Path:
        """Write one shard atomically.

        Args:
            shard: shard id.
            items: ``{index: {name: tensor}}`` for the computed items of this shard. Names may not contain "/".
            skipped: ``{index: reason}`` for items that could not be computed. ``items`` and ``skipped``
                together must cover `items_of(shard)` exactly.
            written_by: (rank, world size) of the process writing it, kept in the shard's metadata as
                "process" = "rank/world_size" (provenance of multi-process builds).

        Returns:
            The shard file's path.
        """
        skipped = dict(skipped or {})
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
        }
        path = self.shard_path(shard)
        save_safetensors(path, tensors, metadata=metadata)
        return path

    def finalize(self) -> Path:
        """Check every shard, then write ``manifest.json``: the cache becomes readable by `Cache`.

        Returns:
            The cache folder.

        Raises:
            MoalignError: a shard is missing (re-run the same command to resume) or was written for another
                fingerprint.
        """
        from safetensors import safe_open

        missing = [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]
        if missing:
            raise MoalignError(
                f"cannot finalize the cache in {self.root}: {len(missing)} of {self.num_shards} shards are "
                f"missing (first: {shard_name(missing[0])}). Re-run the same command to compute them."
            )
        skipped: dict[str, str] = {}
        for s in range(self.num_shards):
            path = self.shard_path(s)
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.digest or meta.get("kind") != self.kind:
                raise MoalignError(
                    f"{path} was written for a different cache (kind {meta.get('kind')!r}, fingerprint "
                    f"{meta.get('fingerprint')} instead of {self.kind!r}, {self.digest}). Delete it and re-run, "
                    "or pass --overwrite to rebuild the whole cache."
                )
            skipped.update(json.loads(meta.get("skipped", "{}")))
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
                "complete": True,
            },
        )
        return self.root


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
        absent = [name for name in self.shard_files if not (self.root / name).is_file()]
        if absent:
            raise MoalignError(
                f"the {what} at {self.root} is damaged: {len(absent)} shard files are gone "
                f"(first: {absent[0]}). Rebuild it with --overwrite."
            )
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

    def _open(self, shard: int) -> tuple[Any, dict[int, list[str]]]:
        """(safe_open handle, {index: [tensor names]}) of a shard, from a small LRU."""
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        handle = safe_open(str(self.root / self.shard_files[shard]), framework="pt")
        names: dict[int, list[str]] = {}
        for key in handle.keys():
            index, name = key.split("/", 1)
            names.setdefault(int(index), []).append(name)
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
        handle, names = self._open(i // self.shard_size)
        return {name: handle.get_tensor(f"{i}/{name}") for name in names.get(i, [])}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.root)!r}, kind={self.kind!r}, items={len(self)}/{self.num_items}, "
            f"skipped={len(self.skipped)}, shards={len(self.shard_files)})"
        )


# ---- datasets into caches --------------------------------------------------------------------------------


def _data_config(dataset: Any) -> dict[str, Any]:
    """The dataset's DataConfig as a dict, minus fields that do not change any clip's content."""
    cfg = dataset.cfg
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    d.pop("skip_bad_videos", None)  # decides whether bad clips raise or are skipped, not what a clip holds
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
    """sha256 (16 hex digits) of a file's bytes, read in 1 MiB blocks: pins weights in a fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """The part of a cache fingerprint that pins the clips: data config, clip count, manifest hash."""
    return {
        "data": _data_config(dataset),
        "num_clips": len(dataset),
        "manifest_sha256": manifest_digest(dataset),
    }


def fill_cache(
    writer: CacheWriter,
    dataset: Any,
    compute: Callable[[dict], dict[str, torch.Tensor]],
    *,
    desc: str,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Compute `compute(dataset[i])` for every item of this process's missing shards and write them.

    An unreadable clip (MoalignError from the dataset) raises, or with ``dataset.cfg.skip_bad_videos`` is
    recorded as skipped with its reason. Errors from `compute` always raise. One process finalizes the cache
    when every shard is present; with several processes, call `finalize_cache` after they are all done.

    Returns:
        The cache folder.
    """
    from tqdm import tqdm

    skip_bad = bool(getattr(dataset.cfg, "skip_bad_videos", False))
    todo = writer.shards_todo(rank, world_size)
    bar = tqdm(total=sum(len(writer.items_of(s)) for s in todo), desc=desc, unit="clip", disable=not progress)
    with bar:
        for shard in todo:
            items: dict[int, dict[str, torch.Tensor]] = {}
            skipped: dict[int, str] = {}
            for index in writer.items_of(shard):
                try:
                    sample = dataset[index]
                except MoalignError as err:  # unreadable video: the only per-clip failure we may skip
                    if not skip_bad:
                        raise
                    skipped[index] = str(err)
                    bar.update(1)
                    continue
                items[index] = compute(sample)
                bar.update(1)
            writer.write_shard(shard, items, skipped, written_by=(rank, world_size))
            if skipped:
                bar.write(
                    f"shard {shard}: skipped {len(skipped)} clip(s), e.g. {next(iter(skipped.values()))}"
                )
    if world_size == 1 and not writer.shards_todo():
        return writer.finalize()
    return writer.root


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
    """Delete a cache folder (for --overwrite); a folder that is not a moalign cache is refused, not deleted."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir() or _read_header(root) is None:
        raise MoalignError(
            f"{root} is not a moalign cache (no {_HEADER}), so --overwrite will not delete it. Pass another --out."
        )
    shutil.rmtree(root)
