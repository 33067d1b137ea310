"""Stop signals as clusters and people send them: SIGTERM (preemption, `scancel`, `kill`) and SIGINT (Ctrl-C).

A training run stops at the next step boundary with a checkpoint of that step, says so in one line and exits
128 + the signal (143, 130), on every process of a launch whichever process got the signal; the same
`--resume latest` command then ends with the weights of an uninterrupted run. Outside a training loop (a cache
build) the command stops with one line and 143, and its finished shards are kept.
"""

import json

import pytest
from launcher import max_gap, ok, run_moalign, stage2_weights

N = 8
STEPS = 4


@pytest.fixture(scope="module")
def caches(stage2_caches):
    return stage2_caches(N)


def _stage2(caches, out, *extra):
    return ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(out),
            "--align", "moalign", "--layers", "1", "--steps", str(STEPS), "--set", "batch_size=4", "--set", "lr=1e-3",
            "--set", "warmup_steps=1", "--set", "align.projector.hidden_dim=8", "--set", "checkpoint_every=100",
            "--set", "log_every=1", "--set", "report_to=none", "--resume", "latest", "--model", "tiny-random",
            "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(caches, tmp_path_factory):
    run = tmp_path_factory.mktemp("signals") / "whole"
    ok(run_moalign(_stage2(caches, run)))
    return stage2_weights(run)


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_stage2_stops_at_the_step_boundary_with_a_checkpoint(name, code, caches, uninterrupted, tmp_path):
    run = tmp_path / "run"
    # the signal arrives inside step 2 (the second loss call): that step finishes, is checkpointed, the run stops
    stopped = run_moalign(_stage2(caches, run), signal=("moalign.stage2.stage2_loss", 2, name))
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert f"stopped by {name} after step 2 of {STEPS}" in stopped.stderr
    assert "checkpoint-2 holds it" in stopped.stderr and "--resume latest" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (run / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file() or (
        run / "checkpoint-2" / "transformer"
    ).is_dir()
    assert not (run / "metrics.json").exists()
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [0, 1]

    if name == "SIGINT":  # the same stop; the exact resume after it is shown once, for SIGTERM
        return
    again = ok(run_moalign(_stage2(caches, run)))
    assert "resumed from" in again.stdout
    assert max_gap(stage2_weights(run), uninterrupted) < 1e-6
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == list(range(STEPS))


@pytest.mark.slow
def test_two_processes_stop_together_when_one_gets_sigterm(caches, uninterrupted, tmp_path):
    """Only process 1 gets the signal; both stop after the same step and join one checkpoint."""
    run = tmp_path / "run"
    stopped = run_moalign(
        _stage2(caches, run),
        "ddp",
        signal=("moalign.stage2.stage2_loss", 2, "SIGTERM"),
        env={"SIGNAL_RANK": "1"},
    )
    # each process exits 143; the launcher (torch elastic) then reports exit 1 and its ChildFailedError summary
    assert stopped.returncode == 1 and "exitcode  : 143" in stopped.stderr
    assert stopped.stderr.count(f"stopped by SIGTERM after step 2 of {STEPS}") == 2, stopped.stderr[-3000:]
    assert "src/moalign" not in stopped.stderr  # no traceback through moalign's code
    assert (run / "checkpoint-2" / "training_state.pt").is_file() and not (run / "checkpoint-3").exists()
    ok(run_moalign(_stage2(caches, run), "ddp"))
    launch = json.loads((run / "config.json").read_text())["launch"]
    assert launch["num_processes"] == 2
    assert max_gap(stage2_weights(run), uninterrupted) < 1e-4  # two processes add in another order


def test_sigterm_during_a_cache_build_keeps_finished_shards(playground, tmp_path):
    data = playground(6)
    argv = ["flow", "--data", str(data), "--out", str(tmp_path / "flow"), "--method", "exact", "--shard-size", "2",
            "--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    stopped = run_moalign(argv, signal=("moalign.data.cache_writer.save_safetensors", 2, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert (tmp_path / "flow" / "shard-00000.safetensors").is_file()
    assert not list((tmp_path / "flow").glob(".*.tmp"))  # the interrupted write left nothing behind
    ok(run_moalign(argv))
    assert json.loads((tmp_path / "flow" / "manifest.json").read_text())["complete"]
