"""Launch `moalign` in fresh processes as users do: one plain process, or `accelerate launch` with one of the
repository's accelerate configs (configs/accelerate/*.yaml) and 2 CPU processes, optionally SIGKILLed at a chosen
call (tests/run_cli.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_CLI = Path(__file__).with_name("run_cli.py")
# one thread per process: the processes and the one-process references then add in the same order, and two
# processes do not fight over the two cores; no GPU, and none of the CPU flags a user might have exported
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_", "FSDP_"))},
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_moalign(
    argv: list[str],
    engine: str | None = None,
    kill: tuple[str, int] | None = None,
    processes: int = 2,
    signal: tuple[str, int, str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`moalign ARGV` in one process (engine None) or under `accelerate launch --config_file
    configs/accelerate/ENGINE.yaml --num_processes PROCESSES`, from the repository root (the configs name their
    DeepSpeed JSONs relative to it); with kill=(MODULE.ATTR, N) every process is SIGKILLed at that call; with
    signal=(MODULE.ATTR, N, SIGNAME) the process sends itself that signal there (env SIGNAL_RANK=r: process r only)."""
    options = ["--kill", kill[0], str(kill[1])] if kill else []
    if signal:
        options = ["--signal", signal[0], str(signal[1]), signal[2]]
    script = [str(RUN_CLI), *options, "moalign", *argv]
    if engine is None:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *script]  # fmt: skip
    return subprocess.run(cmd, env={**ENV, **(env or {})}, cwd=REPO, capture_output=True, text=True)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`done`, after asserting it exited 0 (the output's tails shown when it did not)."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def stage2_weights(run: Path) -> dict:
    """A finished full fine-tune's weights: the transformer's and P_zeta's (prefixed "aligner.")."""
    from safetensors.torch import load_file

    return {
        **load_file(run / "transformer" / "diffusion_pytorch_model.safetensors"),
        **{f"aligner.{k}": v for k, v in load_file(run / "align_projector.safetensors").items()},
    }


def max_gap(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts of the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
