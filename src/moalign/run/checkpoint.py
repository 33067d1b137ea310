"""Checkpoint and run-folder I/O: module weights as safetensors tagged with their kind and config, training
state (optimizer, step, RNG) for resuming.

Every write is atomic (temporary name, then rename): a killed run leaves the previous checkpoint intact, and
the hidden temporaries it leaves are removed by the next checkpoint written (`remove_temporaries`).

Every checkpoint-N/ ends with ``checkpoint.json``, written last before the folder is renamed into place: the
sha256 and size of every other file in it and the fingerprint of the run's config (`config_fingerprint`).
`resolve_resume` checks both (`verify_checkpoint`): ``--resume latest`` takes the newest checkpoint that
verifies (a damaged one is skipped, said aloud), an explicit checkpoint that does not verify is refused, and
one written by a run with other settings (a foreign checkpoint) is refused naming both. Checkpoints of older
runs, without the file, still resume, with one warning.
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
from moalign.errors import MoalignError, one_line
from moalign.run import console
from moalign.run.atomic import atomic_path, save_safetensors, write_json
from moalign.run.digest import file_sha256

logger = console.get_logger(__name__)  # messages once per launch (the main process)

ACCELERATE_STATE = "accelerate_state"  # in checkpoint-N/ of DeepSpeed / FSDP runs: accelerate's sharded state


KIND_KEY = "moalign_kind"


CONFIG_KEY = "moalign_config"


CHECKPOINT_MANIFEST = (
    "checkpoint.json"  # in checkpoint-N/: every file's sha256 and size, the config fingerprint
)


class DamagedCheckpoint(MoalignError):
    """A checkpoint whose files are missing, unreadable or differ from its checkpoint.json."""


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
    resumed_at: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Write RUN/config.json (`name`; an encoder folder, whose config.json is the model's, uses run_config.json):
    the resolved config plus version, git commit, the command that made the run and the launch it runs under
    (`moalign.run.launch.launch_record`: processes, engine, per-process batch; the latest launch, when a run is
    resumed under another one).

    Args:
        resumed_at: the step a resumed run continues from (None or 0: a fresh start). A resumed run keeps the
            record's ``"resumed"`` list and, when this config differs from the one on disk (only fields in
            RESUMABLE_CHANGES can: `check_resume_config`), appends ``{"step": N, "changes": {key: [old, new]}}``
            (dotted keys), so the folder says which settings held from which step.
        inputs: what the run trains from, by content (e.g. stage 2's {"latents": Cache.digest, "targets": ...}),
            recorded as ``"inputs"``; `check_resume_inputs` refuses a resume onto other ones.
    """
    record = {
        "command": command,
        "moalign_version": __version__,
        "git_commit": git_commit(),
        "config": config,
    }
    if launch is not None:
        record["launch"] = launch
    if inputs is not None:
        record["inputs"] = inputs
    if resumed_at:
        old = _read_run_record(run_dir / name)
        history = list(old.get("resumed") or [])
        changes = _changes(old.get("config"), config) if "config" in old else {}
        if changes:
            history.append({"step": resumed_at, "changes": changes})
        if history:
            record["resumed"] = history
    write_json(run_dir / name, record)


