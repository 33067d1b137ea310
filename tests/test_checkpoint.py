"""Checkpoint files: round trips, kind checks, atomicity, resumable training state."""

import pytest
import torch

from moalign.errors import MoalignError
from moalign.motion_projector import MotionProjector, MotionProjectorConfig
from moalign.run.checkpoint import (
    list_checkpoints,
    load_module_file,
    load_training_state,
    resolve_resume,
    save_module,
    save_training_checkpoint,
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
    with pytest.raises(MoalignError, match="not a checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
