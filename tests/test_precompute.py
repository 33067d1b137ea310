"""`moalign precompute`: every cache in one command; two processes (`accelerate launch`, gloo) build what one
builds, each writing only its own shards; a SIGKILLed run, started again with the same command, ends equal to an
uninterrupted one."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launcher import run_moalign
from safetensors import safe_open

from moalign.cli import main
from moalign.data.cache import Cache
from moalign.errors import MoalignError


@pytest.fixture(scope="module")
def world(playground, videomae_folder, stage1_run, tiny_cogvideox_pipeline, tmp_path_factory):
    """6 playground clips, a tiny VideoMAE, a stage-1 teacher and a tiny CogVideoX pipeline folder (all from
    tests/conftest.py), and `out`, where this module's uninterrupted runs write."""
    return SimpleNamespace(data=playground(6), encoder=videomae_folder, teacher=stage1_run.folder,
                           pipe=tiny_cogvideox_pipeline, out=tmp_path_factory.mktemp("pre"))  # fmt: skip


def _args(world, out):
    return ["precompute", "--data", str(world.data), "--out", str(out), "--flow", "dis", "--teacher",
            str(world.teacher), "--raw", "--model", str(world.pipe), "--shard-size", "2",
            "--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]  # fmt: skip


def _same_caches(a: Path, b: Path, names=("flow", "targets", "latents")) -> None:
    for name in names:
        ca, cb = Cache(a / name), Cache(b / name)
        assert ca.fingerprint == cb.fingerprint and ca.indices == cb.indices == list(range(6))
        for i in ca.indices:
            x, y = ca[i], cb[i]
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), (name, i, k)


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world.out / "one"
    done = run_moalign(_args(world, out))
    assert done.returncode == 0, done.stderr
    return out


def test_one_command_builds_every_cache(world, uninterrupted):
    targets, latents = (
        Cache(uninterrupted / "targets", "teacher_targets"),
        Cache(uninterrupted / "latents", "latents"),
    )
    assert set(targets[0]) == {"motion", "encoder"} and targets[0]["motion"].shape == (4, 4, 4, 64)
    assert latents[0]["latents"].shape == (3, 4, 4, 4) and latents.fingerprint["backbone"] == "cogvideox"
    flow = Cache(uninterrupted / "flow", "flow")
    assert flow[0]["flow"].shape == (8, 32, 32, 2) and flow.fingerprint["method"]["method"] == "dis"
    # stage 2 trains from the caches alone (no encoder, VAE or text encoder is loaded)
    run = world.out / "s2"
    assert main(["stage2", "--latents", str(uninterrupted / "latents"), "--targets", str(uninterrupted / "targets"),
                 "--out", str(run), "--layers", "1", "--steps", "1", "--set", "batch_size=2", "--set",
                 "align.projector.hidden_dim=8", "--set", "align.projector.grid_match=resample_teacher", "--set", "report_to=none", "--quiet"]) == 0  # fmt: skip


