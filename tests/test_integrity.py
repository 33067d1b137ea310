"""The faults users' files really have: damaged cache shards (zeroed, random, flipped, truncated, deleted),
non-finite tensors from a cache builder, two processes writing one folder, and inputs replaced at the same path
(an encoder's weights, a flow network's). Each input is rebuilt here, tiny."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moalign.data.cache import Cache
from moalign.data.cache_writer import CacheWriter, fill_cache, finalize_cache, remove_cache
from moalign.errors import MoalignError
from moalign.run import lock
from moalign.run.digest import content_digest, file_sha256

FP = {"method": {"name": "dis"}, "data": {"num_frames": 5}, "num_clips": 6}


def item(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "flow": torch.randn(2, 4, 4, 2, generator=g).half(),
        "valid": torch.rand(2, 4, 4, generator=g) > 0.5,
    }


def build(root: Path, fp: dict = FP, finalize: bool = True) -> CacheWriter:
    writer = CacheWriter(root, "flow", fp, num_items=6, shard_size=2)  # 3 shards
    for s in writer.shards_todo():
        writer.write_shard(s, {i: item(i) for i in writer.items_of(s)})
    if finalize:
        writer.finalize()
    return writer


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "zeroed":  # zeroed bytes in the tensor data, same size
        data[-64:-32] = bytes(32)
    elif how == "random":
        data[-64:-32] = os.urandom(32)
    elif how == "header":  # one flipped byte of the JSON header
        data[12] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------- cache shards


@pytest.mark.parametrize("how", ["zeroed", "random", "header"])
def test_a_damaged_shard_is_named_at_its_first_read(tmp_path, how):
    build(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = tmp_path / "shard-00001.safetensors"
    assert (
        manifest["shard_sha256"][shard.name] == file_sha256(shard) and manifest["shard_bytes"][shard.name] > 0
    )
    damage(shard, how)
    cache = Cache(tmp_path, "flow")  # lazily read: opening checks sizes only
    assert torch.equal(cache[0]["flow"], item(0)["flow"])  # other shards still read
    with pytest.raises(MoalignError) as err:
        cache[2]
    msg = str(err.value)
    assert str(shard) in msg and "damaged" in msg and "sha256" in msg
    assert "Delete that file and re-run the command that built the cache" in msg and "manifest.json" in msg
    assert torch.equal(cache[5]["valid"], item(5)["valid"])


def test_a_truncated_shard_is_named_when_the_cache_opens(tmp_path):
    build(tmp_path)
    shard = tmp_path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(
        MoalignError, match=r"shard-00002\.safetensors is damaged: it is 100 bytes, its manifest"
    ):
        Cache(tmp_path)


def test_deleting_a_damaged_shard_and_re_running_repairs_the_cache(tmp_path, capsys):
    build(tmp_path)
    digest = Cache(tmp_path).digest
    damage(tmp_path / "shard-00001.safetensors", "random")
    (tmp_path / "shard-00001.safetensors").unlink()  # as the message says
    with pytest.raises(
        MoalignError, match=r"1 shard files are gone \(first: shard-00001.*re-run the command"
    ):
        Cache(tmp_path)
    capsys.readouterr()
    again = CacheWriter(tmp_path, "flow", FP, num_items=6, shard_size=2)  # the same build command
    assert again.shards_todo() == [1] and not (tmp_path / "manifest.json").exists()
    assert "1 shard(s) missing (first: shard-00001" in capsys.readouterr().out
    build(tmp_path)
    cache = Cache(tmp_path, "flow", FP)
    assert all(torch.equal(cache[i]["flow"], item(i)["flow"]) for i in range(6))
    assert cache.digest == digest  # what the cache is did not change: a run recording it may resume


def test_finalizing_again_never_hashes_a_damaged_shard_into_the_manifest(tmp_path):
    build(tmp_path)
    before = (tmp_path / "manifest.json").read_text()
    damage(tmp_path / "shard-00000.safetensors", "zeroed")
    with pytest.raises(
        MoalignError, match=r"shard-00000\.safetensors is damaged: its sha256.*Delete that file"
    ):
        finalize_cache(tmp_path)  # re-running a build of a complete cache finalizes it again
    assert (tmp_path / "manifest.json").read_text() == before
    (tmp_path / "shard-00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # foreign bytes
    manifest = json.loads(before)
    manifest.pop("shard_sha256")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        MoalignError, match=r"shard-00000\.safetensors is damaged: it is not a readable shard"
    ):
        finalize_cache(tmp_path)


def test_a_cache_written_before_hashes_still_loads(tmp_path, capsys):
    build(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("shard_sha256", "shard_bytes", "command"):
        manifest.pop(key)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    cache = Cache(tmp_path, "flow")
    assert capsys.readouterr().out.count("\n") == 1  # one info line: not verified
    assert all(torch.equal(cache[i]["flow"], item(i)["flow"]) for i in range(6))
    damage(tmp_path / "shard-00002.safetensors", "header")  # unverified, but still named, not a traceback
    with pytest.raises(MoalignError, match=r"shard-00002\.safetensors is damaged: it is not a readable"):
        Cache(tmp_path)[4]


def test_cache_digest_is_what_the_cache_is(tmp_path):
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert Cache(a.root).digest == Cache(b.root).digest
    other = build(tmp_path / "c", {**FP, "teacher_sha256": "0" * 16})  # another teacher: another cache
    assert Cache(other.root).digest != Cache(a.root).digest


# ----------------------------------------------------------------------------------------------- finite tensors


class Clips:
    """A dataset of 4 clips with records (video path, caption), as `VideoClipDataset` has."""

    cfg = SimpleNamespace(skip_bad_videos=False)
    records = [SimpleNamespace(video=f"/videos/clip{i}.mp4", caption=f"c{i}") for i in range(4)]
    dropped: list = []

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"index": i}


def test_a_non_finite_tensor_stops_the_build_naming_the_clip(tmp_path):
    def compute(sample):
        x = torch.ones(3, dtype=torch.float16)
        if sample["index"] == 3:
            x[1] = float("inf")  # e.g. a float16 overflow
        return {"latents": x, "mask": torch.ones(3, dtype=torch.bool)}

    writer = CacheWriter(tmp_path, "latents", FP, num_items=4, shard_size=2)
    with pytest.raises(MoalignError) as err:
        fill_cache(writer, Clips(), compute, desc="t", progress=False, nonfinite_hint="Use --dtype float32.")
    msg = str(err.value)
    assert (
        "clip 3 (/videos/clip3.mp4)" in msg and "'latents'" in msg and "1 of 3 values are NaN or inf" in msg
    )
    assert msg.endswith("Use --dtype float32.")
    assert writer.shards_todo() == [1]  # shard 0 is kept; nothing of the bad clip's shard was written
    with pytest.raises(MoalignError, match=r"item 1 gave a non-finite 'x'"):  # writers that skip fill_cache
        writer.write_shard(0, {0: {"x": torch.zeros(2)}, 1: {"x": torch.tensor([0.0, float("nan")])}})


# ------------------------------------------------------------------------------------------------------- locks

HOLD = (
    "import sys, time\n"
    "from moalign.run.lock import hold_folder\n"
    "held = hold_folder(sys.argv[1], 'a flow cache build')\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_and_a_killed_one_does_not_block(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(MoalignError) as err:
            lock.hold_folder(tmp_path, "a stage-2 run")
        msg = str(err.value)
        assert f"{tmp_path} is in use by a flow cache build pid {proc.pid} on host" in msg
        assert "(command: -c" in msg and "wait for it to finish or choose another --out" in msg
        with pytest.raises(MoalignError, match=f"pid {proc.pid}"):  # a cache build there is refused too
            CacheWriter(tmp_path, "flow", FP, num_items=6, rank=0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / ".moalign.lock").is_file()  # the killed holder's record stays, and blocks nothing
    with lock.hold_folder(tmp_path, "a stage-2 run") as held:
        assert held.held and json.loads(held.path.read_text())["pid"] == os.getpid()
    again = lock.hold_folder(tmp_path, "a stage-2 run")  # released on leaving the block
    again.release()


def test_lock_is_reentrant_in_one_process_and_per_rank_for_caches(tmp_path):
    first = lock.hold_folder(tmp_path, "x")
    second = lock.hold_folder(tmp_path, "x")  # e.g. a cache finalized by the process that built it
    second.release()
    proc = subprocess.run(
        [sys.executable, "-c", HOLD.replace("time.sleep(60)", ""), str(tmp_path)], capture_output=True
    )
    assert proc.returncode == 1 and b"is in use by x pid" in proc.stderr  # still held by `first`
    first.release()
    # every process of one launch holds its own lock file: rank 1 builds beside rank 0
    rank0 = CacheWriter(tmp_path / "c", "flow", FP, num_items=6, shard_size=2, rank=0)
    rank1 = CacheWriter(tmp_path / "c", "flow", FP, num_items=6, shard_size=2, rank=1)
    assert (tmp_path / "c" / ".moalign-rank1.lock").is_file()
    rank0.release()
    rank1.release()


def test_overwrite_refuses_a_cache_another_process_builds(tmp_path):
    build(tmp_path)
    proc = _holder(tmp_path)
    try:
        with pytest.raises(MoalignError, match="in use by a flow cache build"):
            remove_cache(tmp_path)
        with pytest.raises(MoalignError, match="in use by a flow cache build"):
            CacheWriter(tmp_path, "flow", FP, num_items=6, shard_size=2, overwrite=True, rank=0)
        assert (tmp_path / "manifest.json").is_file()  # nothing was deleted
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    remove_cache(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".moalign.lock"]


def test_without_fcntl_nothing_is_locked(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "fcntl", None)
    a, b = lock.hold_folder(tmp_path, "x"), lock.hold_folder(tmp_path, "y")
    assert not a.held and not b.held


# ----------------------------------------------------------------------------------- identity of the inputs


def test_content_digest_follows_the_bytes_not_the_path(tmp_path):
    weights = tmp_path / "enc" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 100)
    (tmp_path / "enc" / "config.json").write_text("{}")
    first = content_digest(tmp_path / "enc")
    assert content_digest([weights.parent / "config.json", weights]) == first  # a folder: its files, sorted
    assert content_digest([weights, weights.parent / "config.json"]) != first  # the order given counts
    time.sleep(0.01)
    weights.write_bytes(b"b" * 100)  # new weights at the same path: same size, new mtime
    assert content_digest(tmp_path / "enc") != first
    moved = tmp_path / "moved"
    (tmp_path / "enc").rename(moved)
    assert content_digest(moved) == content_digest(moved) != first


def test_targets_cache_refuses_a_resume_after_the_encoder_changed(stage1_run, playground, tmp_path):
    """A targets cache resumed after the encoder's weights changed at the same path would mix two encoders."""
    import shutil

    from conftest import tiny_videomae

    from moalign.run.checkpoint import load_module_file, save_module
    from moalign.teacher import compute_targets

    encoder = tmp_path / "encoder"
    shutil.copytree(stage1_run.cfg.encoder.path, encoder)
    state, config = load_module_file(stage1_run.folder / "motion_projector.safetensors", "motion_projector")
    config["stage1"]["encoder"]["path"] = str(encoder)  # the same teacher, reading the copied encoder
    teacher = tmp_path / "motion_projector.safetensors"
    save_module(teacher, state, "motion_projector", config)
    data, out = playground(2), tmp_path / "targets"
    writer_args = {"shard_size": 1, "progress": False}
    compute_targets(data, teacher, out, **writer_args)
    assert len(Cache(out)) == 2
    tiny_videomae(frames=8, depth=2, seed=1).save_pretrained(encoder)  # other weights, same path and config
    with pytest.raises(MoalignError, match=r"(?s)built with different settings.*encoder_sha256"):
        compute_targets(data, teacher, out, **writer_args)


