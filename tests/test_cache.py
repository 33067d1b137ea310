"""Sharded tensor cache: round trip, resume, fingerprint checks, process split, atomicity, skipped items."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from moalign.data.cache import Cache
from moalign.data.cache_writer import CacheWriter
from moalign.errors import MoalignError

FP = {"method": {"name": "dis", "preset": "medium"}, "data": {"num_frames": 5, "height": 8}, "num_clips": 10}


def item(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "flow": torch.randn(2, 4, 4, 2, generator=g).half(),
        "valid": torch.rand(2, 4, 4, generator=g) > 0.5,
    }


def fill(writer: CacheWriter, shards: list[int] | None = None, skip: frozenset[int] = frozenset()) -> None:
    for s in writer.shards_todo() if shards is None else shards:
        idx = writer.items_of(s)
        writer.write_shard(
            s, {i: item(i) for i in idx if i not in skip}, {i: f"bad {i}" for i in idx if i in skip}
        )


def test_round_trip(tmp_path):
    writer = CacheWriter(tmp_path / "c", "flow", FP, num_items=10, shard_size=4)
    assert writer.num_shards == 3 and list(writer.items_of(2)) == [8, 9]
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["fingerprint"] == FP  # before any work
    fill(writer)
    assert writer.finalize() == tmp_path / "c"
    cache = Cache(tmp_path / "c", kind="flow", fingerprint=FP)
    assert len(cache) == 10 and cache.indices == list(range(10)) and cache.skipped == {}
    assert 9 in cache and np.int64(3) in cache and 10 not in cache and -1 not in cache
    for i in (9, 0, 5, 3):
        got = cache[i]
        assert set(got) == {"flow", "valid"}
        assert got["flow"].dtype == torch.float16 and got["valid"].dtype == torch.bool
        assert all(torch.equal(got[k], v) for k, v in item(i).items())
    with pytest.raises(KeyError):
        cache[10]
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers get a copy without open handles
    assert torch.equal(clone[7]["flow"], item(7)["flow"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == [f"shard-0000{s}.safetensors" for s in range(3)]


def test_lru_keeps_few_handles(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=6, shard_size=1)
    fill(writer)
    writer.finalize()
    cache = Cache(tmp_path, max_open=2)
    for i in [0, 1, 2, 3, 0, 5, 4]:
        assert torch.equal(cache[i]["flow"], item(i)["flow"])
        assert len(cache._handles) <= 2


def test_resume_computes_only_missing_shards(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=10, shard_size=3)
    fill(writer, shards=[0, 2])  # then the run is "killed"
    with pytest.raises(MoalignError, match=r"incomplete \(2 of 4 shards.*Re-run the same command"):
        Cache(tmp_path, kind="flow")
    with pytest.raises(MoalignError, match="2 of 4 shards are missing"):
        writer.finalize()
    resumed = CacheWriter(tmp_path, "flow", FP, num_items=10, shard_size=3)
    assert resumed.shards_todo() == [1, 3]
    fill(resumed)
    resumed.finalize()
    cache = Cache(tmp_path, "flow", FP)
    assert all(torch.equal(cache[i]["flow"], item(i)["flow"]) for i in range(10))


def test_fingerprint_mismatch_lists_differing_keys(tmp_path):
    fill(CacheWriter(tmp_path, "flow", FP, num_items=10), [0])  # a finished shard: starting again loses it
    other = {**FP, "method": {"name": "dis", "preset": "fast"}}
    with pytest.raises(MoalignError) as err:
        CacheWriter(tmp_path, "flow", other, num_items=10)
    msg = str(err.value)
    assert str(tmp_path) in msg and "method.preset" in msg and '"medium" -> "fast"' in msg
    assert "--overwrite" in msg and "--out" in msg and "data.height" not in msg
    assert "holds 1 finished shard(s)" in msg
    with pytest.raises(MoalignError, match="kind"):
        CacheWriter(tmp_path, "latents", FP, num_items=10)
    with pytest.raises(MoalignError, match="num_items=10, shard_size=64.*num_items=11"):
        CacheWriter(tmp_path, "flow", FP, num_items=11)
    # tuples and lists are the same after JSON: not a mismatch
    CacheWriter(tmp_path, "flow", {**FP, "data": {"num_frames": 5, "height": 8}}, num_items=10)


def test_reader_checks_kind_and_fingerprint(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=2)
    fill(writer)
    writer.finalize()
    with pytest.raises(MoalignError, match="kind"):
        Cache(tmp_path, kind="latents")
    with pytest.raises(MoalignError, match="num_clips: 10 -> 3"):
        Cache(tmp_path, kind="flow", fingerprint={**FP, "num_clips": 3})
    with pytest.raises(MoalignError, match="no cache at"):
        Cache(tmp_path / "nope")


def test_overwrite_deletes_old_cache(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=4, shard_size=2)
    fill(writer)
    writer.finalize()
    new_fp = {**FP, "num_clips": 4}
    fresh = CacheWriter(tmp_path, "flow", new_fp, num_items=4, shard_size=2, overwrite=True)
    assert fresh.shards_todo() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".moalign.lock", "cache.json"]  # the writer's lock
    assert json.loads((tmp_path / "cache.json").read_text())["fingerprint"] == new_fp


def test_refuses_foreign_folder_even_with_overwrite(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(MoalignError, match="not a moalign cache"):
        CacheWriter(tmp_path, "flow", FP, num_items=4, overwrite=True)
    assert (tmp_path / "thesis.tex").exists()


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_split_covers_every_shard_once(tmp_path, world_size):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=23, shard_size=2)  # 12 shards
    parts = [writer.shards_todo(rank, world_size) for rank in range(world_size)]
    flat = [s for part in parts for s in part]
    assert sorted(flat) == list(range(12)) and len(flat) == len(set(flat))
    # each process writes its own shards; the cache is complete once all are done
    for part in parts[:-1]:
        fill(writer, part)
    assert writer.shards_todo() == parts[-1]
    fill(writer, parts[-1])
    writer.finalize()
    assert len(Cache(tmp_path)) == 23
    with pytest.raises(ValueError):
        writer.shards_todo(rank=world_size, world_size=world_size)


def test_no_partial_shard_after_failed_write(tmp_path, monkeypatch):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=4, shard_size=2)

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        fill(writer, [0])
    # neither the shard nor a temp file (the lock file is the writer's: `moalign.run.lock`)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".moalign.lock", "cache.json"]
    assert writer.shards_todo() == [0, 1]


def test_skipped_items(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=6, shard_size=2)
    fill(writer, skip=frozenset({1, 4, 5}))  # shard 2 holds no tensor at all
    writer.finalize()
    cache = Cache(tmp_path, "flow")
    assert cache.skipped == {1: "bad 1", 4: "bad 4", 5: "bad 5"}
    assert cache.indices == [0, 2, 3] and len(cache) == 3
    assert 1 not in cache and 0 in cache
    with pytest.raises(KeyError, match="skipped.*bad 4"):
        cache[4]
    assert torch.equal(cache[3]["valid"], item(3)["valid"])
    assert json.loads((tmp_path / "manifest.json").read_text())["skipped"] == {
        "1": "bad 1",
        "4": "bad 4",
        "5": "bad 5",
    }


def test_write_shard_validates_coverage(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=4, shard_size=2)
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        writer.write_shard(0, {0: item(0)})
    with pytest.raises(ValueError, match="both computed and skipped"):
        writer.write_shard(0, {0: item(0), 1: item(1)}, {1: "x"})
    with pytest.raises(ValueError, match="without '/'"):
        writer.write_shard(0, {0: {"a/b": torch.zeros(1)}, 1: item(1)})
    big = torch.arange(8.0)
    writer.write_shard(0, {0: {"x": big[:4]}, 1: {"x": big[4:]}})  # views of one buffer are fine


def test_damaged_cache_is_reported(tmp_path):
    writer = CacheWriter(tmp_path, "flow", FP, num_items=4, shard_size=2)
    fill(writer)
    writer.finalize()
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(MoalignError, match="damaged.*shard-00001"):
        Cache(tmp_path)


def test_a_header_written_by_another_rank_meanwhile_is_read_again(tmp_path, monkeypatch):
    import moalign.data.cache_writer as cw

    cw.CacheWriter(tmp_path / "c", "latents", {"a": 1}, num_items=4, shard_size=2)  # the other rank's header
    real, calls = cw._read_header, []

    def late(root):  # the first read happens just before the other rank renames its header in
        calls.append(root)
        return None if len(calls) == 1 else real(root)

    monkeypatch.setattr(cw, "_read_header", late)
    writer = cw.CacheWriter(tmp_path / "c", "latents", {"a": 1}, num_items=4, shard_size=2)
    assert writer.num_shards == 2 and len(calls) == 2


def test_other_settings_start_a_cache_without_finished_shards_again(tmp_path, capsys):
    # a build stopped at a bad clip before its first shard; re-run with --skip-bad-videos: fewer clips
    CacheWriter(tmp_path, "latents", FP, num_items=8, shard_size=2)
    (tmp_path / ".shard-00000.safetensors.x.tmp").write_bytes(b"half")  # the killed shard's temporary
    fewer = {**FP, "num_clips": 6, "manifest_sha256": "b" * 16}
    writer = CacheWriter(tmp_path, "latents", fewer, num_items=6, shard_size=2)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"[cache] {tmp_path} held no finished shard")
    assert "num_clips: 10 -> 6" in out and "num_items: 8 -> 6" in out and "starting it again" in out
    header = json.loads((tmp_path / "cache.json").read_text())
    assert header["fingerprint"] == fewer and header["num_items"] == 6 and writer.shards_todo() == [0, 1, 2]
    fill(writer)
    writer.finalize()
    assert len(Cache(tmp_path, "latents", fewer)) == 6
    # once a shard is finished, other settings are refused (nothing is deleted without --overwrite)
    with pytest.raises(MoalignError, match=r"(?s)num_clips: 6 -> 10.*holds 3 finished shard.*--overwrite"):
        CacheWriter(tmp_path, "latents", FP, num_items=8, shard_size=2)
    # another kind is refused even without shards: most likely the wrong --out
    CacheWriter(tmp_path / "t", "targets", FP, num_items=8)
    with pytest.raises(MoalignError, match="kind"):
        CacheWriter(tmp_path / "t", "latents", FP, num_items=8)


def test_a_cache_restarted_by_another_rank_meanwhile_is_joined(tmp_path, monkeypatch):
    import moalign.data.cache_writer as cw

    old = cw.CacheWriter(tmp_path, "latents", FP, num_items=4, shard_size=2)
    fewer = {**FP, "num_clips": 3}
    stale = json.loads((tmp_path / "cache.json").read_text())
    first = cw.CacheWriter(tmp_path, "latents", fewer, num_items=3, shard_size=2)  # rank 0 starts again
    fill(first, [0])  # ... and finishes a shard
    real, calls = cw._read_header, []

    def late(root):  # rank 1 read the old header just before rank 0 replaced it
        calls.append(root)
        return stale if len(calls) == 1 else real(root)

    monkeypatch.setattr(cw, "_read_header", late)
    second = cw.CacheWriter(tmp_path, "latents", fewer, num_items=3, shard_size=2)
    assert len(calls) == 2 and second.shards_todo() == [1] and old.num_items == 4
    assert json.loads((tmp_path / "cache.json").read_text())["fingerprint"] == fewer


def test_cache_files_follow_the_umask(tmp_path):
    """safetensors creates its files 0600: caches on a shared cluster's group folder were unreadable by the
    group. Every atomic write applies the umask."""
    import os

    from moalign.data.cache_writer import CacheWriter

    old = os.umask(0o002)
    try:
        w = CacheWriter(tmp_path / "c", "flow", {"x": 1}, 2, shard_size=2)
        w.write_shard(0, {0: {"t": torch.zeros(2)}, 1: {"t": torch.ones(2)}})
        w.finalize()
    finally:
        os.umask(old)
    for name in ("shard-00000.safetensors", "manifest.json", "cache.json"):
        assert (tmp_path / "c" / name).stat().st_mode & 0o777 == 0o664, name


def test_model_folders_follow_the_umask(tmp_path):
    """save_pretrained inside an atomically written folder (checkpoints' transformer/, the demo's pipelines,
    encoder folders) made its safetensors 0600 under umask 022: every file now gets 0666 & ~umask."""
    import os

    from conftest import tiny_transformer

    from moalign.run.checkpoint import save_transformer

    old = os.umask(0o022)
    try:
        save_transformer(tiny_transformer("cogvideox"), tmp_path / "transformer")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "transformer").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
    assert (tmp_path / "transformer").stat().st_mode & 0o777 == 0o755