def test_two_processes_build_the_same_caches(world, uninterrupted):
    two = world.out / "two"
    done = run_moalign(_args(world, two), engine="ddp")
    assert done.returncode == 0, done.stderr
    _same_caches(uninterrupted, two)
    manifest = json.loads((two / "latents" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == [f"shard-0000{s}.safetensors" for s in range(3)]
    for name in ("flow", "targets", "latents"):  # process r wrote exactly the shards s with s % 2 == r
        for s in range(3):
            with safe_open(str(two / name / f"shard-0000{s}.safetensors"), "pt") as f:
                assert f.metadata()["process"] == f"{s % 2}/2", (name, s)
    with safe_open(str(uninterrupted / "latents" / "shard-00001.safetensors"), "pt") as f:
        assert f.metadata()["process"] == "0/1"


def test_killed_precompute_resumes_with_the_same_command(world, uninterrupted):
    out = world.out / "killed"
    # killed while writing the latents cache's second shard (flow and targets are complete by then)
    killed = run_moalign(_args(world, out), kill=("moalign.data.cache_writer.save_safetensors", 3 + 3 + 2))
    assert killed.returncode == -9, killed.stderr
    assert (out / "latents" / "shard-00000.safetensors").is_file()
    assert not (out / "latents" / "shard-00001.safetensors").exists()
    assert (out / "latents" / ".shard-00001.safetensors.killed.tmp").is_file()  # the half-written shard
    assert not (out / "latents" / "manifest.json").exists()
    with pytest.raises(MoalignError, match=r"incomplete \(1 of 3 shards written"):
        Cache(out / "latents")
    again = run_moalign(_args(world, out))
    assert again.returncode == 0, again.stderr
    _same_caches(uninterrupted, out)
    assert not list((out / "latents").glob(".*.tmp"))  # leftovers are gone


def test_precompute_errors(world, tmp_path):
    assert main(["precompute", "--data", str(world.data), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    argv = ["precompute", "--data", str(world.data), "--out", str(tmp_path), "--flow", "dis", "--overwrite",
            "--num-frames", "9", "--height", "32", "--width", "32", "--quiet"]  # fmt: skip
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "notes.txt").write_text("not a cache")
    with pytest.raises(MoalignError, match="not a moalign cache.*will not delete it"):
        main(["--debug", *argv])
    assert (tmp_path / "flow" / "notes.txt").is_file()


def test_killed_training_resumes_with_the_same_command(world, uninterrupted, tmp_path):
    """stage 2 SIGKILLed in step 3 (after checkpoint-2) and launched again with the same `--resume latest`
    command trains exactly the weights of an uninterrupted run."""

    def argv(out):
        return ["stage2", "--latents", str(uninterrupted / "latents"), "--targets", str(uninterrupted / "targets"),
                "--out", str(out), "--layers", "1", "--lora-rank", "4", "--steps", "4", "--set", "batch_size=2",
                "--set", "checkpoint_every=2", "--set", "log_every=1", "--set", "lr=1e-3", "--set", "align.projector.hidden_dim=8", "--set", "align.projector.grid_match=resample_teacher",
                "--resume", "latest", "--quiet"]  # fmt: skip

    whole = run_moalign(argv(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_moalign(argv(tmp_path / "run"), kill=("moalign.stage2.stage2_loss", 3))
    assert killed.returncode == -9 and (tmp_path / "run" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "metrics.json").exists()
    again = run_moalign(argv(tmp_path / "run"))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    from safetensors.torch import load_file

    for name in ("pytorch_lora_weights.safetensors", "align_projector.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]  # the killed step's line, if any, was dropped and logged once again


def test_stage1_two_processes_train_like_one(world, uninterrupted, tmp_path):
    """Stage 1 under `accelerate launch` (DDP, 2 CPU processes): 2 processes recorded, each trained on its half of
    every batch, and the heads equal a one-process run's (a one-process run on half the batch differs)."""

    def argv(out, batch=2):
        return ["stage1", "--data", str(world.data), "--encoder", str(world.encoder), "--flow-cache",
                str(uninterrupted / "flow"), "--out", str(out), "--num-frames", "9", "--height", "32", "--width",
                "32", "--set", "encoder.input_size=32,32", "--set", "projector.hidden_dim=16", "--set",
                "decoder.hidden_dim=8", "--set", "val_clips=2", "--set", "steps=3", "--set", f"batch_size={batch}",
                "--set", "lr=1e-3", "--set", "warmup_steps=1", "--set", "report_to=none", "--quiet"]  # fmt: skip

    two = run_moalign(argv(tmp_path / "two"), engine="ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(argv(tmp_path / "one")) == 0 and main(argv(tmp_path / "half", batch=1)) == 0
    launch = json.loads((tmp_path / "two" / "config.json").read_text())["launch"]
    assert launch["num_processes"] == 2 and launch["engine"] == "ddp" and launch["per_process_batch"] == 1
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["clips_per_process"] == [3, 3]
    from safetensors.torch import load_file

    def heads(run):
        return {f"{n}.{k}": v for n in ("motion_projector", "flow_decoder")
                for k, v in load_file(run / f"{n}.safetensors").items()}  # fmt: skip

    one, two_w, half = heads(tmp_path / "one"), heads(tmp_path / "two"), heads(tmp_path / "half")
    gap = max(float((two_w[k] - one[k]).abs().max()) for k in one)
    half_gap = max(float((half[k] - one[k]).abs().max()) for k in one)
    assert gap < 1e-4 and half_gap > 1e-3, (gap, half_gap)


def test_targets_and_precompute_read_a_custom_caption_column(world, tmp_path, capsys):
    """An HF-style train/metadata.csv with its own caption column: `targets --caption-column` and `precompute
    --teacher --caption-column` read it (the teacher's clip geometry, said in the log); without it, one line."""
    import csv

    rows = [json.loads(line) for line in (world.data / "metadata.jsonl").read_text().splitlines()]
    split = tmp_path / "hf" / "train"
    split.mkdir(parents=True)
    with open(split / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "description"])
        w.writerows([[str((world.data / r["video"]).resolve()), r["caption"]] for r in rows])
    base = ["--data", str(tmp_path / "hf"), "--teacher", str(world.teacher), "--quiet"]
    assert main(["targets", *base, "--out", str(tmp_path / "t0")]) == 2
    assert "no caption column" in capsys.readouterr().err
    assert main(["targets", *base, "--out", str(tmp_path / "t"), "--caption-column", "description"]) == 0
    assert "[targets] clips as the teacher" in capsys.readouterr().out
    assert len(Cache(tmp_path / "t")) == len(rows)
    assert main(["precompute", *base, "--out", str(tmp_path / "p"), "--caption-column", "description"]) == 0
    assert len(Cache(tmp_path / "p" / "targets")) == len(rows)


def test_precompute_with_a_teacher_cuts_every_cache_as_the_teacher(world, tmp_path, capsys):
    """Without --preset, precompute --teacher --model makes latents of the teacher's clips (stage 2 takes the
    pair); frame flags that contradict the teacher are refused before any encoding."""
    base = ["precompute", "--data", str(world.data), "--teacher", str(world.teacher), "--model", str(world.pipe),
            "--quiet"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "bad"), "--num-frames", "17"]) == 2
    err = capsys.readouterr().err
    assert "num_frames 17 vs the teacher's 9" in err and not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "ok")]) == 0
    assert "[precompute] clips as the teacher" in capsys.readouterr().out
    lat, tgt = Cache(tmp_path / "ok" / "latents"), Cache(tmp_path / "ok" / "targets")
    assert lat.fingerprint["data"]["num_frames"] == tgt.fingerprint["data"]["num_frames"] == 9


def test_a_damaged_shard_is_named_and_rebuilt_by_the_same_command(world, uninterrupted, tmp_path, capsys):
    """A shard damaged on disk stops the next command naming it (exit 2, no traceback); deleted as the message
    says, the same precompute command recomputes it alone and rewrites the manifest."""
    import shutil

    out = tmp_path / "caches"
    shutil.copytree(uninterrupted, out)
    shard = out / "latents" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40:-8] = bytes(32)  # zeroed bytes inside the tensors
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_args(world, out)) == 2  # finalizing the complete caches again checks every shard
    err = capsys.readouterr().err
    assert str(shard) in err and "damaged" in err and "Delete that file" in err and "Traceback" not in err
    shard.unlink()
    assert main(_args(world, out)) == 0
    _same_caches(uninterrupted, out)
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    with safe_open(str(shard), "pt") as f:
        assert f.metadata()["process"] == "0/1"  # recomputed here; the other shards are the copied ones
    # the manifest holds the recomputed shard's hash (its bytes may differ: safetensors orders metadata freely)
    assert manifest["shard_sha256"][shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert len(Cache(out / "latents")[2]["latents"]) == 3