def test_targets_refuse_an_encoder_of_another_width_before_any_work(stage1_run, playground, tmp_path):
    """The encoder at the teacher's path replaced by one of another width: a shape traceback in `targets` before;
    now one line naming both widths, nothing written."""
    import shutil

    from conftest import tiny_videomae

    from moalign.run.checkpoint import load_module_file, save_module
    from moalign.teacher import compute_targets

    encoder = tmp_path / "encoder"
    shutil.copytree(stage1_run.cfg.encoder.path, encoder)
    state, config = load_module_file(stage1_run.folder / "motion_projector.safetensors", "motion_projector")
    config["stage1"]["encoder"]["path"] = str(encoder)
    teacher = tmp_path / "motion_projector.safetensors"
    save_module(teacher, state, "motion_projector", config)
    wide = tiny_videomae(frames=8, depth=2, width=48)
    wide.save_pretrained(encoder)
    with pytest.raises(
        MoalignError, match=r"trained on 32-wide encoder tokens, but the encoder at .* 48-wide"
    ):
        compute_targets(playground(2), teacher, tmp_path / "targets", shard_size=1, progress=False)
    assert not (tmp_path / "targets").exists()


def test_a_damaged_shard_names_the_kinds_own_command_for_a_copied_cache(tmp_path):
    """A cache built inside another command (the demo) or copied elsewhere: the repair names the kind's own
    command with --out this folder, which rebuilds only the missing shard."""
    import shutil

    from moalign.data.cache_writer import CacheWriter

    w = CacheWriter(tmp_path / "built", "latents", {"x": 1}, 2, shard_size=1)
    for s in w.shards_todo():
        w.write_shard(s, {s: {"t": torch.full((4,), float(s))}})
    w.finalize()
    shutil.copytree(tmp_path / "built", tmp_path / "copy")
    shard = tmp_path / "copy" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\x00\x01"
    shard.write_bytes(bytes(data))
    with pytest.raises(MoalignError, match=r"moalign latents \.\.\. --out .*copy"):
        Cache(tmp_path / "copy")[1]
