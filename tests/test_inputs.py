"""The videos and manifests users really have (issue 13): phone clips turned by their display matrix, every valid
CSV / JSON / JSON Lines / text manifest read as its format says, repeated rows and empty captions counted and
reported, error advice that works when it is followed, and the re-run a bad video's error advises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import texture
from test_video_io import portrait_moving_down, write_turned

from moalign.cli import main
from moalign.data.check import check_dataset
from moalign.data.dataset import VideoClipDataset, drop_reason
from moalign.data.manifest import open_manifest, read_manifest
from moalign.data.sampling import DataConfig, read_clip
from moalign.data.video_io import read_video, write_video
from moalign.errors import MoalignError
from moalign.evaluation.folder import find_videos

CFG = DataConfig(num_frames=5, height=32, width=32)
TWO_LINES = "a red ball falls\nand bounces"


def video(path: Path, t: int = 9, fps: float = 8.0, seed: int = 0, h: int = 32, w: int = 32) -> Path:
    """A small textured clip moving right 2 px/frame."""
    frames = np.stack([np.roll(texture(h, w, seed, blur=1.5), 2 * i, axis=1) for i in range(t)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def captions(root: Path, **kwargs) -> list[str]:
    return [r.caption for r in read_manifest(root, **kwargs)]


def run(argv: list[str], capsys) -> tuple[int, str]:
    """`moalign ARGV` in this process: (exit status, everything it printed)."""
    capsys.readouterr()
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out + out.err


# ------------------------------------------------------------------------------------------ display rotation


@pytest.fixture
def phone(tmp_path) -> Path:
    """A folder with a portrait phone clip (landscape frames + rotation 90) and the same clip stored upright."""
    root = tmp_path / "phone"
    root.mkdir()
    upright = portrait_moving_down(t=9, h=48, w=32)  # moving down 2 px/frame
    write_turned(root / "phone.mp4", np.rot90(upright, 1, axes=(1, 2)), -90)
    write_turned(root / "upright.mp4", upright, 0)
    (root / "metadata.csv").write_text(
        "video,caption\nphone.mp4,a texture moves down\nupright.mp4,the same\n"
    )
    return root


def test_every_decode_path_shows_a_phone_clip_upright(phone):
    from moalign.data.flow import build_flow_estimator

    ref, _ = read_video(phone / "upright.mp4")
    assert ref.shape == (9, 48, 32, 3)
    # read_video (evaluate, judge, validation), read_clip (datasets, check-data's sheet, evaluate --teacher)
    frames, _ = read_video(phone / "phone.mp4")
    assert frames.shape == ref.shape and np.abs(frames.astype(int) - ref).mean() < 2
    clip, _, _ = read_clip(phone / "phone.mp4", CFG)
    assert clip.shape == (5, 48, 32, 3) and np.abs(clip.astype(int) - ref[:5]).mean() < 2
    # the dataset crops it as a portrait clip: a portrait clip size keeps the whole picture
    item = VideoClipDataset(phone, DataConfig(num_frames=5, height=48, width=32))[0]
    assert np.abs(item["frames"].numpy().astype(int) - ref[:5]).mean() < 2
    flow = build_flow_estimator("dis").pair(clip[1], clip[2])[8:-8, 8:-8]
    assert np.median(flow[..., 1]) == pytest.approx(2.0, abs=0.3) and abs(np.median(flow[..., 0])) < 0.3


def test_check_data_reports_the_shown_size(phone):
    report = check_dataset(phone, DataConfig(num_frames=5, height=32, width=48), sample=2)
    by_name = {Path(c["video"]).name: c for c in report["clips"]}
    for name in ("phone.mp4", "upright.mp4"):
        assert (by_name[name]["width"], by_name[name]["height"]) == (32, 48), name
        # narrower than the clip (enlarged), and cut from portrait to landscape it loses 56%
        assert by_name[name]["problems"] == ["small", "crop"]
    assert report["sheet_errors"] == []


def test_a_turn_moalign_cannot_apply_is_found_by_the_probe(tmp_path):
    write_turned(tmp_path / "tilted.mp4", portrait_moving_down(t=9), 30)
    video(tmp_path / "ok.mp4")
    jsonl(
        tmp_path / "metadata.jsonl",
        [{"video": "tilted.mp4", "caption": "t"}, {"video": "ok.mp4", "caption": "o"}],
    )
    kind, reason = drop_reason(tmp_path / "tilted.mp4", CFG)
    assert (
        kind == "unreadable"
        and "turned 30.0 degrees counterclockwise" in reason
        and "--skip-bad-videos" in reason
    )
    ds = VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32, skip_bad_videos=True))
    assert [r.video.name for r in ds.records] == ["ok.mp4"] and "--skip-bad-videos" not in ds.dropped[0][
        "reason"
    ]


# --------------------------------------------------------------------------- manifests read as their format


CSV_INPUTS = {
    "caption over two lines": (b'video,caption\na.mp4,"a red ball falls\nand bounces"\nb.mp4,plain\n', [TWO_LINES, "plain"]),
    "BOM and CRLF": (b'\xef\xbb\xbfvideo,caption\r\na.mp4,a ball\r\nb.mp4,"x, y"\r\n', ["a ball", "x, y"]),
    "quoted commas and quotes": (b'video,caption\na.mp4,"a ball, then a ""cube"""\n', ['a ball, then a "cube"']),
    "CRLF file, line break in a caption": (b'video,caption\r\na.mp4,"one\r\ntwo"\r\n', ["one\r\ntwo"]),
    "blank lines, no final newline": (b"video,caption\n\na.mp4,a\n\nb.mp4,b", ["a", "b"]),
    "other column order": (b'caption,fps,video\n"c, d",8,a.mp4\n', ["c, d"]),
    "unicode line separators": ('video,caption\na.mp4,one\u2028two\x85three\n'.encode(), ["one\u2028two\x85three"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CSV_INPUTS))
