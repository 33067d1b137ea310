"""One writer per folder: an exclusive, non-blocking `fcntl.flock` on ``FOLDER/.moalign.lock``.

Two launches writing one run or cache folder would interleave their files. `hold_folder` takes the folder's
lock (creating the lock file) and writes who holds it (pid, host, command line, start time) into it; a second
process asking for the same folder gets a MoalignError naming that holder. The kernel drops a flock when its
process dies (SIGKILL included), so a lock file left behind by a killed run never blocks: it is only a record.
The lock file is never deleted (deleting it would let two processes lock two different files of one name).

Within one process the lock is re-entrant: holding a folder already held by this process shares that lock
(counted), since e.g. a cache is opened by its builder and again by the step that finalizes it.

On systems without `fcntl` (Windows) nothing is locked; a debug line says so.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError
from moalign.run import console

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = console.get_logger(__name__)

LOCK_NAME = ".moalign.lock"

# lock file (resolved) -> [file descriptor, holders in this process]
_held: dict[str, list[int]] = {}


class FolderLock:
    """A held folder lock; `release` (or leaving the ``with`` block, or the process ending) lets it go.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, key: str | None) -> None:
        self.path = path
        self._key = key  # None: nothing was locked (no fcntl)

    def release(self) -> None:
        """Let the lock go (this holder's share of it); calling it again does nothing."""
        key, self._key = self._key, None
        if key is None or key not in _held:
            return
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: os or the dict may be gone; the process end drops it anyway
            pass

    def __repr__(self) -> str:
        return f"FolderLock({str(self.path)!r}, held={self.held})"


def holder_record(what: str) -> dict[str, Any]:
    """What a lock file says about its holder: what it does, pid, host, command line, start time."""
    return {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _describe_holder(path: Path) -> str:
    try:
        rec = json.loads(path.read_text())
        return (
            f"{rec.get('what', 'another moalign process')} pid {rec.get('pid')} on host {rec.get('host')} "
            f"since {rec.get('since')} (command: {rec.get('command')})"
        )
    except (OSError, ValueError, AttributeError):  # the holder has not written its record yet
        return "another process (it has not recorded itself yet)"


def hold_folder(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> FolderLock:
    """Take the exclusive lock of `folder` (created if missing) for this process, without waiting.

    Args:
        folder: the folder to hold (a run folder, a cache folder).
        what: what this process does there, for the message another process gets ("a stage-2 run").
        name: the lock file's name inside the folder (hidden; e.g. one per process of a launch).

    Returns:
        The held lock: `release()` it, use it as a context manager, or let the process end.

    Raises:
        MoalignError: another process holds the folder; the message names it (what, pid, host, start time,
            command) and says to wait for it or choose another --out.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if fcntl is None:
        logger.debug(f"[lock] no fcntl on this system: {folder} is not locked")
        return FolderLock(path, None)
    key = str(path.resolve())
    if key in _held:  # this process holds it already
        _held[key][1] += 1
        return FolderLock(path, key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MoalignError(
            f"{folder} is in use by {_describe_holder(path)}; wait for it to finish or choose another --out"
        ) from None
    except OSError as err:  # a file system without flock (some network mounts): do not block the work
        os.close(fd)
        logger.debug(f"[lock] cannot lock {path} ({err}): {folder} is not locked")
        return FolderLock(path, None)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder_record(what)) + "\n").encode())
    _held[key] = [fd, 1]
    return FolderLock(path, key)
