"""Checkpoint files: round trips, kind checks, atomicity, resumable training state; integrity (checkpoint.json),
identity (config fingerprint), leftovers of killed writes, resumable changes."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from moalign.errors import MoalignError
from moalign.motion_projector import MotionProjector, MotionProjectorConfig
from moalign.run.checkpoint import (
    RESUMABLE_CHANGES,
    check_resume_config,
    config_fingerprint,
    list_checkpoints,
    load_module_file,
    load_training_state,
    resolve_resume,
    restore_training_state,
    save_module,
    save_training_checkpoint,
    training_state,
    verify_checkpoint,
    write_run_config,
)


def test_module_round_trip(tmp_path):
    torch.manual_seed(0)
    m = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
    save_module(tmp_path / "m.safetensors", m, "motion_projector", {"a": 1})
    state, cfg = load_module_file(tmp_path / "m.safetensors", "motion_projector")
    assert cfg == {"a": 1}
    m2 = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
    m2.load_state_dict(state)
    x = torch.randn(1, 2, 2, 2, 8)
    torch.testing.assert_close(m(x), m2(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_wrong_kind_and_bad_files(tmp_path):
    m = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
    save_module(tmp_path / "d.safetensors", m, "flow_decoder", {})
    with pytest.raises(MoalignError, match="expected a 'motion_projector'"):
        load_module_file(tmp_path / "d.safetensors", "motion_projector")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MoalignError, match="junk.safetensors"):
        load_module_file(tmp_path / "junk.safetensors", "motion_projector")
    with pytest.raises(MoalignError, match="not found"):
        load_module_file(tmp_path / "missing.safetensors", "motion_projector")


def test_training_checkpoints_resume_and_limit(tmp_path):
    m = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 1, 1, 1, 8)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        save_training_checkpoint(
            tmp_path,
            step,
            {"motion_projector": (m, "motion_projector", {})},
            {"optimizer": opt.state_dict()},
            limit=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    latest = resolve_resume(tmp_path, "latest")
    assert latest.name == "checkpoint-30"
    state = load_training_state(latest)
    assert state["step"] == 30
    opt2 = torch.optim.AdamW(m.parameters())
    opt2.load_state_dict(state["optimizer"])
    assert resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(MoalignError, match="there is no .*nowhere"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


# ------------------------------------------------------------------------------------------ integrity, identity

CONFIG = {"lr": 1e-3, "lora_rank": 4, "steps": 30, "mixed_precision": "no", "data": {"num_frames": 9}}


def _ckpt(run, step, config=CONFIG, extra=None, partial=None, seed=0):
    torch.manual_seed(seed)
    m = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
    return save_training_checkpoint(
        run, step, {"motion_projector": (m, "motion_projector", {})}, {"x": torch.ones(2)},
        extra=extra, partial=partial, config=config,
    )  # fmt: skip


def _zero_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(16)
    path.write_bytes(bytes(data))


def test_checkpoint_manifest_covers_every_file(tmp_path):
    def loadable(folder):  # stage 2's transformer/ folder: files in a subfolder
        (folder / "transformer").mkdir()
        (folder / "transformer" / "weights.bin").write_bytes(b"w" * 10)

    ckpt = _ckpt(tmp_path, 10, extra=loadable)
    record = json.loads((ckpt / "checkpoint.json").read_text())
    assert sorted(record["files"]) == [
        "motion_projector.safetensors", "training_state.pt", "transformer/weights.bin"
    ]  # fmt: skip
    assert record["files"]["transformer/weights.bin"] == {
        "sha256": hashlib.sha256(b"w" * 10).hexdigest(), "bytes": 10
    }  # fmt: skip
    assert record["config_fingerprint"] == config_fingerprint(CONFIG) and record["step"] == 10
    assert verify_checkpoint(ckpt, CONFIG) is True


def test_latest_skips_a_damaged_checkpoint_and_an_explicit_one_is_refused(tmp_path, capsys):
    for step in (10, 20):
        _ckpt(tmp_path, step)
    _zero_middle(tmp_path / "checkpoint-20" / "motion_projector.safetensors")  # same size, other bytes
    capsys.readouterr()
    assert resolve_resume(tmp_path, "latest", CONFIG) == tmp_path / "checkpoint-10"
    out = capsys.readouterr().out
    assert "skipping checkpoint-20" in out and "motion_projector.safetensors has sha256" in out
    # moved aside: kept to inspect, not listed (nor hashed, nor pruned in place of good ones) again
    assert "moved aside to checkpoint-20.damaged" in out
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-10"]
    assert (tmp_path / "checkpoint-20.damaged" / "training_state.pt").is_file()
    with pytest.raises(
        MoalignError, match=r"--resume .*checkpoint-20.damaged: the checkpoint is damaged.*motion_p"
    ):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-20.damaged"), CONFIG)
    (tmp_path / "checkpoint-10" / "training_state.pt").write_bytes(b"cut")  # truncated: another size
    with pytest.raises(
        MoalignError, match="no checkpoint of .* verifies.*checkpoint-10.*start the run afresh"
    ):
        resolve_resume(tmp_path, "latest", CONFIG)
    assert "training_state.pt is 3 bytes" in capsys.readouterr().out
    assert resolve_resume(tmp_path, "latest", CONFIG) is None  # the same command again: a fresh start


def test_resume_by_name_looks_in_the_run_folder(tmp_path, monkeypatch):
    """`--resume checkpoint-N` (as the docs write it) from any working directory: the run folder's checkpoint."""
    ckpt = _ckpt(tmp_path / "run", 10)
    monkeypatch.chdir(tmp_path)
    assert resolve_resume(tmp_path / "run", "checkpoint-10", CONFIG) == ckpt
    with pytest.raises(
        MoalignError, match=r"--resume checkpoint-30: there is no .*run/checkpoint-30 \(a checkpoint-N"
    ):
        resolve_resume(tmp_path / "run", "checkpoint-30", CONFIG)


