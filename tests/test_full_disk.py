"""A disk that refuses bytes (full, over quota, or the file size limit): the command stops with one line naming
the file, how much was written and how much is free, and leaves nothing half-written.

A real refusal comes from the file size limit (RLIMIT_FSIZE, `ulimit -f`) in a child process; a full disk
cannot be made without root, so its errors (OSError ENOSPC, safetensors' "os error 28", torch.save's
"enforce fail at inline_container.cc") are raised where the writers raise them.
"""

import errno
import resource
import signal
import subprocess
import sys

import pytest
import torch
from launcher import ENV, REPO, RUN_CLI

from moalign.errors import MoalignError
from moalign.run import atomic
from moalign.run.checkpoint import save_training_checkpoint


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_synth_past_the_file_size_limit_names_the_file(tmp_path):
    out = tmp_path / "data"
    argv = ["moalign", "synth", "--out", str(out), "--num-clips", "2", "--num-frames", "9", "--height", "64",
            "--width", "64", "--quiet"]  # fmt: skip
    done = subprocess.run([sys.executable, str(RUN_CLI), *argv], env=ENV, cwd=REPO, capture_output=True,
                          text=True, preexec_fn=_limit_file_size)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("moalign synth: error: could not write ") and str(out) in line, line
    assert "file size limit" in line and "MB are free there" in line and "run the same command again" in line
    assert "ulimit -f unlimited" in line  # the fix for this cause, not "free space"
    assert "Traceback" not in done.stderr
    assert not [p for p in out.rglob(".*.tmp")]  # nothing half-written


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_in_a_checkpoint_write_names_the_checkpoint(raised, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise raised

    monkeypatch.setattr(torch, "save", full)
    state = {"w": torch.zeros(4)}
    with pytest.raises(
        MoalignError, match=r"could not write .*checkpoint-3: .*full|could not write .*write failed"
    ):
        save_training_checkpoint(tmp_path, 3, {"m": (state, "m", {})}, {"x": 1})
    assert list(tmp_path.iterdir()) == []  # no checkpoint-3, no hidden temporary


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not a write failure"):
        with atomic.atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
            raise ValueError("not a write failure")
    assert list(tmp_path.iterdir()) == []
