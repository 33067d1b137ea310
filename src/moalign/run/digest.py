"""Content hashing: sha256 of files and folders, streamed, memoised per process.

What a cache or checkpoint depends on (the teacher's and encoder's weights, a RAFT file, the shards of a cache,
the files of a checkpoint) is pinned by the sha256 of its bytes, not by its path: a file replaced at the same
path changes the digest. A big weights file is hashed once per process: the memo is keyed on
(resolved path, size, mtime_ns), so a file rewritten in place (new mtime or size) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 20  # 1 MiB reads: streaming, a file is never held in memory whole

_memo: dict[tuple[str, int, int], str] = {}


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 (64 hex digits) of a file's bytes, read in 1 MiB blocks; memoised per process.

    Raises:
        OSError: the file cannot be read (callers turn it into a MoalignError naming the file).
    """
    path = Path(path)
    key = _key(path)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name relative to `path`, file) of a file, or of every file under a folder, in a stable order."""
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()]
        return sorted((p.relative_to(path).as_posix(), p) for p in found)
    return [(path.name, path)]


def content_digest(paths: str | os.PathLike | Iterable[str | os.PathLike], length: int = 16) -> str:
    """sha256 (first `length` hex digits) over the files of one or more paths, in a stable order.

    Each path is a file or a folder (every file under it, sorted by relative path). The digest covers each
    file's name relative to its path and its bytes' sha256 (`file_sha256`, memoised), so it does not change when
    a folder is moved, and changes when any file is added, removed, renamed or rewritten.

    Args:
        paths: a file, a folder, or several of them (their order matters).
        length: hex digits kept (64: the whole sha256).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    h = hashlib.sha256()
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"cannot hash {path}: it does not exist")
        for name, file in _files(path):
            h.update(f"{name}\0{file_sha256(file)}\n".encode())
    return h.hexdigest()[:length]


def tensors_digest(tensors: dict, length: int = 16) -> str:
    """sha256 (first `length` hex digits) of a state dict: names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


# the files of a transformers / diffusers model folder that decide its outputs (not e.g. a run record)
MODEL_FILES = (
    "config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json",
)  # fmt: skip


def model_digest(model: str | os.PathLike | None, subfolders: tuple[str, ...] = ("",)) -> str | None:
    """sha256 (16 hex digits) of a model's content: the config and weights files (`MODEL_FILES`) of a local
    folder's `subfolders` ("" is the folder itself; e.g. ("vae", "text_encoder") of a diffusers pipeline).

    A hub id is pinned by the commit of its snapshot in the local Hub cache ("hub:COMMIT"); None when `model` is
    neither a folder nor a cached hub id (nothing to pin: the path or id alone then identifies it).
    """
    if model is None:
        return None
    folder = Path(model).expanduser()
    if folder.is_dir():
        files = sorted(
            {
                f
                for sub in subfolders
                for pattern in MODEL_FILES
                for f in (folder / sub).glob(pattern)
                if f.is_file()
            }
        )
        return content_digest(files) if files else None
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(str(model), local_files_only=True)
    except Exception:  # not cached, not a hub id, offline: nothing to pin
        return None
    return f"hub:{Path(snapshot).name}"