def _read_run_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _changes(old: Any, new: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [old, new]} of every (nested) config field that differs."""
    from moalign.data.cache import _flatten, _normalise

    a, b = _flatten(_normalise(old or {})), _flatten(_normalise(new))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


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
    config: dict[str, Any] | None = None,
) -> Path:
    """Write RUN/checkpoint-{step}/ atomically: one safetensors per trainable module plus training_state.pt, and
    last checkpoint.json (every file's sha256 and size, the config fingerprint: `verify_checkpoint`).

    Call it on the main process only. After the checkpoint is in place, hidden leftovers of killed writes in
    `run_dir` are removed (`remove_temporaries`).

    Args:
        modules: file stem -> (module or dict of tensors, kind, config) for `save_module`.
        training_state: optimizer/scheduler state dicts, step, RNG; loaded back with weights_only=True.
        limit: keep at most this many checkpoint folders (oldest removed first).
        partial: a hidden folder other processes already wrote into (accelerate's sharded state); it is
            completed and renamed into place, so the checkpoint still appears at once or not at all.
        extra: called with the folder before it is renamed into place, to write the checkpoint's weights in the
            form people load (stage 2: pytorch_lora_weights.safetensors or transformer/).
        config: the run's config (as in RUN/config.json), fingerprinted into checkpoint.json; None: read from
            RUN/config.json (no fingerprint when there is none).
    """
    final = run_dir / f"checkpoint-{step}"
    if config is None:
        config = _read_run_record(Path(run_dir) / "config.json").get("config")

    def fill(folder: Path) -> None:
        for stem, (module, kind, module_config) in modules.items():
            save_module(folder / f"{stem}.safetensors", module, kind, module_config)
        torch.save({"step": step, **training_state}, folder / "training_state.pt")
        if extra is not None:
            extra(folder)
        write_checkpoint_manifest(folder, step, config)  # last: it covers every file written above

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
    remove_temporaries(run_dir)
    return final


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Remove the hidden leftovers of killed writes in a run folder; returns what was removed.

    Removed: atomic writes' temporaries (``.*.tmp``: ``.checkpoint-N.XXXX.tmp`` folders, ``.metrics.json.XXXX.tmp``
    files), sharded checkpoints' ``.checkpoint-N.partial`` folders, and ``.checkpoint-N.old`` folders whose
    ``checkpoint-N`` is in place (else the old one is the only copy: kept).

    Call it on the main process only, when no process of the launch writes into a partial folder: when the run
    starts (before its first checkpoint) or right after a checkpoint is in place (`save_training_checkpoint`,
    which other processes wait for before they write the next one).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in run_dir.iterdir():
        name = p.name
        stale = name.startswith(".") and (
            name.endswith(".tmp")
            or re.fullmatch(r"\.checkpoint-\d+\.partial", name) is not None
            or (re.fullmatch(r"\.checkpoint-\d+\.old", name) is not None and (run_dir / name[1:-4]).is_dir())
        )
        if not stale:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        logger.info(
            f"[run] removed {len(removed)} leftover(s) of killed writes in {run_dir}: {removed[0].name} ..."
        )
    return removed


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of a run config without the fields a resume may change (RESUMABLE_CHANGES): equal
    for every checkpoint of one run, different for a run with other settings."""
    from moalign.data.cache import fingerprint_digest

    return fingerprint_digest(_fixed(config))


def _fixed(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def write_checkpoint_manifest(folder: Path, step: int, config: dict[str, Any] | None) -> Path:
    """Write ``folder/checkpoint.json``: step, sha256 and size of every other file under `folder` (relative
    POSIX paths, recursively), and the config with its fingerprint (None without a config)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != CHECKPOINT_MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    record = {
        "step": step,
        "config_fingerprint": None if config is None else config_fingerprint(config),
        "config": None if config is None else _fixed(config),
        "files": files,
    }
    path = folder / CHECKPOINT_MANIFEST
    write_json(path, record)
    return path


def verify_checkpoint(ckpt: Path, config: dict[str, Any] | None = None) -> bool:
    """Check a checkpoint-N folder against its checkpoint.json.

    Args:
        ckpt: the checkpoint folder.
        config: this run's config; its fingerprint must be the checkpoint's (fields in RESUMABLE_CHANGES may
            differ). None: not checked.

    Returns:
        True when it verifies; False when it has no checkpoint.json (written before checkpoints had one).

    Raises:
        DamagedCheckpoint: a listed file is missing, of another size or sha256, or checkpoint.json is unreadable;
            the message names the file and what is wrong.
        MoalignError: the checkpoint was written by a run with other settings; the message lists them
            (checkpoint -> this run) and names both fingerprints.
    """
    from moalign.data.cache import diff_fingerprints

    ckpt = Path(ckpt)
    path = ckpt / CHECKPOINT_MANIFEST
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"{path} is unreadable ({one_line(err)})") from err
    for name, entry in files.items():
        file = ckpt / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} is missing (listed in {CHECKPOINT_MANIFEST})")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise DamagedCheckpoint(
                f"{file} is {size} bytes, {CHECKPOINT_MANIFEST} says {entry.get('bytes')}"
            )
        try:
            digest = file_sha256(file)
        except OSError as err:
            raise DamagedCheckpoint(f"{file} cannot be read ({err})") from err
        if digest != entry.get("sha256"):
            raise DamagedCheckpoint(
                f"{file} has sha256 {digest[:16]}..., {CHECKPOINT_MANIFEST} says {str(entry.get('sha256'))[:16]}..."
            )
    theirs = record.get("config_fingerprint")
    recorded = record.get("config")
    # settings added by a newer moalign than the checkpoint's are no difference (`_known_to`)
    mine = _known_to(recorded, _fixed(config)) if isinstance(recorded, dict) and config is not None else None
    if config is not None and theirs is not None and theirs != config_fingerprint(mine or config):
        diffs = diff_fingerprints(recorded or {}, mine or _fixed(config))
        listing = "\n  ".join(diffs) or "(the configs differ in a field that is not listed)"
        raise MoalignError(
            f"{ckpt} was written by a run with other settings (config fingerprint {theirs}, this run's "
            f"{config_fingerprint(config)}); checkpoint -> this run:\n  {listing}\nIt is not a checkpoint of this "
            "run: resume from one of this run's checkpoints (move the foreign one out of the run folder), or "
            "continue that checkpoint with the settings it was trained with in a new --out."
        )
    return True


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
    run_dir: Path,
    resume: str | None,
    stage: str,
    steps: int | None = None,
    config: dict[str, Any] | None = None,
    resolved: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """The metrics of a finished run in `run_dir` when `--resume latest` finds one (nothing left to do), else None.

    A run folder is never overwritten without being asked: a finished run, or an unfinished one with
    checkpoints, is an error without --resume. So one launch command with `--resume latest` can be repeated
    after a kill, and after the end, safely. A finished run asked for more `steps` is extended from the
    checkpoint of its last step (every run checkpoints its last step); the change of LR schedule is stated.
    Fewer steps, or a run without that checkpoint, is an error naming the checkpoint to continue from.
    With `config`, a finished run asked again with other settings is refused listing them (`check_resume_config`;
    `resolved`: dotted fields the run resolves later, e.g. stage 1's projector.in_dim, not compared).
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
    if config is not None:  # "nothing to do" only for the same settings
        check_resume_config(run_dir, config, ignore=resolved)
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


# config fields a resumed run may change: how long, how often it logs, checkpoints and validates, and the two
# remedies a non-finite loss advises (a lower learning rate, fp32: run/training.py NONFINITE_FIX)
RESUMABLE_CHANGES = (
    "lr", "mixed_precision", "steps", "log_every", "checkpoint_every", "checkpoint_limit", "val_every", "validate_every", "report_to",
    "probe_clips", "license",
    "validation_prompts", "validation_frames", "validation_size", "validation_steps",
)  # fmt: skip


def _known_to(old: Any, new: Any) -> Any:
    """`new` without the (nested) fields `old` lacks: settings a newer moalign added after the run was started,
    which that run ran with at their default behaviour, are no difference to refuse a resume for."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    return {k: _known_to(old[k], v) for k, v in new.items() if k in old}


def check_resume_config(run_dir: Path, config: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a run with other settings than it was started with (RUN/config.json), listing them.

    Only the fields in RESUMABLE_CHANGES may differ (RUN/config.json records those changes and the step they
    took effect at: `write_run_config`); anything else (batch, layers, data, caches) would make the resumed run
    a different experiment than its folder says.
    """
    from moalign.data.cache import diff_fingerprints

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    old = _fixed(json.loads(path.read_text()).get("config", {}))
    new = _known_to(old, _fixed(config))
    diffs = [d for d in diff_fingerprints(old, new) if d.split(":", 1)[0] not in ignore]
    if diffs:
        listing = "\n  ".join(diffs)
        raise MoalignError(
            f"cannot resume {run_dir}: it was started with other settings (run folder -> this command):\n"
            f"  {listing}\nRe-run with the run's settings (see {path}), or choose a new --out."
        )


def check_resume_inputs(run_dir: Path, inputs: dict[str, Any] | None) -> None:
    """Refuse to resume a run on other inputs than it was started on (RUN/config.json's "inputs", by content:
    e.g. a targets cache of another teacher, or latents of other clips, at the same path); a run folder from
    before inputs were recorded is not checked.

    Raises:
        MoalignError: naming each input that changed.
    """
    old = _read_run_record(Path(run_dir) / "config.json").get("inputs")
    if not inputs or not isinstance(old, dict):
        return
    changed = [f"{k}: {old.get(k)} -> {v}" for k, v in inputs.items() if k in old and old.get(k) != v]
    if changed:
        raise MoalignError(
            f"cannot resume {run_dir}: it was trained on other inputs (run folder -> this command, by content):\n  "
            + "\n  ".join(changed)
            + "\nPass the caches the run was started with (see its config.json: command), or choose a new --out."
        )


def resolve_resume(run_dir: Path, resume: str | None, config: dict[str, Any] | None = None) -> Path | None:
    """The checkpoint-N folder to continue from, verified (`verify_checkpoint`); None: a fresh start.

    Args:
        run_dir: the run folder.
        resume: None (a fresh start), "latest" (the newest checkpoint that verifies; None when the run has no
            checkpoint) or a checkpoint folder.
        config: this run's config, which the checkpoint's fingerprint must match; None: the config in
            RUN/config.json (not checked when there is none).

    Raises:
        MoalignError: an explicit checkpoint that is not one, is damaged or foreign; with "latest", a newest
            verifying checkpoint that is foreign, or checkpoints of which none verifies. A damaged checkpoint
            that "latest" skips for an older one is said in a warning naming the file and what is wrong; a
            checkpoint without checkpoint.json (an older run's) resumes with a warning.
    """
    if resume is None:
        return None
    if config is None:
        config = _read_run_record(Path(run_dir) / "config.json").get("config")
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        damaged = []
        for ckpt in reversed(ckpts):
            try:
                _verified(ckpt, config)
            except DamagedCheckpoint as err:
                damaged.append(ckpt)
                aside = _move_aside(ckpt)
                moved = (
                    f" (moved aside to {aside.name}: it is neither resumed nor counted again)"
                    if aside
                    else ""
                )
                logger.warning(f"[resume] skipping {ckpt.name}: {err}{moved}; trying the one before it")
                continue
            return ckpt
        if damaged:
            raise MoalignError(
                f"no checkpoint of {run_dir} verifies ({', '.join(p.name for p in damaged)}: see the warnings "
                "above; each was moved aside to NAME.damaged). Run the same command again to start the run "
                "afresh in this folder, or choose a new --out."
            )
        return None
    path = Path(resume)
    if not path.exists() and re.fullmatch(r"checkpoint-\d+", resume):  # a name: the run folder's checkpoint
        path = Path(run_dir) / resume
    if not path.exists():
        raise MoalignError(
            f"--resume {resume}: there is no {path} (a checkpoint-N name is looked up in the run folder "
            f"{run_dir}; else pass the folder's path, or --resume latest)"
        )
    if not (path / "training_state.pt").is_file():
        raise MoalignError(f"--resume {resume}: {path} is not a checkpoint-N folder (no training_state.pt)")
    try:
        _verified(path, config)
    except DamagedCheckpoint as err:
        raise MoalignError(
            f"--resume {resume}: the checkpoint is damaged: {err}. Resume from another checkpoint (or --resume "
            "latest, which takes the newest one that verifies)."
        ) from err
    return path


def _move_aside(ckpt: Path) -> Path | None:
    """Rename a damaged checkpoint-N to checkpoint-N.damaged (kept to inspect; `list_checkpoints` no longer
    lists it, so it is not hashed again at every resume, and the checkpoint limit prunes good ones only); by the
    launch's main process (RANK 0) only. None when it was not moved."""
    if not console.is_main_process():
        return None
    aside = ckpt.with_name(f"{ckpt.name}.damaged")
    try:
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(ckpt, aside)
    except OSError:
        return None
    return aside


def _verified(ckpt: Path, config: dict[str, Any] | None) -> None:
    """`verify_checkpoint`, with the one warning for a checkpoint written before checkpoint.json existed."""
    if not verify_checkpoint(ckpt, config):
        logger.warning(
            f"[resume] {ckpt} has no {CHECKPOINT_MANIFEST} (written by an older moalign): resuming it unverified"
        )


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """Load training_state.pt with weights_only=True (no arbitrary code from an untrusted file)."""
    try:
        return torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise MoalignError(
            f"cannot read {ckpt / 'training_state.pt'}: {one_line(err)}. Delete this checkpoint folder."
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
    step.

    A learning rate changed on resume (RESUMABLE_CHANGES) takes effect: the scheduler is built with this run's
    base LR before the call, and the schedule continues from the checkpoint's step at the new base (the current
    LR scaled by new / old), said in the log.
    """
    state = load_training_state(ckpt)
    new_base = list(getattr(scheduler, "base_lrs", []))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    _apply_new_lr(scheduler, new_base, state["step"])
    return state["step"]


def _apply_new_lr(scheduler: Any, new_base: list[float], step: int) -> None:
    """Make the scheduler (and its optimizer) run at base LRs `new_base` after loading an older run's state."""
    old_base = list(getattr(scheduler, "base_lrs", []))
    if not new_base or len(new_base) != len(old_base) or new_base == old_base:
        return
    scheduler.base_lrs = list(new_base)
    groups = scheduler.optimizer.param_groups
    for group, new, old in zip(groups, new_base, old_base, strict=False):
        group["initial_lr"] = new
        group["lr"] = group["lr"] * new / old if old else new
    scheduler._last_lr = [g["lr"] for g in groups]
    logger.info(f"[resume] learning rate {old_base[0]:g} -> {new_base[0]:g} from step {step}")