def test_a_foreign_checkpoint_is_refused_naming_both(tmp_path):
    other_run = tmp_path / "other"
    foreign = _ckpt(other_run, 10, config={**CONFIG, "lora_rank": 8})
    with pytest.raises(MoalignError) as err:
        resolve_resume(tmp_path / "run", str(foreign), CONFIG)
    msg = str(err.value)
    assert str(foreign) in msg and "lora_rank: 8 -> 4" in msg
    assert config_fingerprint({**CONFIG, "lora_rank": 8}) in msg and config_fingerprint(CONFIG) in msg
    # copied into this run's folder: --resume latest refuses it too (this run's config from RUN/config.json)
    run = tmp_path / "run"
    write_run_config(run, CONFIG, "moalign stage2")
    shutil.copytree(foreign, run / "checkpoint-10")
    with pytest.raises(MoalignError, match="(?s)other settings.*lora_rank: 8 -> 4"):
        resolve_resume(run, "latest")
    # fields a resume may change (lr, mixed precision, steps) do not make a checkpoint foreign
    mine = _ckpt(tmp_path / "mine", 10)
    resumed = {**CONFIG, "lr": 1e-4, "mixed_precision": "bf16", "steps": 60}
    assert resolve_resume(tmp_path / "mine", str(mine), resumed) == mine


def test_a_checkpoint_without_manifest_resumes_with_one_warning(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, 10)
    (ckpt / "checkpoint.json").unlink()  # written by an older moalign
    capsys.readouterr()
    assert resolve_resume(tmp_path, "latest", CONFIG) == ckpt
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "has no checkpoint.json" in out and "unverified" in out


def test_checkpoint_manifest_defaults_to_the_run_config(tmp_path):
    write_run_config(tmp_path, CONFIG, "moalign stage1")
    ckpt = _ckpt(tmp_path, 10, config=None)
    assert json.loads((ckpt / "checkpoint.json").read_text())["config_fingerprint"] == config_fingerprint(
        CONFIG
    )
    with pytest.raises(MoalignError, match="lora_rank: 4 -> 2"):
        verify_checkpoint(ckpt, {**CONFIG, "lora_rank": 2})


