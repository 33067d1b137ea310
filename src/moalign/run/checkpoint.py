"""Checkpoint and run-folder I/O: module weights as safetensors tagged with their kind and config, training
state (optimizer, step, RNG) for resuming.

Every write is atomic (temporary name, then rename): a killed run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moalign import __version__
from moalign.errors import MoalignError
from moalign.run import console
from moalign.run.atomic import atomic_path, save_safetensors, write_json

logger = console.get_logger(__name__)  # messages once per launch (the main process)

ACCELERATE_STATE = "accelerate_state"  # in checkpoint-N/ of DeepSpeed / FSDP runs: accelerate's sharded state


KIND_KEY = "moalign_kind"


CONFIG_KEY = "moalign_config"


def save_module(
    path: str | os.PathLike, module: nn.Module | dict[str, torch.Tensor], kind: str, config: dict[str, Any]
) -> None:
    """Atomically save a module's state dict (or a dict of tensors) as safetensors, tagged with kind and config."""
    metadata = {KIND_KEY: kind, CONFIG_KEY: json.dumps(config), "moalign_version": __version__}
    tensors = module.state_dict() if isinstance(module, nn.Module) else module
    save_safetensors(path, tensors, metadata=metadata)


def load_module_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by `save_module`, checking it holds the expected kind.

    Returns:
        (state_dict, config) where config is the dict given to `save_module`.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MoalignError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise MoalignError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or not a checkpoint"
        ) from err
    found = meta.get(KIND_KEY)
    if found != kind:
        raise MoalignError(
            f"{path} holds {'a ' + repr(found) if found else 'no moalign'} checkpoint, expected a {kind!r} one. "
            f"Pass the file or run folder written by the stage that makes a {kind!r}."
        )
    return state, json.loads(meta.get(CONFIG_KEY, "{}"))


def git_commit() -> str | None:
    """The git commit of the moalign checkout, when installed from one (recorded in every run folder)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_config(
    run_dir: Path,
    config: dict[str, Any],
    command: str,
    launch: dict[str, Any] | None = None,
    name: str = "config.json",
) -> None:
    """Write RUN/config.json (`name`; an encoder folder, whose config.json is the model's, uses run_config.json): the resolved config plus version, git commit, the command that made the run and
    the launch it runs under (`moalign.run.launch.launch_record`: processes, engine, per-process batch; the
    latest launch, when a run is resumed under another one)."""
    record = {
        "command": command,
        "moalign_version": __version__,
        "git_commit": git_commit(),
        "config": config,
    }
    if launch is not None:
        record["launch"] = launch
    write_json(run_dir / name, record)


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states (CPU, and CUDA when present)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, tuple[nn.Module | dict[str, torch.Tensor], str, dict[str, Any]]],
    training_state: dict[str, Any],
    limit: int | None = None,
    partial: Path | None = None,
    extra: Any = None,
) -> Path:
    """Write RUN/checkpoint-{step}/ atomically: one safetensors per trainable module plus training_state.pt.

    Args:
        modules: file stem -> (module or dict of tensors, kind, config) for `save_module`.
        training_state: optimizer/scheduler state dicts, step, RNG; loaded back with weights_only=True.
        limit: keep at most this many checkpoint folders (oldest removed first).
        partial: a hidden folder other processes already wrote into (accelerate's sharded state); it is
            completed and renamed into place, so the checkpoint still appears at once or not at all.
        extra: called with the folder before it is renamed into place, to write the checkpoint's weights in the
            form people load (stage 2: pytorch_lora_weights.safetensors or transformer/).
    """
    final = run_dir / f"checkpoint-{step}"

    def fill(folder: Path) -> None:
        for stem, (module, kind, config) in modules.items():
            save_module(folder / f"{stem}.safetensors", module, kind, config)
        torch.save({"step": step, **training_state}, folder / "training_state.pt")
        if extra is not None:
            extra(folder)

    if partial is None:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            fill(tmp)
    else:
        fill(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    if limit is not None:
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_transformer(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Atomically write a diffusers model folder (`from_pretrained` loads it).

    Args:
        state: the weights, when the module's own are sharded across processes (gathered by accelerate);
            None: the module's own.
    """
    with atomic_path(path) as tmp:
        if state is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            tmp.mkdir()
            model.save_config(tmp)
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(tmp / "diffusion_pytorch_model.safetensors"),
            )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders of a run, oldest first."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "training_state.pt").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def finished_run(
    run_dir: Path, resume: str | None, stage: str, steps: int | None = None
) -> dict[str, Any] | None:
    """The metrics of a finished run in `run_dir` when `--resume latest` finds one (nothing left to do), else None.

    A run folder is never overwritten without being asked: a finished run, or an unfinished one with
    checkpoints, is an error without --resume. So one launch command with `--resume latest` can be repeated
    after a kill, and after the end, safely. A finished run asked for more `steps` is extended from the
    checkpoint of its last step (every run checkpoints its last step); the change of LR schedule is stated.
    Fewer steps, or a run without that checkpoint, is an error naming the checkpoint to continue from.
    """
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        if resume is None and list_checkpoints(run_dir):
            raise MoalignError(
                f"{run_dir} holds checkpoints of an unfinished {stage} run; add --resume latest to continue it, "
                "or choose a new --out"
            )
        return None
    if resume is None:
        raise MoalignError(
            f"{run_dir} holds a finished {stage} run; choose a new --out (or --resume latest, which stops "
            "at once as there is nothing left to do)"
        )
    if resume != "latest":  # an explicit checkpoint-N: train again from there, as asked
        return None
    metrics = json.loads(path.read_text())
    finished = metrics.get("steps")
    if steps is not None and finished != steps:
        ckpts = list_checkpoints(run_dir)
        last = _checkpoint_step(ckpts[-1]) if ckpts else None
        if isinstance(finished, int) and steps > finished and last is not None and last >= finished:
            logger.info(
                f"[{stage.replace('-', '')}] extending the finished run {run_dir} from {finished} to {steps} "
                f"steps from {ckpts[-1].name}: the warm-up + cosine LR schedule is recomputed for {steps} steps "
                "(the learning rate at the resumed step is the longer schedule's, higher than where the run "
                "ended); its outputs are rewritten at the end"
            )
            return None
        further = (
            f"continue from one of its checkpoints with --resume {ckpts[-1]} (its outputs are rewritten), or "
            if ckpts
            else ""
        )
        shorter = "" if not isinstance(finished, int) or steps > finished else " (fewer steps than it ran)"
        raise MoalignError(
            f"{run_dir} is a finished {stage} run of {finished} steps and this command asks for "
            f"{steps}{shorter}: --resume latest extends a finished run only to more steps from the checkpoint of "
            f"its last step, which this run has not; {further}choose a new --out"
        )
    logger.info(f"[{stage.replace('-', '')}] {run_dir} is finished ({finished} steps); nothing to do")
    return metrics


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


