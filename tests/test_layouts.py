"""Dataset layouts people already have (text-file names, sidecar captions, a train/ split, chosen columns),
DataConfig's column fields reaching the dataset, and skipped clips named in a cache's manifest."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import texture

from moalign.data.cache import Cache, dataset_identity
from moalign.data.cache_writer import CacheWriter, fill_cache, finalize_cache
from moalign.data.dataset import VideoClipDataset
from moalign.data.manifest import ClipRecord, NoManifestError, open_manifest, read_manifest
from moalign.data.sampling import DataConfig
from moalign.data.video_io import write_video
from moalign.errors import MoalignError
from moalign.run.serialize import apply_overrides

COMMAS = "a red ball, then a blue one, bouncing"


def make_video(path: Path, t: int = 9, h: int = 32, w: int = 32, seed: int = 0) -> None:
    frames = np.stack([np.roll(texture(h, w, seed, blur=1.5), i, axis=1) for i in range(t)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, 8.0)


def touch(path: Path, text: str | None = None) -> Path:
    """A file (videos need not be real for reading a manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("" if text is None else text)
    return path


# ------------------------------------------------------------------------------- text files (layout 3)


@pytest.mark.parametrize("captions", ["prompts.txt", "prompt.txt", "captions.txt", "caption.txt"])
@pytest.mark.parametrize("videos", ["videos.txt", "video.txt"])
def test_text_file_names(tmp_path, captions, videos):
    touch(tmp_path / captions, f"{COMMAS}\n  second  \n")
    touch(tmp_path / videos, "videos/00000.mp4\n/abs/1.mp4\n")
    m = open_manifest(tmp_path)
    assert m.layout == f"{captions} + {videos}" and m.path == tmp_path.resolve() / captions
    assert [r.caption for r in m.records] == [COMMAS, "second"]
    assert [r.video for r in m.records] == [tmp_path.resolve() / "videos" / "00000.mp4", Path("/abs/1.mp4")]
    assert m.records[1].source.endswith(f"{videos}:2")


@pytest.mark.parametrize(
    "name", ["prompts.txt", "prompt.txt", "captions.txt", "caption.txt", "videos.txt", "video.txt"]
)
def test_text_file_alone_names_it_and_what_is_missing(tmp_path, name):
    touch(tmp_path / name, "x\n")
    with pytest.raises(MoalignError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    lack = (
        ("videos.txt", "video.txt")
        if name.startswith(("prompt", "caption"))
        else ("prompts.txt", "caption.txt")
    )
    assert f"has {name} but no " in msg and all(n in msg for n in lack)


def test_text_files_of_different_lengths_name_both(tmp_path):
    touch(tmp_path / "caption.txt", "a\nb\nc\n")
    touch(tmp_path / "video.txt", "1.mp4\n2.mp4\n")
    with pytest.raises(MoalignError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    assert "caption.txt has 3 lines" in msg and "video.txt has 2" in msg and "line-aligned" in msg


def test_several_caption_files_the_first_name_wins(tmp_path, capsys):
    touch(tmp_path / "captions.txt", "from captions\n")
    touch(tmp_path / "prompts.txt", "from prompts\n")  # today's name keeps its place
    touch(tmp_path / "videos.txt", "a.mp4\n")
    assert read_manifest(tmp_path)[0].caption == "from prompts"
    out = capsys.readouterr().out
    assert out.startswith(f"[data] {tmp_path.resolve()} has several caption files")  # the package's prefix
    assert "several caption files (prompts.txt, captions.txt): reading prompts.txt" in out


def test_text_files_named_by_the_column_arguments(tmp_path):
    # finetrainers' convention: --caption_column prompt.txt --video_column videos.txt; any names work
    touch(tmp_path / "my prompts.txt", f"{COMMAS}\n")
    touch(tmp_path / "clips.txt", "c.mp4\n")
    touch(tmp_path / "metadata.jsonl", json.dumps({"video": "j.mp4", "caption": "j"}) + "\n")
    (rec,) = read_manifest(tmp_path, caption_column="my prompts.txt", video_column="clips.txt")
    assert rec.caption == COMMAS and rec.video.name == "c.mp4"  # named files beat the detected metadata
    touch(tmp_path / "videos.txt", "v.mp4\n")
    (rec,) = read_manifest(tmp_path, caption_column="my prompts.txt")  # the other file by its usual name
    assert rec.video.name == "v.mp4"
    with pytest.raises(MoalignError, match=r"nope\.txt.*not found.*clips\.txt, my prompts\.txt"):
        read_manifest(tmp_path, caption_column="my prompts.txt", video_column="nope.txt")
    with pytest.raises(MoalignError, match="one names a text file and the other a column"):
        read_manifest(tmp_path, caption_column="my prompts.txt", video_column="file_name")


# --------------------------------------------------------------------------- sidecar captions (layout 5)


def test_sidecar_captions_recursive_and_sorted(tmp_path):
    touch(tmp_path / "b" / "clip2.webm")
    touch(tmp_path / "b" / "clip2.txt", f"  {COMMAS}\n")
    touch(tmp_path / "a" / "z.MOV")
    touch(tmp_path / "a" / "z.txt", "upper-case suffix")
    touch(tmp_path / "clip1.mp4")
    touch(tmp_path / "clip1.txt", "top level")
    for suffix in (".mkv", ".avi", ".gif"):
        touch(tmp_path / "more" / f"m{suffix}")
        touch(tmp_path / "more" / f"m{suffix}.caption", "not a sidecar")
    touch(tmp_path / "more" / "m.txt", "one caption for three videos of that stem")
    touch(tmp_path / ".cache" / "hidden.mp4")  # hidden folders are not searched
    touch(tmp_path / "notes.txt", "a stray text file is not a clip")
    m = open_manifest(tmp_path)
    assert m.layout == "sidecar .txt captions" and m.path == tmp_path.resolve() and m.missing_captions == ()
    got = [(r.video.relative_to(tmp_path.resolve()).as_posix(), r.caption) for r in m.records]
    assert got == [
        ("a/z.MOV", "upper-case suffix"),
        ("b/clip2.webm", COMMAS),  # stripped of surrounding space, never split on its commas
        ("clip1.mp4", "top level"),
        ("more/m.avi", "one caption for three videos of that stem"),
        ("more/m.gif", "one caption for three videos of that stem"),
        ("more/m.mkv", "one caption for three videos of that stem"),
    ]
    assert [r.index for r in m.records] == list(range(6))
    assert m.records[0].source == str(tmp_path.resolve() / "a" / "z.txt")


def test_sidecar_video_without_caption_is_named(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "a.txt", "fine")
    touch(tmp_path / "sub" / "lonely.mp4")
    with pytest.raises(MoalignError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    assert "1 of 2 videos" in msg and str(tmp_path.resolve() / "sub" / "lonely.mp4") in msg
    assert str(tmp_path.resolve() / "sub" / "lonely.txt") in msg  # the fix: which file to add
    # check-data lists them instead of stopping
    m = open_manifest(tmp_path, missing_captions_ok=True)
    assert m.missing_captions == (1,) and m.records[1].caption == "" and m.records[0].caption == "fine"


def test_videos_without_any_caption_are_no_dataset(tmp_path):
    touch(tmp_path / "a.mp4")
    with pytest.raises(NoManifestError, match=r"no dataset manifest.*holds 1 videos, but none has a caption"):
        read_manifest(tmp_path)


def test_no_manifest_is_its_own_error_and_a_malformed_one_is_not(tmp_path):
    """NoManifestError (a MoalignError) means "no layout here"; `moalign evaluate` falls back on it only."""
    with pytest.raises(NoManifestError, match="no dataset manifest"):
        read_manifest(tmp_path)
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "metadata.jsonl", "{not json\n")
    with pytest.raises(MoalignError, match="malformed JSON") as info:
        read_manifest(tmp_path)
    assert not isinstance(info.value, NoManifestError)


# --------------------------------------------------------------------------------- split folder (layout 4)


def test_split_folder_reads_train_and_says_so(tmp_path, capsys):
    rows = [{"file_name": "clips/0.mp4", "text": COMMAS}, {"file_name": "clips/1.mp4", "text": "second"}]
    touch(tmp_path / "train" / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    touch(tmp_path / "validation" / "metadata.csv", "file_name,text\nv.mp4,val\n")
    m = open_manifest(tmp_path)
    assert m.split == "train" and m.layout == "metadata.jsonl"
    assert m.path == tmp_path.resolve() / "train" / "metadata.jsonl"
    assert [r.caption for r in m.records] == [COMMAS, "second"]
    assert m.records[0].video == tmp_path.resolve() / "train" / "clips" / "0.mp4"  # relative to train/
    out = capsys.readouterr().out
    assert out.startswith(
        f"[data] {tmp_path.resolve()} has no manifest of its own: reading its 'train' split"
    )
    assert "not read: validation/" in out and m.columns == ("file_name", "text")
    # a manifest of its own wins over the split
    touch(tmp_path / "metadata.jsonl", json.dumps({"video": "top.mp4", "caption": "top"}) + "\n")
    m = open_manifest(tmp_path)
    assert m.split is None and [r.caption for r in m.records] == ["top"]


def test_split_folder_with_text_files(tmp_path):
    touch(tmp_path / "train" / "prompt.txt", "p\n")
    touch(tmp_path / "train" / "videos.txt", "v.mp4\n")
    m = open_manifest(tmp_path)
    assert m.split == "train" and m.records[0].video == tmp_path.resolve() / "train" / "v.mp4"


def test_train_folder_without_manifest_is_not_a_split(tmp_path):
    # videos of trains in a train/ folder beside others: a sidecar tree, read whole
    touch(tmp_path / "train" / "t.mp4")
    touch(tmp_path / "train" / "t.txt", "a train")
    touch(tmp_path / "boat" / "b.mp4")
    touch(tmp_path / "boat" / "b.txt", "a boat")
    m = open_manifest(tmp_path)
    assert m.split is None and [r.caption for r in m.records] == ["a boat", "a train"]


# ---------------------------------------------------------------------------------------- chosen columns


def test_explicit_columns_jsonl_and_csv(tmp_path):
    row = {"clip": "a.mp4", "caption": "short", "long_caption": COMMAS, "file_name": "other.mp4"}
    touch(tmp_path / "j" / "metadata.jsonl", json.dumps(row) + "\n")
    (rec,) = read_manifest(tmp_path / "j", caption_column="long_caption", video_column="clip")
    assert rec.caption == COMMAS and rec.video.name == "a.mp4"
    assert rec.extra == {"caption": "short", "file_name": "other.mp4"}  # the alias columns are not used
    touch(tmp_path / "c" / "metadata.csv", f'clip,description,caption\na.mp4,"{COMMAS}",short\n')
    (rec,) = read_manifest(tmp_path / "c", caption_column="description", video_column="clip")
    assert rec.caption == COMMAS and rec.extra == {"caption": "short"}
    # only one given: the other from the usual names
    (rec,) = read_manifest(tmp_path / "c", video_column="clip")
    assert rec.caption == "short"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("which", ["caption", "video"])
def test_explicit_column_missing_names_file_column_and_columns(tmp_path, fmt, which):
    if fmt == "jsonl":
        touch(tmp_path / "metadata.jsonl", json.dumps({"video": "a.mp4", "caption": "x", "score": 1}) + "\n")
    else:
        touch(tmp_path / "metadata.csv", "video,caption,score\na.mp4,x,1\n")
    with pytest.raises(MoalignError) as info:
        read_manifest(tmp_path, **{f"{which}_column": "desc"})
    msg = str(info.value)
    assert f"metadata.{fmt}:1" in msg and f"'desc' ({which}_column)" in msg and "video, caption, score" in msg


def test_columns_do_not_apply_to_layouts_without_columns(tmp_path):
    touch(tmp_path / "t" / "prompts.txt", "p\n")
    touch(tmp_path / "t" / "videos.txt", "v.mp4\n")
    with pytest.raises(
        MoalignError, match=r"caption_column='desc' names a column.*prompts\.txt \+ videos\.txt"
    ):
        read_manifest(tmp_path / "t", caption_column="desc")
    touch(tmp_path / "s" / "a.mp4")
    touch(tmp_path / "s" / "a.txt", "x")
    with pytest.raises(MoalignError, match=r"video_column='path' names a column.*\.txt captions"):
        read_manifest(tmp_path / "s", video_column="path")


def test_list_caption_is_an_error_not_a_string(tmp_path):
    touch(tmp_path / "metadata.jsonl", json.dumps({"video": "a.mp4", "caption": ["one", "two"]}) + "\n")
    with pytest.raises(MoalignError, match=r"metadata\.jsonl:1: the caption in column 'caption' is a list"):
        read_manifest(tmp_path)


def test_data_config_columns_reach_the_dataset(tmp_path):
    make_video(tmp_path / "clips" / "a.mp4")
    touch(tmp_path / "metadata.csv", f'clip,description\nclips/a.mp4,"{COMMAS}"\n')
    cfg = apply_overrides(DataConfig(num_frames=5), ["caption_column=description", "video_column=clip"])
    assert (cfg.caption_column, cfg.video_column) == ("description", "clip")
    item = VideoClipDataset(tmp_path, cfg)[0]
    assert item["caption"] == COMMAS and item["frames"].shape == (5, 64, 64, 3)
    with pytest.raises(MoalignError, match="no video column"):
        VideoClipDataset(tmp_path, DataConfig(num_frames=5))
    with pytest.raises(ValueError, match="caption_column='' is not a column name"):
        DataConfig(caption_column="")


# ------------------------------------------------------------------------------ skipped clips in a cache


class _Flaky(torch.utils.data.Dataset):
    """Clips 1 and 3 fail to decode (as a video that passes the probe but is cut short later)."""

    def __init__(self, root: Path) -> None:
        self.cfg = DataConfig(skip_bad_videos=True)
        self.records = [ClipRecord(i, root / f"{i}.mp4", f"clip {i}, with a comma") for i in range(5)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        if i in (1, 3):
            raise MoalignError(f"cannot decode video {self.records[i].video}")
        return {"x": torch.full((2,), float(i))}


def test_cache_manifest_names_skipped_clips(tmp_path):
    ds = _Flaky(tmp_path)
    writer = CacheWriter(tmp_path / "c", "test", {"n": 5}, len(ds), shard_size=2)
    fill_cache(writer, ds, lambda s: {"x": s["x"]}, desc="t", progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    reason = {str(i): f"cannot decode video {tmp_path / f'{i}.mp4'}" for i in (1, 3)}
    assert manifest["skipped"] == reason  # the old format, unchanged
    assert manifest["skipped_clips"] == {
        str(i): {
            "video": str(tmp_path / f"{i}.mp4"),
            "caption": f"clip {i}, with a comma",
            "reason": reason[str(i)],
        }
        for i in (1, 3)
    }
    cache = Cache(tmp_path / "c", "test")
    assert cache.skipped == {1: reason["1"], 3: reason["3"]} and cache.indices == [0, 2, 4]


def test_cache_manifest_from_shards_without_clip_names(tmp_path):
    # shards written before clips were named (or by a caller that does not name them): the reason alone
    writer = CacheWriter(tmp_path, "test", {"n": 2}, 2, shard_size=1)
    writer.write_shard(0, {0: {"x": torch.zeros(1)}})
    writer.write_shard(1, {}, {1: "bad"})
    writer.finalize()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["skipped"] == {"1": "bad"} and manifest["skipped_clips"] == {"1": {"reason": "bad"}}
    assert Cache(tmp_path).skipped == {1: "bad"}
    with pytest.raises(ValueError, match="skipped_clips for items not skipped"):
        writer.write_shard(0, {0: {"x": torch.zeros(1)}}, skipped_clips={0: {"video": "v"}})


def _dropping_dataset(root: Path) -> tuple[list[Path], Path]:
    """good_a.mp4, broken.mp4 (not a video), good_b.mp4 in a metadata.jsonl, rows 0, 1, 2."""
    root.mkdir(parents=True, exist_ok=True)
    make_video(root / "good_a.mp4", seed=1)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    make_video(root / "good_b.mp4", seed=2)
    rows = [{"video": n, "caption": f"{n}, with a comma"} for n in ("good_a.mp4", "broken.mp4", "good_b.mp4")]
    touch(root / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return [root / "good_a.mp4", root / "good_b.mp4"], root / "broken.mp4"


def _frames_mean(sample: dict) -> dict[str, torch.Tensor]:
    return {"mean": sample["frames"].float().mean().reshape(1)}


def test_cache_manifest_lists_clips_dropped_at_construction(tmp_path):
    """A clip the dataset drops never gets an index; every cache still names it, its caption, row and reason,
    and an uninterrupted, a resumed and a two-process build write the same manifest."""
    _dropping_dataset(tmp_path / "data")
    cfg = DataConfig(num_frames=5, height=16, width=16, skip_bad_videos=True)

    def dataset() -> VideoClipDataset:  # each process builds its own
        return VideoClipDataset(tmp_path / "data", cfg, load_flow=False)

    ds = dataset()
    assert len(ds) == 2 and [r.video.name for r in ds.records] == ["good_a.mp4", "good_b.mp4"]
    fp = {"test": 1, **dataset_identity(ds)}

    def writer(name: str) -> CacheWriter:
        return CacheWriter(tmp_path / name, "test", fp, len(ds), shard_size=1)

    fill_cache(writer("one"), dataset(), _frames_mean, desc="t", progress=False)
    fill_cache(writer("resumed"), dataset(), _frames_mean, desc="t", progress=False, rank=0, world_size=2)
    assert not (tmp_path / "resumed" / "manifest.json").exists()  # "killed" after shard 0
    fill_cache(writer("resumed"), dataset(), _frames_mean, desc="t", progress=False)  # resume, one process
    for rank in (1, 0):  # two processes, then one of them finalizes without a dataset
        fill_cache(writer("two"), dataset(), _frames_mean, desc="t", progress=False, rank=rank, world_size=2)
    finalize_cache(tmp_path / "two")

    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    (dropped,) = manifest["dropped_clips"]
    broken = (tmp_path / "data" / "broken.mp4").resolve()
    assert {k: v for k, v in dropped.items() if k != "reason"} == {
        "video": str(broken),
        "caption": "broken.mp4, with a comma",
        "kind": "unreadable",
        "row": 1,
        "source": f"{(tmp_path / 'data' / 'metadata.jsonl').resolve()}:2",
    }
    assert dropped["reason"].startswith(f"cannot decode video {broken}") and "re-encode" in dropped["reason"]
    assert manifest["skipped"] == {} and manifest["skipped_clips"] == {}  # skipped: decoded badly later
    for name in ("resumed", "two"):
        other = json.loads((tmp_path / name / "manifest.json").read_text())
        # each shard records the process that wrote it ("process": "0/2"), so shard bytes (and their sha256)
        # differ between a one-process and a two-process build; everything else is the same
        assert {**other, "shard_sha256": None} == {**manifest, "shard_sha256": None}, name
    # the fingerprint does not hold the drops, and the cache reads as before
    assert "dropped" not in (tmp_path / "one" / "cache.json").read_text()
    cache = Cache(tmp_path / "one", "test", fp)
    assert cache.indices == [0, 1] and cache.skipped == {}


def test_cache_without_dropped_clips_file_still_finalizes_and_opens(tmp_path):
    # caches begun before drops were recorded (or filled without fill_cache): an empty list; old manifests open
    writer = CacheWriter(tmp_path, "test", {"n": 1}, 1, shard_size=1)
    writer.write_shard(0, {0: {"x": torch.zeros(1)}})
    writer.finalize()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dropped_clips"] == []
    del manifest["dropped_clips"], manifest["skipped_clips"]  # what an older moalign wrote
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Cache(tmp_path, "test").indices == [0]
    (tmp_path / "dropped_clips.json").write_text("{broken")
    with pytest.raises(MoalignError, match=r"dropped_clips.json is unreadable.*Delete it and re-run"):
        writer.finalize()
    with pytest.raises(ValueError, match="needs 'video' and 'reason'"):
        writer.record_dropped([{"video": "v.mp4"}])


def test_a_build_stopped_at_a_bad_clip_reruns_with_skip_bad_videos(tmp_path, capsys):
    """The error says to pass --skip-bad-videos; every video is probed before any work, so the failed build
    leaves no cache in the way, and the re-run with the flag builds it, naming the dropped clip."""
    _dropping_dataset(tmp_path / "data")
    strict = DataConfig(num_frames=5, height=16, width=16)

    def build(cfg: DataConfig) -> Path:
        ds = VideoClipDataset(tmp_path / "data", cfg, load_flow=False)
        writer = CacheWriter(tmp_path / "c", "test", {"test": 1, **dataset_identity(ds)}, len(ds))
        return fill_cache(writer, ds, _frames_mean, desc="t", progress=False)

    with pytest.raises(MoalignError, match="--skip-bad-videos"):
        build(strict)
    assert not (tmp_path / "c").exists()
    build(replace(strict, skip_bad_videos=True))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["num_items"] == 2 and manifest["fingerprint"]["num_clips"] == 2
    assert [Path(c["video"]).name for c in manifest["dropped_clips"]] == ["broken.mp4"]