def test_killed_checkpoint_write_leaves_nothing_after_the_next_one(tmp_path):
    """A SIGKILL inside a checkpoint write leaves .checkpoint-N.XXXX.tmp; the next checkpoint written removes it,
    and stale partial folders of sharded runs, but not the lock file or a checkpoint's only copy."""
    script = (
        "import os, signal, torch, sys\n"
        "from moalign.run import checkpoint as c\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.torch.save = die\n"
        "c.save_training_checkpoint(__import__('pathlib').Path(sys.argv[1]), 20, {}, {})\n"
    )
    _ckpt(tmp_path, 10)
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-20.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp") and (tmp_path / leftovers[0]).is_dir()
    (tmp_path / ".checkpoint-15.partial" / "accelerate_state").mkdir(parents=True)  # a killed sharded save
    (tmp_path / ".metrics.json.abc.tmp").write_text("{")
    (tmp_path / ".checkpoint-7.old").mkdir()  # checkpoint-7 is gone: the only copy, kept
    (tmp_path / ".moalign.lock").write_text("{}")
    partial = tmp_path / ".checkpoint-20.partial"
    (partial / "accelerate_state").mkdir(parents=True)  # this save's, written by every process
    (partial / "accelerate_state" / "shard.bin").write_bytes(b"s")
    ckpt = _ckpt(tmp_path, 20, partial=partial)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".checkpoint-7.old",
        ".moalign.lock",
    ]
    assert "accelerate_state/shard.bin" in json.loads((ckpt / "checkpoint.json").read_text())["files"]
    assert verify_checkpoint(ckpt, CONFIG)


def test_lr_and_mixed_precision_may_change_on_resume_and_are_recorded(tmp_path):
    write_run_config(tmp_path, CONFIG, "moalign stage2 --lr 1e-3")
    lower = {**CONFIG, "lr": 5e-4, "mixed_precision": "no"}
    check_resume_config(tmp_path, {**lower, "mixed_precision": "bf16"})  # no error: both are resumable
    with pytest.raises(MoalignError, match="lora_rank"):
        check_resume_config(tmp_path, {**CONFIG, "lora_rank": 8})
    write_run_config(tmp_path, lower, "moalign stage2 --lr 5e-4", resumed_at=20)
    write_run_config(tmp_path, {**lower, "steps": 60}, "moalign stage2 --steps 60", resumed_at=30)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["steps"] == 60 and record["resumed"] == [
        {"step": 20, "changes": {"lr": [1e-3, 5e-4]}},
        {"step": 30, "changes": {"steps": [30, 60]}},
    ]
    write_run_config(tmp_path, CONFIG, "moalign stage2")  # a fresh start: no history
    assert "resumed" not in json.loads((tmp_path / "config.json").read_text())


def test_a_lower_learning_rate_takes_effect_on_resume(tmp_path):
    from moalign.run.training import cosine_with_warmup

    def parts(lr):
        m = MotionProjector(MotionProjectorConfig(in_dim=8, dim=4, hidden_dim=6))
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        return m, opt, cosine_with_warmup(opt, 2, 10)

    m, opt, sched = parts(1e-3)
    for _ in range(4):
        opt.step()
        sched.step()
    save_training_checkpoint(tmp_path, 4, {}, training_state(opt, sched), config=CONFIG)
    at_4 = sched.get_last_lr()[0]
    _, opt2, sched2 = parts(5e-4)
    assert restore_training_state(tmp_path / "checkpoint-4", opt2, sched2) == 4
    assert sched2.base_lrs == [5e-4] and opt2.param_groups[0]["lr"] == pytest.approx(at_4 / 2)
    sched.step()
    sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(sched.get_last_lr()[0] / 2)
    _, opt3, sched3 = parts(1e-3)  # the same LR: the state is loaded as it was
    restore_training_state(tmp_path / "checkpoint-4", opt3, sched3)
    assert opt3.param_groups[0]["lr"] == at_4


def test_a_checkpoint_from_before_a_new_setting_still_belongs_to_its_run(tmp_path):
    """A setting added by a newer moalign (absent from the checkpoint's recorded config) is no difference: the
    run ran with its default behaviour. A changed setting the checkpoint knows still is."""
    old_config = {k: v for k, v in CONFIG.items() if k != "lora_rank"}
    ckpt = _ckpt(tmp_path, 10, config=old_config)
    assert resolve_resume(tmp_path, str(ckpt), CONFIG) == ckpt
    changed = {**CONFIG, next(k for k in old_config if k not in RESUMABLE_CHANGES): "something else"}
    with pytest.raises(MoalignError, match="other settings"):
        resolve_resume(tmp_path, str(ckpt), changed)
