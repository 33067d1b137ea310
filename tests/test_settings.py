"""Settings refused before any work: one line naming the field and its valid range, exit 2, no run folder.

Each case is a value users have passed (a step count of 0 used to save an untrained model as finished; --lambda
1e38 overflowed the gradient norm, so clipping zeroed every update and the "trained" LoRA equalled the untrained
one). A non-finite gradient norm stops a run as a non-finite loss does.
"""

import math
import re

import pytest
import torch
from accelerate import Accelerator

from moalign.cli import main
from moalign.errors import MoalignError
from moalign.run.training import optimizer_step

BAD_STAGE2 = [
    (["--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--steps=-5"], "steps must be a whole number >= 1, got -5"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--lr=-1e-4"], "lr must be a finite number > 0"),
    (["--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be a whole number >= 1, got 0"),
    (["--set", "log_every=0"], "log_every must be a whole number >= 1, got 0"),
    (["--set", "align.tau=0"], r"align.tau must be a finite number in \(0, inf\), got 0"),
    (["--lambda", "nan"], r"align.lam \(--lambda\) must be a finite number in \[0, 1000\]"),
    (["--lambda", "1e38"], r"align.lam \(--lambda\) must be a finite number in \[0, 1000\], got 1e\+38"),
    (["--set", "grad_clip=-1"], "grad_clip must be a finite number >= 0"),
    (["--set", "warmup_steps=-1"], "warmup_steps must be a whole number >= 0"),
    (["--set", "backbone=sora"], "backbone must be one of cogvideox, wan"),
    (["--set", "mixed_precision=fp8"], "mixed_precision must be one of no, fp16, bf16|invalid choice"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_STAGE2)
def test_stage2_refuses_bad_settings_before_any_work(extra, message, stage2_caches, tmp_path, capsys):
    caches = stage2_caches(8)
    out = tmp_path / "run"
    argv = ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(out),
            "--model", "tiny-random", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()  # refused before the run folder was made


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps must be a whole number >= 1"),
        (["--set", "val_every=0"], "val_every must be"),
    ],
)
def test_stage1_refuses_bad_settings(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "stage1",
        "--data",
        str(tmp_path),
        "--out",
        str(out),
        "--encoder",
        str(tmp_path),
        "--quiet",
        *extra,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_defaults_and_presets_pass_the_checks():
    from moalign.presets import PRESETS, get_preset

    for name in PRESETS:
        get_preset(name)  # builds every config of the recipe: each checks its fields


def _one_step(grad: float):
    """A real optimizer step through accelerate on a one-weight model whose gradient is `grad`."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = model.weight.detach().clone()
    model.weight.grad = torch.full_like(model.weight, grad)
    return accelerator, model, optimizer, scheduler, before


@pytest.mark.parametrize("grad", [math.inf, math.nan])
def test_a_non_finite_gradient_norm_stops_the_step(grad):
    accelerator, model, optimizer, scheduler, before = _one_step(grad)
    with pytest.raises(
        MoalignError, match=r"non-finite gradient norm \((inf|nan)\) at step 7.*--resume latest"
    ):
        optimizer_step(accelerator, optimizer, scheduler, model.parameters(), grad_clip=1.0, step=7)
    assert torch.equal(model.weight.detach(), before)  # nothing was applied


def test_a_finite_gradient_is_clipped_and_applied():
    accelerator, model, optimizer, scheduler, before = _one_step(30.0)
    norm = optimizer_step(accelerator, optimizer, scheduler, model.parameters(), grad_clip=1.0, step=0)
    assert norm == pytest.approx(30.0)
    assert float(before - model.weight.detach()) == pytest.approx(0.1 * 1.0, rel=1e-4)  # lr x clipped grad
    accelerator, model, optimizer, scheduler, before = _one_step(30.0)
    assert optimizer_step(
        accelerator, optimizer, scheduler, model.parameters(), grad_clip=0.0
    ) == pytest.approx(30)
    assert float(before - model.weight.detach()) == pytest.approx(3.0, rel=1e-4)  # no clip: lr x 30


def test_the_non_finite_advice_works_when_followed(stage2_caches, tmp_path, monkeypatch, capsys):
    """A non-finite loss advises a lower --lr and --resume latest: doing exactly that continues the run (the
    advice and the resume rules agree), and RUN/config.json records the change and its step."""
    import json

    import moalign.stage2 as stage2_mod

    caches, run = stage2_caches(8), tmp_path / "run"
    argv = ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(run),
            "--layers", "1", "--steps", "4", "--set", "batch_size=2", "--set", "align.projector.hidden_dim=8",
            "--checkpoint-every", "2", "--set", "report_to=none", "--model", "tiny-random", "--quiet"]  # fmt: skip
    real, calls = stage2_mod.stage2_loss, []

    def overflow_at_step_3(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            parts["total"] = parts["total"] * float("inf")
        return parts

    monkeypatch.setattr(stage2_mod, "stage2_loss", overflow_at_step_3)
    assert main([*argv, "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "--lr" in err and "--resume latest" in err
    assert (run / "checkpoint-2").is_dir() and not (run / "metrics.json").exists()
    monkeypatch.setattr(stage2_mod, "stage2_loss", real)
    assert main([*argv, "--lr", "1e-4", "--resume", "latest"]) == 0  # what the message advised
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["lr"] == 1e-4
    assert record["resumed"] == [{"step": 2, "changes": {"lr": [1e-3, 1e-4]}}]
