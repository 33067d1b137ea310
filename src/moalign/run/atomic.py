"""Atomic file writes: write to a temporary name beside the target, then rename.

A crash (or SIGKILL) at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed over `path`.

    Works for a file or a folder written at the yielded path. On error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (file or folder)
    try:
        yield tmp
        if tmp.is_dir():
            _apply_umask(tmp)  # save_pretrained's safetensors files inside come out 0600 too
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            # the permissions any new file gets here (umask): some writers (safetensors) create theirs 0600
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException as err:
        written = _size(tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        failed = write_failure(path, err, written)
        if failed is not None:
            raise failed from err
        raise


# what the writers say when the file system refuses bytes: OSError errno, safetensors' Rust io error text,
# torch.save's PyTorchStreamWriter ("enforce fail at inline_container.cc ... unexpected pos" / "file write failed")
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_LIMIT_TEXT = ("File too large", "os error 27")
_WRITER_TEXT = ("inline_container.cc", "file write failed")


def write_failure(
    path: str | os.PathLike, err: BaseException, written: int | None = None
) -> Exception | None:
    """A `MoalignError` naming `path`, how much was written and how much space is free, when `err` is the file
    system refusing bytes (a full disk, a quota, the file size limit); None for any other error.

    Args:
        path: the file or folder being written.
        err: what the writer raised.
        written: bytes written before it failed (None: unknown).
    """
    from moalign.errors import MoalignError

    text = str(err)
    code = getattr(err, "errno", None)
    fix = "free space (or choose an --out on a larger disk)"
    if code == errno.EFBIG or any(t in text for t in _LIMIT_TEXT):
        why = "the file size limit of this shell (`ulimit -f`) was reached"
        fix = "raise the limit (`ulimit -f unlimited`, or ask your scheduler for a larger file size limit)"
    elif code in _FULL or any(t in text for t in _FULL_TEXT):
        why = "the disk (or your quota) is full"
    elif isinstance(err, RuntimeError) and any(t in text for t in _WRITER_TEXT):
        why = "the write failed (a full disk, a quota or the file size limit)"
    else:
        return None
    path = Path(path)
    free = _free(path.parent)
    done = f"{_mb(written)} of it were written before it failed" if written else "nothing of it was written"
    where = f"; {_mb(free)} are free there" if free is not None else ""
    return MoalignError(
        f"could not write {path}: {why}; {done}{where}. Nothing half-written was kept: {fix} and run the same "
        "command again"
    )


def _size(path: Path) -> int:
    """Bytes in a file or folder (0 when it is missing)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.exists() else 0
    except OSError:
        return 0


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def _apply_umask(folder: Path) -> None:
    """Give every file under `folder` the permissions a new file gets here (0666 & ~umask) and every folder
    0777 & ~umask (mkdtemp-like writers make theirs 0700, safetensors its files 0600): caches, checkpoints and
    model folders on a shared cluster's group folder stay readable by the group the umask allows."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf: an undefined metric) as None, which JSON writes as null.

    JSON has no NaN or Infinity: Python's json module writes them anyway, and other readers (jq, JavaScript,
    pandas with strict parsing) then refuse the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a JSON file (indented, keys in insertion order; NaN and inf as null, see `json_safe`)."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Atomically write a JSON-lines file, one object a line (NaN and inf as null)."""
    write_text(path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows))


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
