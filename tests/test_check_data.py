"""`check_dataset`: every problem of a dataset counted and named, and the drops agree with a real run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import texture
from PIL import Image

from moalign.data.check import PROBLEMS, check_dataset, crop_loss, format_report
from moalign.data.dataset import DROP_KINDS, VideoClipDataset
from moalign.data.sampling import DataConfig
from moalign.data.video_io import write_video
from moalign.errors import MoalignError

CFG = DataConfig(num_frames=9, height=32, width=32)


def make_video(path: Path, t: int = 9, h: int = 32, w: int = 32, seed: int = 0) -> None:
    frames = np.stack([np.roll(texture(h, w, seed, blur=1.5), 2 * i, axis=1) for i in range(t)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, 8.0)


def clip(root: Path, name: str, caption: str | None, **video) -> None:
    """root/name.mp4 (random bytes when video is {"bad": True}) and its sidecar caption (none when None)."""
    if video.pop("bad", False):
        (root / f"{name}.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        make_video(root / f"{name}.mp4", **video)
    if caption is not None:
        (root / f"{name}.txt").write_text(caption)


@pytest.fixture
def messy(tmp_path) -> Path:
    """A sidecar folder with one clip of each problem and one good clip."""
    root = tmp_path / "data"
    root.mkdir()
    clip(root, "good", "a ball rolls, then stops")
    clip(root, "bad", "unreadable", bad=True)
    clip(root, "short", "too short", t=4, seed=1)
    shutil.copy(root / "good.mp4", root / "good_copy.mp4")  # sorted after good.mp4
    (root / "good_copy.txt").write_text("the same bytes as good")
    clip(root, "nocap", None, seed=2)
    clip(root, "tiny", "smaller than 32x32", h=16, w=16, seed=3)
    clip(root, "wide", "  ", h=32, w=96, seed=4)  # empty caption, and a square crop drops 2/3
    return root


def names(report: dict, kind: str) -> list[str]:
    return [Path(p["video"]).name for p in report["problems"][kind]]


def test_every_problem_counted_and_named(messy, tmp_path):
    report = check_dataset(messy, CFG, out_dir=tmp_path / "out", sample=4)
    assert report["layout"] == "sidecar .txt captions" and report["num_clips"] == 7
    expected = {
        "missing": [],
        "unreadable": ["bad.mp4"],
        "frame_rate": [],
        "too_short": ["short.mp4"],
        "missing_caption": ["nocap.mp4"],
        "empty_caption": ["wide.mp4"],
        "small": ["tiny.mp4"],
        "crop": ["wide.mp4"],
        "duplicate_row": [],
        "duplicate_path": [],
        "duplicate_content": ["good_copy.mp4"],  # the second copy is counted
    }
    assert {k: names(report, k) for k in PROBLEMS} == expected
    assert report["counts"] == {k: len(v) for k, v in expected.items()}
    assert "good.mp4" in report["problems"]["duplicate_content"][0]["detail"]
    assert "has 4 frames" in report["problems"]["too_short"][0]["detail"]
    assert "67%" in report["problems"]["crop"][0]["detail"]
    assert report["num_ok"] == 1  # good.mp4 alone
    assert report["would_drop"] == {
        "count": 2,
        "by_kind": {"missing": 0, "unreadable": 1, "frame_rate": 0, "too_short": 1},
    }
    # the missing caption, the empty one, and bad videos without --skip-bad-videos
    assert len(report["run_stops"]) == 3
    assert "empty or null caption" in report["run_stops"][1]
    assert "--set data.allow_empty_captions=true" in report["run_stops"][1]
    allowed = check_dataset(messy, replace(CFG, allow_empty_captions=True), sample=0)
    assert len(allowed["run_stops"]) == 2 and allowed["counts"]["empty_caption"] == 1  # still counted
    by_name = {Path(c["video"]).name: c for c in report["clips"]}
    assert by_name["wide.mp4"]["problems"] == ["empty_caption", "crop"]
    assert (by_name["wide.mp4"]["width"], by_name["wide.mp4"]["height"]) == (96, 32)
    assert by_name["good.mp4"]["problems"] == [] and by_name["bad.mp4"]["frames"] is None
    # the files: the same report as JSON, and a contact sheet of 4 kept clips (first/middle/last + caption)
    assert json.loads((tmp_path / "out" / "check_data.json").read_text()) == report
    sheet = np.asarray(Image.open(report["contact_sheet"]))
    assert sheet.shape[0] == 4 * 96 + 3 * 2 and sheet.shape[1] >= 3 * 96
    assert report["sheet_errors"] == []
    # the human lines name each problem with its count
    text = "\n".join(format_report(report))
    for kind in ("unreadable", "too_short", "missing_caption", "empty_caption", "small", "crop"):
        assert f"{PROBLEMS[kind]}: 1, e.g. " in text
    assert "a run drops 2: 1 unreadable, 1 too short" in text and "a run stops" in text
    assert "check_data.json" in text and "contact_sheet.png" in text


@pytest.mark.parametrize(
    "cfg",
    [CFG, DataConfig(num_frames=5, height=32, width=32, fps=4.0, window="center")],
    ids=["native", "fps4"],
)
def test_dropped_count_equals_what_skip_bad_videos_drops(messy, cfg):
    (messy / "nocap.txt").write_text("now captioned")  # a real run needs every caption
    (messy / "wide.txt").write_text("now captioned too")
    (messy / "gone.txt").write_text("its video is missing")  # not listed: sidecars start from videos
    report = check_dataset(messy, replace(cfg, skip_bad_videos=True), sample=0)
    dataset = VideoClipDataset(messy, replace(cfg, skip_bad_videos=True))
    dropped = sorted(p["video"] for k in DROP_KINDS for p in report["problems"][k])
    assert report["would_drop"]["count"] == len(dataset.skipped) == len(dropped) > 0
    assert dropped == sorted(v for v, _ in dataset.skipped)
    assert report["run_stops"] == [] and report["report"] is None  # no out_dir: nothing written


def test_missing_file_and_duplicate_path_in_a_manifest(tmp_path):
    make_video(tmp_path / "a.mp4")
    make_video(tmp_path / "b.mp4", seed=5)
    rows = [("a.mp4", "A"), ("gone.mp4", "G"), ("a.mp4", "A again"), ("b.mp4", "B"), ("a.mp4", "A")]
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows)
    )
    (tmp_path / "metadata.jsonl").write_text(
        (tmp_path / "metadata.jsonl").read_text() + json.dumps({"video": "b.mp4"}) + "\n"  # no caption
    )
    report = check_dataset(tmp_path, replace(CFG, skip_bad_videos=True), sample=0)
    assert names(report, "missing") == ["gone.mp4"]
    # another caption for a listed video; the same row again (trained twice) is a kind of its own
    assert [p["index"] for p in report["problems"]["duplicate_path"]] == [2, 5]
    assert "clip 0" in report["problems"]["duplicate_path"][0]["detail"]
    (repeat,) = report["problems"]["duplicate_row"]
    assert (
        repeat["index"] == 4
        and f"repeats clip 0 ({tmp_path.resolve() / 'metadata.jsonl'}:1)" in repeat["detail"]
    )
    assert repeat["detail"].startswith(f"{tmp_path.resolve() / 'metadata.jsonl'}:5 repeats")  # the line to delete
    assert report["problems"]["missing_caption"][0]["index"] == 5
    assert report["columns"] == ["video", "caption"]
    assert "caption-column" not in report["run_stops"][0]  # one row lacks it: the file has the column
    assert report["counts"]["duplicate_content"] == 0  # the same path is not also a content duplicate
    assert report["would_drop"]["count"] == 1


def test_clean_dataset_and_errors(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    clip(root, "a", "first")
    clip(root, "b", "second", seed=1)
    report = check_dataset(root, CFG, out_dir=tmp_path / "out", sample=16)
    assert report["num_ok"] == 2 and not any(report["counts"].values()) and report["run_stops"] == []
    assert "  no problems found" in format_report(report)
    assert np.asarray(Image.open(report["contact_sheet"])).shape[0] == 2 * 96 + 2
    with pytest.raises(MoalignError, match="no dataset manifest"):
        check_dataset(tmp_path / "out", CFG)


def test_crop_loss_threshold_examples():
    assert crop_loss((32, 32), (32, 32)) == 0
    assert crop_loss((720, 1280), (64, 64)) == pytest.approx(1 - 9 / 16, abs=0.01)  # 16:9 to square: 44%
    assert crop_loss((480, 640), (480, 720)) == pytest.approx(1 - (4 / 3) / 1.5, abs=0.01)  # 4:3 to 3:2: 11%


def test_cli_check_data_prints_every_problem_and_exits_1_when_a_run_would_stop(messy, tmp_path, capsys):
    from moalign.cli import main

    argv = ["check-data", "--data", str(messy), "--out", str(tmp_path / "o"), "--num-frames", "9", "--height", "32",
            "--width", "32", "--sample", "2"]  # fmt: skip
    assert main(argv) == 1  # unreadable / too-short videos and a missing caption stop a run
    out = capsys.readouterr().out
    assert "[check-data] checked 7 clips" in out and "too short for the clip window: 1" in out
    assert "no caption: 1" in out and "a run stops" in out
    report = json.loads((tmp_path / "o" / "check_data.json").read_text())
    assert report["counts"]["unreadable"] == 1 and (tmp_path / "o" / "contact_sheet.png").is_file()
    for name in ("bad", "short", "nocap"):
        for f in messy.glob(f"{name}.*"):
            f.unlink()
    assert main(argv) == 1  # the empty caption still stops a run
    assert (
        main([*argv, "--set", "data.allow_empty_captions=true"]) == 0
    )  # only warnings left (small, crop, ...)
    (messy / "wide.txt").write_text("a wide clip")
    assert main(argv) == 0


def test_no_caption_column_names_the_columns_and_the_flag(tmp_path):
    # a metadata.csv whose caption column has a name of its own: every clip "lacks" a caption
    make_video(tmp_path / "a.mp4")
    make_video(tmp_path / "b.mp4", seed=5)
    (tmp_path / "metadata.csv").write_text("file_name,fps,description\na.mp4,8,a ball\nb.mp4,8,a cube\n")
    report = check_dataset(tmp_path, CFG, sample=0)
    assert report["counts"]["missing_caption"] == 2 and report["columns"] == [
        "file_name",
        "fps",
        "description",
    ]
    (stop,) = report["run_stops"]
    assert f"{tmp_path.resolve() / 'metadata.csv'} has no caption column (none of caption, prompt" in stop
    assert "its columns are: file_name, fps, description" in stop
    assert "Pass --caption-column NAME" in stop and "e.g. --caption-column description" in stop
    text = "\n".join(format_report(report))
    assert "no caption: 2" in text and "its columns are: file_name, fps, description" in text
    assert "--caption-column NAME" in text
    # a column named that the file lacks: the same hint, naming it
    report = check_dataset(tmp_path, replace(CFG, caption_column="desc"), sample=0)
    assert "has no column 'desc' (--caption-column)" in report["run_stops"][0]
    report = check_dataset(tmp_path, replace(CFG, caption_column="description"), sample=0)
    assert report["run_stops"] == [] and report["counts"]["missing_caption"] == 0
    # jsonl: the columns of every row, and the example skips numbers
    rows = [{"file_name": "a.mp4", "fps": 8, "description": "a ball"}, {"file_name": "b.mp4", "tags": "x"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stop,) = check_dataset(tmp_path, CFG, sample=0)["run_stops"]
    assert "metadata.jsonl has no caption column" in stop and "e.g. --caption-column description" in stop
    assert "its columns are: file_name, fps, description, tags" in stop


def test_contact_sheet_font_draws_visible_spaces():
    from moalign.data.check import _caption_font

    # Pillow >= 10.1's FreeType default draws a 2-pixel space at 10 px: the sheet read "acrossa room"
    font = _caption_font()
    assert font.getlength("across a") - font.getlength("acrossa") >= font.getlength("a")


def test_wrap_keeps_every_word_with_single_spaces_within_the_width():
    from PIL import ImageFont

    from moalign.data.check import _wrap

    font = ImageFont.load_default()
    caption = "a red ball rolls slowly across a room  while\tthe camera pans\nleft, then stops"
    for width in (40, 100, 200, 1000):
        lines = _wrap(caption, font, width)
        assert " ".join(lines) == " ".join(caption.split())  # words in order, one space between them
        assert all(font.getlength(line) <= width and line == line.strip() for line in lines)
        assert all("  " not in line for line in lines)
    assert _wrap(caption, font, 1000) == [" ".join(caption.split())]
    assert _wrap("", font, 100) == [] and _wrap("   ", font, 100) == []
    # a word wider than a line is cut into pieces that fit, none lost
    long = "https://example.com/a/very/long/address/without/spaces"
    lines = _wrap(f"see {long} now", font, 60)
    assert all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == f"see{long}now"
    assert lines[0] == "see" and lines[-1].endswith(" now")
