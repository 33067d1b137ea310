"""Two runs into one --out: the second is refused at once, naming the first (pid, host, command); a killed
holder never blocks (the kernel drops its lock)."""

import os
import signal
import subprocess
import sys

from moalign.cli import main

HOLD = """
import sys, time
from moalign.run.lock import hold_folder
lock = hold_folder(sys.argv[1], "a training run")
print("held", flush=True)
time.sleep(60)
"""


def _stage2(caches, out):
    return ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(out),
            "--layers", "1", "--steps", "1", "--set", "batch_size=2", "--set", "align.projector.hidden_dim=8",
            "--set", "report_to=none", "--model", "tiny-random", "--quiet"]  # fmt: skip


def test_a_run_folder_in_use_is_refused_naming_its_holder(stage2_caches, tmp_path, capsys):
    caches, run = stage2_caches(8), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_stage2(caches, run)) == 2
        err = capsys.readouterr().err
        assert (
            f"is in use by a training run pid {holder.pid} on host" in err and "choose another --out" in err
        )
        assert sorted(p.name for p in run.iterdir()) == [".moalign.lock"]  # nothing of the second run written
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a crashed or preempted run dies
        holder.wait()
    assert main(_stage2(caches, run)) == 0  # the dead holder's lock file does not block
    assert (run / "metrics.json").is_file()