# config fields a resumed run may change: how long, how often it logs, checkpoints and validates
RESUMABLE_CHANGES = (
    "steps", "log_every", "checkpoint_every", "checkpoint_limit", "val_every", "validate_every", "report_to",
    "probe_clips", "license",
    "validation_prompts", "validation_frames", "validation_size", "validation_steps",
)  # fmt: skip


def check_resume_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume a run with other settings than it was started with (RUN/config.json), listing them.

    Only the fields in RESUMABLE_CHANGES may differ; anything else (learning rate, batch, layers, data) would
    make the resumed run a different experiment than its folder says.
    """
    from moalign.data.cache import diff_fingerprints

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    old = {
        k: v for k, v in json.loads(path.read_text()).get("config", {}).items() if k not in RESUMABLE_CHANGES
    }
    new = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    diffs = diff_fingerprints(old, new)
    if diffs:
        listing = "\n  ".join(diffs)
        raise MoalignError(
            f"cannot resume {run_dir}: it was started with other settings (run folder -> this command):\n"
            f"  {listing}\nRe-run with the run's settings (see {path}), or choose a new --out."
        )


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume latest` -> newest checkpoint-N of the run (None when there is none: a fresh start); a path is
    checked."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "training_state.pt").is_file():
        raise MoalignError(f"--resume {resume}: {path} is not a checkpoint-N folder (no training_state.pt)")
    return path


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """Load training_state.pt with weights_only=True (no arbitrary code from an untrusted file)."""
    try:
        return torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise MoalignError(
            f"cannot read {ckpt / 'training_state.pt'}: {err}. Delete this checkpoint folder."
        ) from err


def training_state(optimizer: torch.optim.Optimizer | None, scheduler: Any) -> dict[str, Any]:
    """What a checkpoint needs to resume exactly: optimizer, LR scheduler and RNG states (no optimizer when
    accelerate's sharded state holds it)."""
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def restore_training_state(ckpt: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any) -> int:
    """Load a checkpoint's training_state.pt into the optimizer (unless None), scheduler and RNGs; returns its
    step."""
    state = load_training_state(ckpt)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]