def test_csv_manifests_read_as_csv(tmp_path, name):
    data, want = CSV_INPUTS[name]
    (tmp_path / "metadata.csv").write_bytes(data)
    assert captions(tmp_path) == want
    assert captions(tmp_path / "metadata.csv") == want  # the file itself


def test_csv_rows_name_their_lines(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(
        b'video,caption\na.mp4,"a red ball falls\nand bounces"\n\nb.mp4,x\n'
    )
    a, b = read_manifest(tmp_path)
    assert (
        a.caption == TWO_LINES
        and a.source.endswith("metadata.csv:2-3")
        and b.source.endswith("metadata.csv:5")
    )
    (tmp_path / "metadata.csv").write_bytes(b"video,caption\na.mp4,x\nb.mp4,a ball, then a cube\n")
    with pytest.raises(
        MoalignError, match=r"metadata\.csv:3: the row has more fields than the header \(3 > 2\)"
    ):
        read_manifest(tmp_path)


JSONL_INPUTS = {
    "BOM and CRLF": "\ufeff" + json.dumps({"video": "a.mp4", "caption": "a"}) + "\r\n"
    + json.dumps({"video": "b.mp4", "caption": TWO_LINES}) + "\r\n",
    # JSON strings may hold U+2028, U+2029 and U+0085 as they are: str.splitlines cut the line there
    "unicode line separators": json.dumps({"video": "a.mp4", "caption": "one\u2028two\u2029three\x85four"},
                                          ensure_ascii=False) + "\n",
    "blank lines, no final newline": "\n" + json.dumps({"video": "a.mp4", "caption": "a"}) + "\n\n"
    + json.dumps({"caption": "b", "video": "b.mp4"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(JSONL_INPUTS))
def test_jsonl_manifests_read_as_json_lines(tmp_path, name):
    (tmp_path / "metadata.jsonl").write_bytes(JSONL_INPUTS[name].encode())
    want = [
        json.loads(line)["caption"]
        for line in JSONL_INPUTS[name].lstrip("\ufeff").split("\n")
        if line.strip()
    ]
    assert captions(tmp_path) == want and len(want) >= 1


def test_json_array_manifest(tmp_path):
    rows = [{"video": "a.mp4", "caption": TWO_LINES}, {"file_name": "b.mp4", "prompt": "x, y"}]
    text = "\ufeff" + json.dumps(rows, indent=2, ensure_ascii=False).replace("\n", "\r\n")
    (tmp_path / "metadata.json").write_bytes(text.encode())
    m = open_manifest(tmp_path)
    assert m.layout == "metadata.json" and [r.caption for r in m.records] == [TWO_LINES, "x, y"]
    assert m.records[1].source.endswith("metadata.json[1]") and m.columns == (
        "video",
        "caption",
        "file_name",
        "prompt",
    )
    assert captions(tmp_path / "metadata.json") == [TWO_LINES, "x, y"]
    (tmp_path / "metadata.json").write_text('[{"video": "a.mp4", "caption": "a"},\n {"video": }]')
    with pytest.raises(MoalignError, match=r"metadata\.json:2: malformed JSON"):
        read_manifest(tmp_path)
    (tmp_path / "metadata.json").write_text('{"video": "a.mp4", "caption": "a"}')
    with pytest.raises(MoalignError, match="expected a JSON array of objects"):
        read_manifest(tmp_path)
    (tmp_path / "metadata.csv").write_text("video,caption\nc.mp4,from csv\n")  # the csv is read first
    assert captions(tmp_path) == ["from csv"]


TXT_INPUTS = {
    "BOM and CRLF": ("\ufeffa ball, rolling\r\nsecond\r\n", "a.mp4\r\nb.mp4\r\n", ["a ball, rolling", "second"]),
    "CR line ends": ("a\rb\r", "a.mp4\rb.mp4\r", ["a", "b"]),
    # a caption with U+2028, U+0085 or a form feed is one line of prompts.txt: splitting there misaligned
    "unicode line separators": ("one\u2028two\x0cthree\x85four\nsecond\n", "a.mp4\nb.mp4\n",
                                ["one\u2028two\x0cthree\x85four", "second"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TXT_INPUTS))
def test_prompts_and_videos_txt_read_as_lines(tmp_path, name):
    prompts, videos, want = TXT_INPUTS[name]
    (tmp_path / "prompts.txt").write_bytes(prompts.encode())
    (tmp_path / "videos.txt").write_bytes(videos.encode())
    assert captions(tmp_path) == want
    assert [r.video.name for r in read_manifest(tmp_path)] == ["a.mp4", "b.mp4"]


def test_sidecar_caption_is_the_whole_file(tmp_path):
    video(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_bytes("\ufeffa red ball falls\r\nand bounces\r\n".encode())
    assert captions(tmp_path) == [TWO_LINES]


def test_evaluate_reads_captions_as_the_manifest_says(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(
        b'\xef\xbb\xbfvideo,caption\r\na.mp4,"a red ball falls\nand bounces"\r\n'
    )
    video(tmp_path / "a.mp4")
    assert find_videos(tmp_path) == [(tmp_path.resolve() / "a.mp4", TWO_LINES)]


# ------------------------------------------------------------------------- empty captions and repeated rows


def empty_caption_folder(root: Path, layout: str, empty: int = 7) -> Path:
    """Clip 0 captioned, then `empty` clips with empty / blank / null captions, in a `layout` folder."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"c{i}.mp4" for i in range(1 + empty)]
    for i, n in enumerate(names):
        video(root / n, seed=i)
    texts = ["a ball"] + [["", "  ", None][i % 3] for i in range(empty)]
    if layout == "jsonl":
        jsonl(
            root / "metadata.jsonl", [{"video": n, "caption": c} for n, c in zip(names, texts, strict=True)]
        )
    elif layout == "csv":
        (root / "metadata.csv").write_text(
            "video,caption\n" + "".join(f"{n},{c or ''}\n" for n, c in zip(names, texts, strict=True))
        )
    elif layout == "txt":
        (root / "prompts.txt").write_text("".join(f"{c or ''}\n" for c in texts))
        (root / "videos.txt").write_text("".join(f"{n}\n" for n in names))
    else:  # sidecar
        for n, c in zip(names, texts, strict=True):
            (root / n).with_suffix(".txt").write_text(c or "")
    return root


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt", "sidecar"])
def test_empty_or_null_captions_stop_the_dataset_naming_the_rows(tmp_path, layout, capsys):
    root = empty_caption_folder(tmp_path / "d", layout)
    with pytest.raises(MoalignError) as info:
        VideoClipDataset(root, CFG)
    msg = str(info.value)
    assert msg.startswith("7 of 8 clips have an empty or null caption: ") and "and 2 more" in msg
    first = {"jsonl": "metadata.jsonl:2", "csv": "metadata.csv:3", "txt": "videos.txt:2", "sidecar": "c1.txt"}
    assert f"{root.resolve()}/{first[layout]} (c1.mp4)" in msg
    assert "--set data.allow_empty_captions=true" in msg and "check-data" in msg
    ds = VideoClipDataset(root, DataConfig(num_frames=5, height=32, width=32, allow_empty_captions=True))
    assert len(ds) == 8 and ds[1]["caption"] == "" and ds[0]["caption"] == "a ball"
    assert (
        "[data] 7 of 8 clips have an empty or null caption and train as the empty prompt"
        in capsys.readouterr().out
    )
    report = check_dataset(root, CFG, sample=0)
    assert report["counts"]["empty_caption"] == 7 and "allow_empty_captions=true" in report["run_stops"][0]


def test_repeated_rows_are_kept_and_counted(tmp_path, capsys):
    for n in ("a", "b"):
        video(tmp_path / f"{n}.mp4")
    rows = [("a", "A"), ("b", "B"), ("a", "A"), ("a", "A, from above"), ("b", "B")]
    manifest = jsonl(
        tmp_path / "metadata.jsonl", [{"video": f"{v}.mp4", "caption": c} for v, c in rows]
    ).resolve()
    ds = VideoClipDataset(tmp_path, CFG)
    assert len(ds) == 5  # kept: the manifest lists them (docs/data.md says why)
    out = capsys.readouterr().out
    assert "[data] 2 of 5 rows repeat an earlier row (same video and caption)" in out
    assert f"First: {manifest}:3 repeats {manifest}:1 (a.mp4)" in out
    report = check_dataset(tmp_path, CFG, sample=0)
    assert [p["index"] for p in report["problems"]["duplicate_row"]] == [2, 4]
    assert [p["index"] for p in report["problems"]["duplicate_path"]] == [3]  # another caption for a.mp4
    assert report["run_stops"] == []  # a warning, not a stop


def test_playground_manifests_have_neither(playground):
    records = read_manifest(playground(10))
    assert all(r.caption.strip() for r in records) and len({(r.video, r.caption) for r in records}) == 10
    assert len(VideoClipDataset(playground(10), DataConfig(num_frames=9, height=32, width=32))) == 10


# --------------------------------------------------------------------------- advice that works when followed

SUGGESTION = re.compile(r"--num-frames \d+|--fps [\d.]+|--set [\w.]+=\S+|--skip-bad-videos")


def suggestions(message: str) -> list[list[str]]:
    """The flags an error message suggests, each as argv words (a trailing ',' or ')' dropped)."""
    return [m.group().rstrip(",.)").split(" ") for m in SUGGESTION.finditer(message)]


def flow_argv(data: Path, out: Path, *flags: str) -> list[str]:
    return ["flow", "--data", str(data), "--out", str(out), "--height", "32", "--width", "32", "--quiet", *flags]  # fmt: skip


@pytest.fixture
def with_short_clip(tmp_path) -> Path:
    """Six 9-frame clips at 8 fps and one of 7 frames."""
    root = tmp_path / "short"
    for i in range(6):
        video(root / f"c{i}.mp4", seed=i)
    video(root / "short.mp4", t=7, seed=9)
    jsonl(root / "metadata.jsonl", [{"video": f"c{i}.mp4", "caption": f"clip {i}"} for i in range(6)]
          + [{"video": "short.mp4", "caption": "short"}])  # fmt: skip
    return root


def test_too_short_advice_runs_through_stage_1(with_short_clip, tmp_path, capsys, videomae_folder):
    status, out = run(flow_argv(with_short_clip, tmp_path / "f9", "--num-frames", "9"), capsys)
    assert status == 2 and "short.mp4 has 7 frames at 8 fps" in out
    advised = suggestions(out)
    assert ["--num-frames", "5"] in advised and ["--skip-bad-videos"] in advised
    assert not any(a[0] == "--fps" for a in advised)  # at the native rate a higher --fps repeats frames
    for i, flags in enumerate(advised):
        assert (
            run(flow_argv(with_short_clip, tmp_path / f"f{i}", "--num-frames", "9", *flags), capsys)[0] == 0
        )
    # --num-frames 5 is a clip stage 1's encoder takes (1 was advised before, and crashed stage 1)
    stage1 = ["stage1", "--data", str(with_short_clip), "--out", str(tmp_path / "run"), "--encoder", str(videomae_folder),
              "--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--batch-size", "2", "--quiet",
              "--set", "encoder.input_size=32,32", "--set", "val_clips=2", "--set", "stats_clips=4", "--set",
              "probe_clips=4", "--set", "projector.hidden_dim=16", "--set", "decoder.hidden_dim=8", "--set",
              "warmup_steps=1", "--set", "val_every=2", "--set", "checkpoint_every=2", "--set", "log_every=1"]  # fmt: skip
    status, out = run(stage1, capsys)
    assert status == 0, out
    status, out = run(flow_argv(with_short_clip, tmp_path / "f1", "--num-frames", "1"), capsys)
    assert status == 2 and "Use --num-frames 5" in out and "Traceback" not in out


def test_a_higher_fps_is_advised_when_it_fits(tmp_path, capsys):
    root = tmp_path / "d"
    for i in range(2):
        video(root / f"c{i}.mp4", t=17, fps=16.0, seed=i)
    video(root / "short.mp4", t=13, fps=16.0, seed=5)
    jsonl(root / "metadata.jsonl", [{"video": f"{n}.mp4", "caption": n} for n in ("c0", "c1", "short")])
    status, out = run(flow_argv(root, tmp_path / "o", "--num-frames", "9", "--fps", "8"), capsys)
    assert status == 2 and "short.mp4 has 13 frames at 16 fps" in out and "needs 17" in out
    advised = suggestions(out)
    fps = [a for a in advised if a[0] == "--fps"]
    assert fps and 8 < float(fps[0][1]) <= 16  # higher than asked, at most the native rate
    assert ["--num-frames", "5"] in advised
    for i, flags in enumerate(advised):
        argv = flow_argv(root, tmp_path / f"o{i}", "--num-frames", "9", "--fps", "8", *flags)
        assert run(argv, capsys)[0] == 0, flags


def test_fps_above_the_native_rate_advice(tmp_path, capsys):
    root = tmp_path / "d"
    video(root / "slow.mp4", t=9, fps=4.0)
    video(root / "fast.mp4", t=17, fps=16.0, seed=1)
    jsonl(root / "metadata.jsonl", [{"video": f"{n}.mp4", "caption": n} for n in ("slow", "fast")])
    # the cogvideox-2b preset samples at 8 fps: leaving --fps out keeps that rate
    argv = flow_argv(root, tmp_path / "o", "--preset", "cogvideox-2b", "--num-frames", "5")
    status, out = run(argv, capsys)
    assert status == 2 and "slow.mp4: fps=8 is above the video's native 4 fps" in out
    advised = suggestions(out)
    assert (
        ["--fps", "4"] in advised
        and ["--set", "data.fps=None"] in advised
        and ["--skip-bad-videos"] in advised
    )
    for i, flags in enumerate(advised):
        assert run([*argv[:4], str(tmp_path / f"o{i}"), *argv[5:], *flags], capsys)[0] == 0, flags


def test_exact_flow_subsampled_advice(playground, tmp_path, capsys):
    argv = flow_argv(playground(4), tmp_path / "o", "--num-frames", "5", "--fps", "4", "--method", "exact")
    status, out = run(argv, capsys)
    assert status == 2 and "exact ground-truth flow is between consecutive native frames" in out
    assert ["--set", "data.fps=None"] in suggestions(out) and "moalign flow --method dis" in out
    assert run([*argv, "--set", "data.fps=None"], capsys)[0] == 0
    argv[4] = str(tmp_path / "dis")
    assert run([*argv[:-1], "dis"], capsys)[0] == 0  # flow on the sampled frames


def test_empty_caption_advice(tmp_path, capsys):
    root = empty_caption_folder(tmp_path / "d", "csv", empty=1)
    status, out = run(flow_argv(root, tmp_path / "o", "--num-frames", "5"), capsys)
    assert status == 2 and "1 of 2 clips have an empty or null caption" in out
    (flags,) = suggestions(out)
    assert flags == ["--set", "data.allow_empty_captions=true"]
    assert run(flow_argv(root, tmp_path / "o", "--num-frames", "5", *flags), capsys)[0] == 0


# ------------------------------------------------------------------- a re-run after a build stopped at a bad video


@pytest.fixture
def with_corrupt_clip(tmp_path) -> Path:
    root = tmp_path / "corrupt"
    for i in range(3):
        video(root / f"c{i}.mp4", seed=i)
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    names = ["c0", "bad", "c1", "c2"]
    jsonl(root / "metadata.jsonl", [{"video": f"{n}.mp4", "caption": n} for n in names])
    return root


@pytest.mark.parametrize("command", ["flow", "precompute"])
def test_skip_bad_videos_rerun_after_a_failed_build(with_corrupt_clip, tmp_path, capsys, command):
    out_dir = tmp_path / "out"
    argv = flow_argv(with_corrupt_clip, out_dir, "--num-frames", "5")
    if command == "precompute":
        argv = ["precompute", "--flow", "dis", *argv[1:]]
    cache = out_dir / "flow" if command == "precompute" else out_dir
    status, out = run(argv, capsys)
    assert status == 2 and "bad.mp4" in out and ["--skip-bad-videos"] in suggestions(out)
    assert not (cache / "cache.json").exists()  # every video is probed first: the failed build wrote nothing
    status, out = run([*argv, "--skip-bad-videos"], capsys)
    assert status == 0, out
    manifest = json.loads((cache / "manifest.json").read_text())
    (dropped,) = manifest["dropped_clips"]
    assert (
        Path(dropped["video"]).name == "bad.mp4" and dropped["row"] == 1 and dropped["kind"] == "unreadable"
    )
    assert manifest["num_items"] == 3


def test_skip_bad_videos_rerun_after_a_build_stopped_past_its_first_shard(
    with_corrupt_clip, tmp_path, capsys
):
    jsonl(
        with_corrupt_clip / "metadata.jsonl",
        [{"video": f"{n}.mp4", "caption": n} for n in ["c0", "c1", "bad", "c2"]],
    )
    argv = flow_argv(with_corrupt_clip, tmp_path / "out", "--num-frames", "5", "--shard-size", "1")
    status, out = run(argv, capsys)
    # the bad clip (row 2, past the first shard) is found before any shard is written, not mid-build
    assert status == 2 and "bad.mp4" in out and not (tmp_path / "out" / "shard-00000.safetensors").exists()
    status, out = run([*argv, "--skip-bad-videos"], capsys)
    assert status == 0, out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_items"] == 3


# --------------------------------------------------------------- a new DataConfig field and what was made before


def test_allow_empty_captions_is_not_part_of_a_cache_fingerprint(tmp_path):
    from moalign.data.cache import dataset_identity

    video(tmp_path / "a.mp4")
    jsonl(tmp_path / "metadata.jsonl", [{"video": "a.mp4", "caption": "a"}])
    ds = VideoClipDataset(tmp_path, CFG)
    assert "allow_empty_captions" not in dataset_identity(ds)["data"]


def test_a_run_started_before_the_field_existed_resumes(tmp_path):
    from moalign.presets import get_preset
    from moalign.run.checkpoint import check_resume_config
    from moalign.run.serialize import to_dict

    config = to_dict(get_preset("tiny").stage1)
    before = json.loads(json.dumps(config))
    del before["data"]["allow_empty_captions"]
    (tmp_path / "config.json").write_text(json.dumps({"config": before}))
    check_resume_config(tmp_path, config)


def test_targets_take_the_empty_caption_advice(stage1_run, tmp_path, capsys):
    root = empty_caption_folder(tmp_path / "d", "jsonl", empty=1)
    argv = [
        "targets",
        "--data",
        str(root),
        "--teacher",
        str(stage1_run.folder),
        "--out",
        str(tmp_path / "t"),
        "--quiet",
    ]
    status, out = run(argv, capsys)
    assert status == 2 and "--set data.allow_empty_captions=true" in out
    status, out = run([*argv, "--set", "data.allow_empty_captions=true"], capsys)
    assert status == 0, out


def test_prompts_files_keep_one_prompt_per_line(tmp_path):
    """generate's prompts file: a BOM dropped, CRLF and CR line ends, a U+2028 inside a prompt kept (str.splitlines
    cut there and made two prompts of one)."""
    from moalign.generate import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red ball\u2028falls\r\na blue ball\rrolls\n\n".encode())
    assert read_prompts(path) == ["a red ball\u2028falls", "a blue ball", "rolls"]


def test_bad_videos_and_empty_captions_are_named_in_one_error(with_corrupt_clip):
    """A bad video and an empty caption in one manifest: one error names both (not one per run)."""
    rows = [{"video": f"{n}.mp4", "caption": "" if n == "c1" else n} for n in ["c0", "bad", "c1", "c2"]]
    jsonl(with_corrupt_clip / "metadata.jsonl", rows)
    with pytest.raises(MoalignError) as info:
        VideoClipDataset(with_corrupt_clip, CFG)
    msg = str(info.value)
    assert "bad.mp4" in msg and "--skip-bad-videos" in msg
    assert "Also: " in msg and "allow_empty_captions" in msg and "metadata.jsonl:3" in msg
