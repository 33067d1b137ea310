"""Stage 2 under every engine a user launches it with, 2 CPU processes each: DDP, DeepSpeed ZeRO-2 and ZeRO-3,
FSDP2, through `accelerate launch --config_file configs/accelerate/ENGINE.yaml --num_processes 2`.

For each engine: the run records 2 processes and the engine, each process trained on its half of every global
batch only, the trained weights equal a one-process run with the same global batch (and differ, by far more,
from a one-process run on half the batch: what each process alone would train), and a run SIGKILLed after its
first checkpoint and launched again with the same `--resume latest` command ends with the uninterrupted weights.
"""

import json

import pytest
import torch
from launcher import max_gap, ok, run_moalign, stage2_weights

N = 8
STEPS = 3
ENGINES = {  # config file -> engine the run must record
    "ddp": "ddp",
    "deepspeed_zero2": "deepspeed-zero2",
    "deepspeed_zero3": "deepspeed-zero3",
    "fsdp": "fsdp2",
}
# the engines that also split each process's share into 2 micro-batches (accumulation through DDP's no_sync and
# DeepSpeed's own boundary); the others take their share in one micro-batch
ACCUMULATING = {"ddp", "deepspeed_zero2"}
EQUAL = 1e-4  # "the same weights": float summation order differs between engines


@pytest.fixture(scope="module")
def caches(stage2_caches):
    return stage2_caches(N)


def _args(caches, out, *extra):
    return ["stage2", "--latents", str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(out),
            "--align", "moalign", "--layers", "1", "--steps", str(STEPS), "--set", "batch_size=4", "--set", "lr=1e-3",
            "--set", "warmup_steps=1", "--set", "align.projector.hidden_dim=8", "--set", "checkpoint_every=2",
            "--set", "log_every=1", "--set", "report_to=none", "--resume", "latest", "--model", "tiny-random", "--quiet",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(caches, tmp_path_factory):
    """One process with the global batch of 4, and one with a batch of 2 (what each of two processes would
    train alone, were the launch ignored)."""
    root = tmp_path_factory.mktemp("one")
    ok(run_moalign(_args(caches, root / "whole")))
    ok(run_moalign(_args(caches, root / "half", "--set", "batch_size=2")))
    return stage2_weights(root / "whole"), stage2_weights(root / "half")


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_train_like_one_and_resume_exactly(engine, caches, one_process, tmp_path):
    accum = ["--set", "gradient_accumulation_steps=2"] if engine in ACCUMULATING else []
    whole = ok(run_moalign(_args(caches, tmp_path / "whole", *accum), engine))
    launch = json.loads((tmp_path / "whole" / "config.json").read_text())["launch"]
    assert launch["num_processes"] == 2 and launch["engine"] == ENGINES[engine], launch
    assert launch["per_process_batch"] == 2 and launch["micro_batch"] == (1 if accum else 2)
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["clips_per_process"] == [2 * STEPS, 2 * STEPS]  # each process its half of every batch

    reference, half = one_process
    trained = stage2_weights(tmp_path / "whole")
    gap, half_gap = max_gap(trained, reference), max_gap(half, reference)
    assert gap < EQUAL and half_gap > 10 * EQUAL, (gap, half_gap)
    logged = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(STEPS))
    assert "2 processes (" + ENGINES[engine] in whole.stdout

    # SIGKILLed in step 3 (after checkpoint-2: one loss call per micro-batch), then the same command again
    run = tmp_path / "run"
    calls = 2 * launch["gradient_accumulation_steps"] + 1
    killed = run_moalign(_args(caches, run, *accum), engine, kill=("moalign.stage2.stage2_loss", calls))
    assert killed.returncode != 0 and (run / "checkpoint-2").is_dir() and not (run / "metrics.json").exists()
    if engine != "ddp":  # DeepSpeed / FSDP: the sharded optimizer state is in the checkpoint
        assert (run / "checkpoint-2" / "accelerate_state").is_dir()
    again = ok(run_moalign(_args(caches, run, *accum), engine))
    assert "resumed from" in again.stdout
    resumed = stage2_weights(run)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_the_papers_preset_runs_under_each_sharded_engine(engine, caches, tiny_cogvideox_pipeline, tmp_path):
    """The README's command: `accelerate launch --config_file configs/accelerate/ENGINE.yaml ... stage2 --preset
    cogvideox-2b` (full fine-tune, bf16, gradient checkpointing) with only the sizes shrunk, 2 CPU processes: it
    gets past `prepare`, trains, checkpoints and saves float32 weights that load and moved."""
    from diffusers import CogVideoXTransformer3DModel

    argv = ["stage2", "--preset", "cogvideox-2b", "--model", str(tiny_cogvideox_pipeline), "--latents",
            str(caches / "latents"), "--targets", str(caches / "targets"), "--out", str(tmp_path / "run"),
            "--layers", "2", "--steps", "2", "--set", "batch_size=2", "--set", "align.projector.hidden_dim=16",
            "--set", "checkpoint_every=1", "--set", "warmup_steps=1", "--set", "lr=1e-3", "--quiet"]  # fmt: skip
    ok(run_moalign(argv, engine))
    launch = json.loads((tmp_path / "run" / "config.json").read_text())["launch"]
    assert launch["engine"] == ENGINES[engine] and launch["mixed_precision"] == "bf16"
    assert (tmp_path / "run" / "checkpoint-1" / "accelerate_state").is_dir()
    trained = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "run" / "transformer")
    base = CogVideoXTransformer3DModel.from_pretrained(tiny_cogvideox_pipeline, subfolder="transformer")
    assert {p.dtype for p in trained.parameters()} == {torch.float32}  # master weights, not bf16 copies
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(trained.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert moved > 1e-4
