"""Tests for moalign.data: manifests, sampling, geometry, flow and the dataset (small videos in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import texture
from safetensors.torch import save_file

from moalign.data.dataset import VideoClipDataset
from moalign.data.geometry import cover_geometry, resize_center_crop, resize_flow, transform_flow
from moalign.data.manifest import ClipRecord, read_manifest
from moalign.data.sampling import DataConfig, read_clip, sample_indices
from moalign.data.video_io import read_video, write_video
from moalign.errors import MoalignError


def make_video(
    path: Path, t: int = 9, h: int = 32, w: int = 32, fps: float = 8.0, seed: int = 0
) -> np.ndarray:
    """Write a small mp4 whose frames differ (brightness ramp over a texture); return the frames."""
    base = texture(h, w, seed, blur=1.5).astype(np.int16)
    frames = np.stack([np.clip(base + 10 * i - 40, 0, 255) for i in range(t)]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps)
    return frames


def write_mkv(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An mkv (no frame count in the header) with the same H.264 frames."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_frames": 16}, "--num-frames 13 or 17"),
        ({"height": 60}, "--height 64"),
        ({"width": 100}, "--width 96"),
        ({"fps": 0.0}, "positive"),
        ({"window": "middle"}, "start, center"),
    ],
)
def test_config_validation_says_how_to_fix(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**kwargs)


def test_config_accepts_4k_plus_1_from_5():
    for n in (5, 9, 17, 49, 81):
        assert DataConfig(num_frames=n).num_frames == n
    # 1 frame is 4k+1 but gives stage 1's encoder nothing (frame 0 is dropped): refused, naming the fewest
    for n in (1, 2, 3, -3):
        with pytest.raises(ValueError, match=r"Use --num-frames 5\b"):
            DataConfig(num_frames=n)


# ------------------------------------------------------------------------------------------ manifests


def test_jsonl_playground_manifest_relative_and_absolute(tmp_path):
    make_video(tmp_path / "videos" / "clip_00000.mp4")
    abs_video = tmp_path / "elsewhere" / "b.mp4"
    make_video(abs_video)
    rows = [
        {
            "video": "videos/clip_00000.mp4",
            "caption": "a red ball falls and bounces twice on the floor",
            "flow": "flow/clip_00000.safetensors",
            "states": [[1, 2]],
            "id": 0,
            "motion": "bounce",
            "fps": 8.0,
        },
        {"video": str(abs_video), "caption": "a blue ball rolls"},
    ]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n\n")
    recs = read_manifest(tmp_path)
    assert [r.index for r in recs] == [0, 1]
    assert recs[0].video == tmp_path.resolve() / "videos" / "clip_00000.mp4"
    assert recs[0].video.is_absolute() and recs[0].video.is_file()
    assert recs[0].flow == tmp_path.resolve() / "flow" / "clip_00000.safetensors"
    assert recs[0].caption == "a red ball falls and bounces twice on the floor"
    assert recs[0].extra == {"states": [[1, 2]], "id": 0, "motion": "bounce", "fps": 8.0}
    assert recs[1].video == abs_video and recs[1].flow is None and recs[1].extra == {}
    assert recs[1].source.endswith("metadata.jsonl:3")  # blank line 2 skipped, line numbers kept
    # the manifest file itself may be passed
    assert read_manifest(tmp_path / "metadata.jsonl") == recs


@pytest.mark.parametrize("vcol", ["video", "video_path", "path", "file_name", "file"])
@pytest.mark.parametrize("ccol", ["caption", "prompt", "text", "title"])
def test_column_aliases(tmp_path, vcol, ccol):
    write_jsonl(tmp_path / "metadata.jsonl", [{vcol: "a.mp4", ccol: "hello", "other": 1}])
    (rec,) = read_manifest(tmp_path)
    assert rec.video.name == "a.mp4" and rec.caption == "hello" and rec.extra == {"other": 1}


def test_alias_priority_first_name_wins(tmp_path):
    write_jsonl(
        tmp_path / "metadata.jsonl", [{"path": "b.mp4", "video": "a.mp4", "text": "t", "caption": "c"}]
    )
    (rec,) = read_manifest(tmp_path)
    assert rec.video.name == "a.mp4" and rec.caption == "c"
    assert rec.extra == {"path": "b.mp4", "text": "t"}


def test_csv_manifest_with_aliases_and_quoted_commas(tmp_path):
    make_video(tmp_path / "v" / "a.mp4")
    abs_video = tmp_path / "b.mp4"
    (tmp_path / "metadata.csv").write_text(
        f'video_path,prompt,score\nv/a.mp4,"a red ball, then a blue one",0.5\n{abs_video},plain,1\n'
    )
    recs = read_manifest(tmp_path)
    assert [r.video for r in recs] == [tmp_path.resolve() / "v" / "a.mp4", abs_video]
    assert recs[0].caption == "a red ball, then a blue one"
    assert recs[0].extra == {"score": "0.5"} and recs[0].flow is None


def test_csv_unquoted_comma_row_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("video,caption\na.mp4,ok\nb.mp4,a ball, then more\n")
    with pytest.raises(MoalignError, match=r"metadata\.csv:3.*more fields.*Quote"):
        read_manifest(tmp_path)


def test_csv_missing_caption_column(tmp_path):
    (tmp_path / "metadata.csv").write_text("video,description\na.mp4,x\n")
    with pytest.raises(MoalignError, match=r"metadata\.csv:1.*caption, prompt, text, title"):
        read_manifest(tmp_path)


def test_prompts_videos_txt(tmp_path):
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond prompt\n\n\n")
    (tmp_path / "videos.txt").write_text("videos/1.mp4\n/abs/2.mp4\n")
    recs = read_manifest(tmp_path)
    assert [r.caption for r in recs] == ["first prompt", "second prompt"]
    assert recs[0].video == tmp_path.resolve() / "videos" / "1.mp4"
    assert recs[1].video == Path("/abs/2.mp4")


def test_prompts_videos_misaligned(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    (tmp_path / "videos.txt").write_text("1.mp4\n2.mp4\n")
    with pytest.raises(MoalignError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    assert "prompts.txt has 3 lines" in msg and "videos.txt has 2" in msg


def test_only_prompts_txt(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\n")
    with pytest.raises(MoalignError, match="no videos.txt"):
        read_manifest(tmp_path)


def test_detection_order_jsonl_first(tmp_path):
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": "j.mp4", "caption": "j"}])
    (tmp_path / "metadata.csv").write_text("video,caption\nc.mp4,c\n")
    (tmp_path / "prompts.txt").write_text("t\n")
    (tmp_path / "videos.txt").write_text("t.mp4\n")
    assert read_manifest(tmp_path)[0].caption == "j"
    (tmp_path / "metadata.jsonl").unlink()
    assert read_manifest(tmp_path)[0].caption == "c"
    (tmp_path / "metadata.csv").unlink()
    assert read_manifest(tmp_path)[0].caption == "t"


def test_malformed_json_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(
        '{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4", caption}\n'
    )
    with pytest.raises(MoalignError, match=r"metadata\.jsonl:2: malformed JSON"):
        read_manifest(tmp_path)


def test_missing_video_column_lists_accepted_names(tmp_path):
    write_jsonl(tmp_path / "metadata.jsonl", [{"clip": "a.mp4", "caption": "x"}])
    with pytest.raises(MoalignError, match=r"metadata\.jsonl:1: no video column.*video, video_path, path"):
        read_manifest(tmp_path)


def test_empty_manifest(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(MoalignError, match=r"metadata\.jsonl lists no clips"):
        read_manifest(tmp_path)


def test_no_manifest_lists_what_was_looked_for(tmp_path):
    with pytest.raises(
        MoalignError,
        match=r"no dataset manifest.*metadata\.jsonl, metadata\.csv, metadata\.json, prompts\.txt \+ videos\.txt",
    ):
        read_manifest(tmp_path)
    with pytest.raises(MoalignError, match="dataset folder not found"):
        read_manifest(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- sampling


def test_sample_indices_native_start_and_center():
    cfg = DataConfig(num_frames=5)
    np.testing.assert_array_equal(sample_indices(20, 8.0, cfg), [0, 1, 2, 3, 4])
    center = sample_indices(20, 8.0, DataConfig(num_frames=5, window="center"))
    np.testing.assert_array_equal(center, [7, 8, 9, 10, 11])
    assert center.dtype == np.int64
    np.testing.assert_array_equal(sample_indices(5, 8.0, cfg), np.arange(5))  # exactly long enough


def test_sample_indices_lower_fps():
    np.testing.assert_array_equal(
        sample_indices(33, 16.0, DataConfig(num_frames=5, fps=8.0)), [0, 2, 4, 6, 8]
    )
    np.testing.assert_array_equal(
        sample_indices(33, 16.0, DataConfig(num_frames=5, fps=8.0, window="center")), [12, 14, 16, 18, 20]
    )
    # fractional stride 24 / 10 = 2.4: nearest frames of 0, 2.4, 4.8, 7.2, 9.6
    np.testing.assert_array_equal(
        sample_indices(11, 24.0, DataConfig(num_frames=5, fps=10.0)), [0, 2, 5, 7, 10]
    )
    # 29.97 fps video asked for 30 fps: no repeats within 17 frames, so it is consecutive
    np.testing.assert_array_equal(
        sample_indices(17, 29.97, DataConfig(num_frames=17, fps=30.0)), np.arange(17)
    )


def test_sample_indices_errors():
    with pytest.raises(MoalignError) as info:
        sample_indices(10, 8.0, DataConfig(num_frames=17), video="clip.mp4")
    msg = str(info.value)
    assert "clip.mp4 has 10 frames at 8 fps" in msg and "needs 17" in msg
    assert "--num-frames 9" in msg and "--skip-bad-videos" in msg
    assert "--fps" not in msg  # at the native rate no --fps shortens the window (a higher one repeats frames)
    with pytest.raises(MoalignError, match=r"needs 9\b"):
        sample_indices(8, 16.0, DataConfig(num_frames=5, fps=8.0))
    with pytest.raises(MoalignError, match="frames would repeat"):
        sample_indices(100, 8.0, DataConfig(num_frames=5, fps=16.0))


# ------------------------------------------------------------------------------------------- geometry


def test_resize_center_crop_shapes_and_identity():
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert resize_center_crop(frames, 64, 64) is frames
    for h, w in [(32, 32), (48, 64), (128, 96), (64, 16)]:
        out = resize_center_crop(frames, h, w)
        assert out.shape == (3, h, w, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_resize_center_crop_keeps_the_centre():
    # 96 x 128 -> 64 x 64: scale 2/3 gives 64 x 85, crop columns 10..74 of the resized frame
    assert cover_geometry((96, 128), (64, 64)) == (64, 85, 0, 10)
    frames = np.zeros((1, 96, 128, 3), np.uint8)
    frames[:, :, :15] = 255  # left stripe, 15 px -> 10 px after resize: fully cropped away
    frames[:, :, 56:72] = 200  # a central band survives
    out = resize_center_crop(frames, 64, 64)
    assert out[0, :, 0].max() < 30  # the left stripe is gone
    assert out[0, 32, 32, 0] == 200
    # constant images stay constant in both directions
    flat = np.full((2, 40, 60, 3), 77, np.uint8)
    assert (resize_center_crop(flat, 16, 32) == 77).all() and (resize_center_crop(flat, 96, 96) == 77).all()


def test_resize_flow_vector_scaling_and_backends():
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(2, 12, 16, 2)).astype(np.float32)
    assert resize_flow(flow, 12, 16) is flow
    const = np.broadcast_to(np.array([3.0, -2.0], np.float32), (2, 12, 16, 2)).copy()
    for h, w in [(6, 8), (24, 32), (6, 32), (9, 10)]:
        out = resize_flow(const, h, w)
        assert out.shape == (2, h, w, 2) and out.dtype == np.float32
        np.testing.assert_allclose(out[..., 0], 3.0 * w / 16, rtol=1e-5)
        np.testing.assert_allclose(out[..., 1], -2.0 * h / 12, rtol=1e-5)
    # shrinking by 2 is the 2x2 block mean (area), then vectors halved
    half = resize_flow(flow, 6, 8)
    np.testing.assert_allclose(
        half, flow.reshape(2, 6, 2, 8, 2, 2).mean(axis=(2, 4)) * 0.5, rtol=1e-5, atol=1e-6
    )
    # enlarging is bilinear with half-pixel centres (same as torch align_corners=False), vectors doubled
    big = resize_flow(flow, 24, 32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(flow).permute(0, 3, 1, 2), size=(24, 32), mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(big, ref.numpy() * 2.0, rtol=1e-5, atol=1e-5)
    # torch in -> torch out, same numbers, gradients flow
    t = torch.from_numpy(flow).requires_grad_(True)
    out_t = resize_flow(t, 9, 10)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.detach().numpy(), resize_flow(flow, 9, 10), rtol=1e-5, atol=1e-6)
    out_t.sum().backward()
    assert t.grad is not None


def test_transform_flow_is_the_frame_transform():
    # shrinking: the same area weights as cv2.INTER_AREA, which resize_center_crop uses for frames
    cfg = DataConfig(height=64, width=64)
    flow = np.random.default_rng(0).normal(size=(2, 96, 128, 2)).astype(np.float32)
    rh, rw, top, left = cover_geometry((96, 128), (64, 64))
    ref = np.stack([cv2.resize(f, (rw, rh), interpolation=cv2.INTER_AREA) for f in flow])
    ref = ref[:, top : top + 64, left : left + 64] * np.array([rw / 128, rh / 96], np.float32)
    np.testing.assert_allclose(transform_flow(flow, (96, 128), cfg), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("src", "atol"), [((96, 128), 0.06), ((48, 40), 1e-9)])
def test_transform_flow_linear_field_matches_geometry(src, atol):
    # u = x, v = y (source pixel index). A target pixel centre j sits at source coordinate
    # (j + left + 0.5) / sx - 0.5, so the transformed field must be sx times that: j + left + 0.5 - 0.5 * sx.
    # Bilinear enlarging keeps linear fields exactly (away from the clamped border rows); area shrinking
    # averages a piecewise-constant field, which is exact only up to a few hundredths of a pixel.
    cfg = DataConfig(height=64, width=64)
    ys, xs = np.mgrid[0 : src[0], 0 : src[1]].astype(np.float64)
    flow = np.stack([xs, ys], -1)[None]
    rh, rw, top, left = cover_geometry(src, (64, 64))
    sx, sy = rw / src[1], rh / src[0]
    out = transform_flow(flow, src, cfg)
    assert out.shape == (1, 64, 64, 2)
    j = np.arange(64)
    inner = slice(2, -2)  # bilinear clamps at the image border
    np.testing.assert_allclose(out[0, 5, inner, 0], (j + left + 0.5 - 0.5 * sx)[inner], atol=atol)
    np.testing.assert_allclose(out[0, inner, 5, 1], (j + top + 0.5 - 0.5 * sy)[inner], atol=atol)
    # no systematic offset: the errors average out (a crop or half-pixel slip would shift them all)
    assert abs((out[0, 5, inner, 0] - (j + left + 0.5 - 0.5 * sx)[inner]).mean()) < 0.01
    assert abs((out[0, inner, 5, 1] - (j + top + 0.5 - 0.5 * sy)[inner]).mean()) < 0.01


def test_transform_flow_of_a_translation():
    # a textured image moving by (dx, dy) = (6, -3) px per frame at 96 x 128; target 64 x 64
    dx, dy, t = 6, -3, 3
    big = texture(96 + 40, 128 + 40, seed=1, blur=1.5)
    frames = np.stack([big[20 - k * dy : 116 - k * dy, 20 - k * dx : 148 - k * dx] for k in range(t)])
    flow = np.broadcast_to(np.array([dx, dy], np.float32), (t - 1, 96, 128, 2)).copy()
    cfg = DataConfig(height=64, width=64)
    out = transform_flow(flow, (96, 128), cfg)
    sx, sy = 85 / 128, 64 / 96
    np.testing.assert_allclose(out[..., 0], dx * sx, rtol=1e-5)
    np.testing.assert_allclose(out[..., 1], dy * sy, rtol=1e-5)
    # and the resized frames really moved by that much (phase correlation, sub-pixel)
    small = resize_center_crop(frames, 64, 64).astype(np.float64).mean(-1)
    win = cv2.createHanningWindow((64, 64), cv2.CV_64F)
    (mx, my), _ = cv2.phaseCorrelate(small[0], small[1], win)
    assert abs(mx - dx * sx) < 0.15 and abs(my - dy * sy) < 0.15
    # identity: bit-identical (the same object), numpy and torch
    assert transform_flow(flow, (96, 128), DataConfig(height=96, width=128)) is flow
    ft = torch.from_numpy(flow)
    assert transform_flow(ft, (96, 128), DataConfig(height=96, width=128)) is ft
    torch.testing.assert_close(transform_flow(ft, (96, 128), cfg), torch.from_numpy(out))


def test_transform_flow_rejects_wrong_size():
    with pytest.raises(ValueError, match="does not match"):
        transform_flow(np.zeros((1, 8, 8, 2), np.float32), (16, 16), DataConfig())


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_items_shapes_dtypes_and_frames(tmp_path):
    make_video(tmp_path / "a.mp4", t=12, h=48, w=80)
    make_video(tmp_path / "b.mp4", t=9, h=32, w=32, seed=1)
    write_jsonl(
        tmp_path / "metadata.jsonl", [{"video": "a.mp4", "caption": "A"}, {"video": "b.mp4", "caption": "B"}]
    )
    cfg = DataConfig(num_frames=5, height=32, width=48, window="center")
    ds = VideoClipDataset(tmp_path, cfg)
    assert len(ds) == 2 and ds.skipped == []
    item = ds[0]
    assert (
        item["index"] == 0 and item["caption"] == "A" and item["video"] == str(tmp_path.resolve() / "a.mp4")
    )
    assert item["frames"].shape == (5, 32, 48, 3) and item["frames"].dtype == torch.uint8
    assert item["frame_indices"].dtype == torch.int64
    assert item["frame_indices"].tolist() == [3, 4, 5, 6, 7]
    assert item["fps"] == 8.0 and "flow" not in item
    # the partial decode gives exactly the frames of a full decode
    full, _ = read_video(tmp_path / "a.mp4")
    np.testing.assert_array_equal(item["frames"].numpy(), resize_center_crop(full[3:8], 32, 48))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["frames"].shape == (2, 5, 32, 48, 3) and batch["caption"] == ["A", "B"]


def test_dataset_lower_fps(tmp_path):
    make_video(tmp_path / "a.mp4", t=20, fps=16.0)
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": "a.mp4", "caption": "A"}])
    item = VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32, fps=8.0))[0]
    assert item["frame_indices"].tolist() == [0, 2, 4, 6, 8] and item["fps"] == 8.0
    full, _ = read_video(tmp_path / "a.mp4")
    np.testing.assert_array_equal(item["frames"].numpy(), full[[0, 2, 4, 6, 8]])


def test_read_clip_without_header_frame_count(tmp_path):
    frames = make_video(tmp_path / "a.mp4", t=11)
    write_mkv(tmp_path / "a.mkv", frames)
    full, _ = read_video(tmp_path / "a.mkv")
    clip, idx, fps = read_clip(tmp_path / "a.mkv", DataConfig(num_frames=5, window="center"))
    assert idx.tolist() == [3, 4, 5, 6, 7] and fps == 8.0
    np.testing.assert_array_equal(clip, full[3:8])
    clip, idx, _ = read_clip(tmp_path / "a.mkv", DataConfig(num_frames=9))
    np.testing.assert_array_equal(clip, full[:9])
    with pytest.raises(MoalignError, match=r"a\.mkv has 11 frames at 8 fps.*needs 13"):
        read_clip(tmp_path / "a.mkv", DataConfig(num_frames=13))


def test_missing_video_file_error_names_the_file(tmp_path):
    make_video(tmp_path / "a.mp4")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"video": "a.mp4", "caption": "A"}, {"video": "gone.mp4", "caption": "B"}],
    )
    with pytest.raises(MoalignError) as info:
        VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32))
    msg = str(info.value)
    assert "gone.mp4" in msg and "metadata.jsonl:2" in msg and "--skip-bad-videos" in msg


def test_corrupt_video_error_names_the_file_and_fix(tmp_path):
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": "x.mp4", "caption": "A"}])
    with pytest.raises(MoalignError) as info:  # every video is probed at construction, before any work
        VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32))
    msg = str(info.value)
    assert str(tmp_path.resolve() / "x.mp4") in msg and "re-encode" in msg and "--skip-bad-videos" in msg


def test_too_short_video_error(tmp_path):
    make_video(tmp_path / "short.mp4", t=6)
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": "short.mp4", "caption": "A"}])
    with pytest.raises(MoalignError) as info:
        VideoClipDataset(tmp_path, DataConfig(num_frames=9, height=32, width=32))
    msg = str(info.value)
    assert "short.mp4 has 6 frames at 8 fps" in msg and "needs 9" in msg and "--num-frames 5" in msg


def test_skip_bad_videos_counts_and_keeps_the_good(tmp_path):
    make_video(tmp_path / "good1.mp4", t=9)
    make_video(tmp_path / "good2.mp4", t=12, seed=2)
    make_video(tmp_path / "short.mp4", t=4)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all" * 50)
    names = ["good1", "short", "corrupt", "missing", "good2"]
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": f"{n}.mp4", "caption": n} for n in names])
    cfg = DataConfig(num_frames=9, height=32, width=32, skip_bad_videos=True)
    ds = VideoClipDataset(tmp_path, cfg)
    assert len(ds) == 2
    assert [ds[i]["caption"] for i in range(2)] == ["good1", "good2"]
    assert [ds[i]["index"] for i in range(2)] == [0, 4]  # manifest row numbers survive skipping
    skipped = dict(ds.skipped)
    assert sorted(Path(p).name for p in skipped) == ["corrupt.mp4", "missing.mp4", "short.mp4"]
    assert "has 4 frames" in skipped[str(tmp_path.resolve() / "short.mp4")]
    assert "not found" in skipped[str(tmp_path.resolve() / "missing.mp4")]
    assert "cannot decode" in skipped[str(tmp_path.resolve() / "corrupt.mp4")]
    # every video bad: a clear error instead of an empty dataset
    with pytest.raises(MoalignError, match="all 1 videos"):
        VideoClipDataset(tmp_path, cfg, records=[r for r in read_manifest(tmp_path) if r.caption == "short"])


def test_skipped_videos_are_not_told_to_pass_skip_bad_videos(tmp_path, capsys):
    """The hint to pass --skip-bad-videos ends an error only when the run does not skip already."""
    make_video(tmp_path / "good.mp4", t=9)
    make_video(tmp_path / "short.mp4", t=4)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all" * 50)
    names = ["short", "corrupt", "missing", "good"]
    write_jsonl(tmp_path / "metadata.jsonl", [{"video": f"{n}.mp4", "caption": n} for n in names])
    strict = DataConfig(num_frames=9, height=32, width=32)
    skipping = DataConfig(num_frames=9, height=32, width=32, skip_bad_videos=True)
    ds = VideoClipDataset(tmp_path, skipping)
    out = capsys.readouterr().out
    assert len(ds.dropped) == 3 and out.startswith("[data] skipped 3 of 4 videos")
    assert "--skip-bad-videos" not in out
    for clip in ds.dropped:  # each reason still names the file and its own fix, and ends there
        assert "--skip-bad-videos" not in clip["reason"] and clip["reason"].endswith(".")
        assert clip["video"] in clip["reason"]
    # 4 frames: no clip of 5 or more fits, so the reason offers no --num-frames (never 1)
    assert "--num-frames" not in ds.dropped[0]["reason"] and "re-encode" in ds.dropped[1]["reason"]
    assert ds.dropped[0]["reason"].endswith("Remove it from the dataset.")
    with pytest.raises(MoalignError) as info:  # every video bad: the error quotes a reason, without the hint
        VideoClipDataset(tmp_path, skipping, records=read_manifest(tmp_path)[:1])
    assert "all 1 videos" in str(info.value) and "--skip-bad-videos" not in str(info.value)
    # a video that passes the probe but is read with skipping on (fill_cache records the message)
    for cfg, hinted in ((strict, True), (skipping, False)):
        for name in ("short.mp4", "corrupt.mp4", "missing.mp4"):
            with pytest.raises(MoalignError) as info:
                read_clip(tmp_path / name, cfg)
            assert ("--skip-bad-videos" in str(info.value)) is hinted, (name, str(info.value))
    with pytest.raises(MoalignError, match="--skip-bad-videos"):
        sample_indices(100, 8.0, DataConfig(num_frames=5, fps=16.0))  # above the native rate
    with pytest.raises(MoalignError) as info:
        sample_indices(100, 8.0, DataConfig(num_frames=5, fps=16.0, skip_bad_videos=True))
    assert "--skip-bad-videos" not in str(info.value) and str(info.value).endswith("the preset's rate).")


def test_explicit_records(tmp_path):
    make_video(tmp_path / "a.mp4")
    rec = ClipRecord(index=7, video=tmp_path / "a.mp4", caption="hi", flow=None, extra={})
    ds = VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32), records=[rec])
    assert len(ds) == 1 and ds[0]["index"] == 7 and ds[0]["caption"] == "hi"


def _flow_dataset(tmp_path: Path, fps_in_manifest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    make_video(tmp_path / "videos" / "clip_00000.mp4", t=9, h=48, w=64)
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(8, 48, 64, 2)).astype(np.float32)
    valid = (rng.random((8, 48, 64)) > 0.05).astype(np.uint8)
    (tmp_path / "flow").mkdir()
    save_file(
        {"flow": torch.from_numpy(flow), "valid": torch.from_numpy(valid)},
        str(tmp_path / "flow" / "c.safetensors"),
    )
    row = {
        "video": "videos/clip_00000.mp4",
        "caption": "a red ball",
        "flow": "flow/c.safetensors",
        "motion": "bounce",
    }
    if fps_in_manifest:
        row["fps"] = 8.0
    write_jsonl(tmp_path / "metadata.jsonl", [row])
    return flow, valid


def test_flow_loading_from_manifest(tmp_path):
    flow, valid = _flow_dataset(tmp_path)
    cfg = DataConfig(num_frames=5, height=32, width=32, window="center")
    item = VideoClipDataset(tmp_path, cfg)[0]
    idx = item["frame_indices"].numpy()
    assert idx.tolist() == [2, 3, 4, 5, 6]
    assert item["flow"].shape == (4, 32, 32, 2) and item["flow"].dtype == torch.float32
    np.testing.assert_allclose(item["flow"].numpy(), transform_flow(flow[idx[:-1]], (48, 64), cfg), rtol=1e-6)
    assert item["flow_valid"].shape == (4, 32, 32) and item["flow_valid"].dtype == torch.bool
    # a target pixel is valid only if all its source pixels are: 48x64 -> 32x43 -> crop, not more valid
    assert item["flow_valid"].float().mean() < valid[idx[:-1]].mean()
    # same size as the source: the file's values, untouched
    same = VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=48, width=64))[0]
    np.testing.assert_array_equal(same["flow"].numpy(), flow[:4])
    np.testing.assert_array_equal(same["flow_valid"].numpy(), valid[:4] != 0)
    assert "flow" not in VideoClipDataset(tmp_path, cfg, load_flow=False)[0]


@pytest.mark.parametrize("fps_in_manifest", [True, False])
def test_flow_with_fps_subsampling_is_an_error(tmp_path, fps_in_manifest):
    _flow_dataset(tmp_path, fps_in_manifest)
    cfg = DataConfig(num_frames=5, height=32, width=32, fps=4.0)
    with pytest.raises(MoalignError, match=r"c\.safetensors.*consecutive native frames.*dis"):
        ds = VideoClipDataset(tmp_path, cfg)  # fails here when the manifest states the fps
        ds[0]  # otherwise here
    item = VideoClipDataset(tmp_path, cfg, load_flow=False)[0]
    assert item["frame_indices"].tolist() == [0, 2, 4, 6, 8]


def test_flow_file_without_flow_tensor(tmp_path):
    _flow_dataset(tmp_path)
    save_file({"u": torch.zeros(8, 48, 64)}, str(tmp_path / "flow" / "c.safetensors"))
    with pytest.raises(MoalignError, match=r"c\.safetensors has no tensor named 'flow' \(it has: u\)"):
        VideoClipDataset(tmp_path, DataConfig(num_frames=5, height=32, width=32))[0]
