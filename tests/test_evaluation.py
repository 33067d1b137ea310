"""Weight-free video metrics and the Fréchet distance on inputs with known answers (src/moalign/evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import texture

from moalign.errors import MoalignError
from moalign.evaluation.frechet import frechet_distance
from moalign.evaluation.video import video_metrics


def _panning(shift: int, frames: int = 9, seed: int = 0) -> np.ndarray:
    """A textured view panning right by `shift` px per frame: the content moves by (-shift, 0) px/frame."""
    tex = texture(96, 160, seed=seed)
    return np.stack([tex[16:80, 16 + shift * t : 112 + shift * t] for t in range(frames)])


def test_a_static_video_has_no_motion_and_no_flicker():
    m = video_metrics(_panning(0))
    assert m.motion == pytest.approx(0.0, abs=1e-3) and m.flicker == 0.0 and m.static
    assert m.warp_error == pytest.approx(0.0, abs=1e-4) and m.smoothness == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("shift", [1, 3])
def test_a_constant_translation_has_motion_k_and_a_small_warping_error(shift):
    m = video_metrics(_panning(shift))
    assert m.motion == pytest.approx(shift, abs=0.1) and m.motion_top == pytest.approx(shift, abs=0.2)
    assert not m.static and m.flicker > 0.01  # the frames do change
    assert m.warp_error < 0.005 and m.occluded < 0.1  # but the flow explains the change
    assert m.smoothness > 0.95


def test_shuffled_frames_raise_the_warping_error_and_lower_smoothness():
    video = _panning(2)
    ordered = video_metrics(video)
    shuffled = video_metrics(video[np.random.default_rng(1).permutation(len(video))])
    assert shuffled.warp_error > 5 * ordered.warp_error
    assert shuffled.smoothness < 0.5 < ordered.smoothness


def test_a_two_frame_video_has_no_smoothness_and_one_frame_is_refused():
    m = video_metrics(_panning(1, frames=2))
    assert m.frames == 2 and m.smoothness is None and m.flow_acceleration is None
    with pytest.raises(ValueError, match="at least 2 frames"):
        video_metrics(_panning(1, frames=1))


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
    shifted = rng.normal(loc=0.5, size=(400, 6))
    same, different = frechet_distance(a, b), frechet_distance(a, shifted)
    assert same < 0.25 < 1.0 < different  # two draws of one distribution are closer than two distributions
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # closed form: equal covariances, means apart by m -> d^2 = |m|^2 (exact for these two sets)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 6, rel=1e-6)


def test_frechet_distance_with_fewer_videos_than_dimensions_is_finite():
    rng = np.random.default_rng(0)
    d = frechet_distance(rng.normal(size=(5, 32)), rng.normal(size=(5, 32)))
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(3, 4)))


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    """mp4s that no moalign command wrote, no manifest: one static view, one pan by 2 px/frame, in a subfolder."""
    from moalign.data.video_io import write_video

    root = tmp_path_factory.mktemp("plain")
    write_video(root / "static.mp4", _panning(0), crf=0)
    (root / "more").mkdir()
    write_video(root / "more" / "pan.mp4", _panning(2), crf=0)
    return root


def test_evaluate_a_folder_without_manifest(plain_folder, tmp_path):
    import csv
    import json

    from moalign.cli import main

    assert main(["evaluate", "--videos", str(plain_folder), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    rows = {Path(r["video"]).name: r for r in csv.DictReader(open(tmp_path / "ev" / "metrics.csv"))}
    assert set(rows) == {"static.mp4", "pan.mp4"}
    assert float(rows["static.mp4"]["motion"]) < 0.05 and float(rows["pan.mp4"]["motion"]) == pytest.approx(
        2, abs=0.2
    )
    agg = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["aggregate"]
    assert agg["num_videos"] == 2 and agg["static_share"] == 0.5
    assert agg["motion"]["ci95"][0] <= agg["motion"]["mean"] <= agg["motion"]["ci95"][1]
    assert (tmp_path / "ev" / "motion.png").is_file() and "| videos | 2 | 50% |" in (
        tmp_path / "ev" / "report.md"
    ).read_text()


def test_evaluate_bad_inputs_name_the_file(plain_folder, tmp_path, capsys):
    import shutil

    from moalign.cli import main

    assert main(["evaluate", "--videos", str(tmp_path / "nowhere")]) == 2
    assert "not a folder of videos" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(plain_folder, bad)
    (bad / "broken.mp4").write_bytes(b"not a video")
    assert main(["evaluate", "--videos", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.mp4" in err and err.count("--skip-bad-videos") == 1  # the hint once, not twice
    assert main(["evaluate", "--videos", str(bad), "--skip-bad-videos", "--quiet"]) == 0
    import json

    result = json.loads((bad / "evaluation" / "evaluation.json").read_text())
    assert result["aggregate"]["num_videos"] == 2 and [Path(s["video"]).name for s in result["skipped"]] == [
        "broken.mp4"
    ]


def test_evaluate_reads_sidecar_captions(plain_folder, tmp_path):
    """A folder of videos with same-stem .txt captions is evaluated with its captions; one without is None."""
    import csv
    import shutil

    from moalign.evaluation.folder import evaluate_folder

    root = tmp_path / "sidecar"
    shutil.copytree(plain_folder, root)
    (root / "static.mp4").with_suffix(".txt").write_text("a still view, nothing moves\n")
    evaluate_folder(root, tmp_path / "ev", progress=False)
    rows = {
        Path(r["video"]).name: r["caption"] for r in csv.DictReader(open(tmp_path / "ev" / "metrics.csv"))
    }
    assert rows == {"static.mp4": "a still view, nothing moves", "pan.mp4": ""}  # None is written empty


def _layout(root: Path, layout: str) -> None:
    """Two placeholder videos (find_videos lists, it does not decode) and their captions in `layout`."""
    base = root / "train" if layout == "train/metadata.jsonl" else root
    (base / "clips").mkdir(parents=True)
    for name in ("a.mp4", "b.MOV"):
        (base / "clips" / name).write_bytes(b"")
    if layout == "sidecar":
        (base / "clips" / "a.txt").write_text("cap a")
        (base / "clips" / "b.txt").write_text("cap b")
    elif layout.endswith("metadata.jsonl"):
        rows = [
            '{"file_name": "clips/a.mp4", "text": "cap a"}',
            '{"file_name": "clips/b.MOV", "text": "cap b"}',
        ]
        (base / "metadata.jsonl").write_text("\n".join(rows))
    elif layout == "metadata.csv":
        (base / "metadata.csv").write_text("video_path,prompt\nclips/a.mp4,cap a\nclips/b.MOV,cap b\n")
    else:
        captions, videos = layout.split(" + ")
        (base / captions).write_text("cap a\ncap b\n")
        (base / videos).write_text("clips/a.mp4\nclips/b.MOV\n")


@pytest.mark.parametrize(
    "layout",
    [
        "metadata.jsonl",
        "metadata.csv",
        "prompts.txt + videos.txt",
        "prompt.txt + video.txt",
        "captions.txt + videos.txt",
        "caption.txt + video.txt",
        "train/metadata.jsonl",
        "sidecar",
    ],
)
def test_find_videos_reads_every_dataset_layout(tmp_path, layout):
    from moalign.evaluation.folder import find_videos

    _layout(tmp_path, layout)
    found = find_videos(tmp_path)
    assert [(p.name, c) for p, c in found] == [("a.mp4", "cap a"), ("b.MOV", "cap b")]


def test_find_videos_uses_the_manifest_modules_suffixes(tmp_path):
    """One list of video suffixes (moalign/data/manifest.py); evaluation keeps no copy of its own."""
    import moalign.evaluation.folder as folder
    from moalign.data.manifest import VIDEO_SUFFIXES

    assert "VIDEO_SUFFIXES" not in vars(folder) and "MANIFESTS" not in vars(folder)
    for suffix in VIDEO_SUFFIXES:
        (tmp_path / f"v{suffix.upper()}").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not a video")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.mp4").write_bytes(b"")
    found = folder.find_videos(tmp_path)
    assert sorted(p.suffix.lower() for p, _ in found) == sorted(VIDEO_SUFFIXES)
    assert all(c is None for _, c in found)


def test_find_videos_errors(tmp_path):
    """Nothing there is an error saying so; a malformed manifest is reported, never read as bare videos."""
    from moalign.evaluation.folder import find_videos

    (tmp_path / "empty").mkdir()
    with pytest.raises(MoalignError, match=r"empty holds no videos \(.mp4.*\) and no manifest"):
        find_videos(tmp_path / "empty")
    bad = tmp_path / "bad"
    _layout(bad, "metadata.jsonl")
    (bad / "metadata.jsonl").write_text('{"file_name": "clips/a.mp4", "text": "cap a"}\n{not json\n')
    with pytest.raises(MoalignError, match=r"metadata.jsonl:2: malformed JSON"):
        find_videos(bad)
    lone = tmp_path / "lone"
    _layout(lone, "prompts.txt + videos.txt")
    (lone / "videos.txt").unlink()
    with pytest.raises(MoalignError, match=r"has prompts.txt but no videos.txt or video.txt"):
        find_videos(lone)
    uneven = tmp_path / "uneven"
    _layout(uneven, "prompt.txt + video.txt")
    (uneven / "prompt.txt").write_text("only one caption\n")
    with pytest.raises(MoalignError, match=r"prompt.txt has 1 lines but .*video.txt has 2"):
        find_videos(uneven)


def test_frechet_in_the_teacher_spaces(playground, stage1_run, plain_folder, tmp_path):
    from moalign.evaluation.folder import evaluate_folder

    clips = playground(10)
    same = evaluate_folder(clips, tmp_path / "a", reference=clips, teacher=stage1_run.folder, progress=False)
    assert same["frechet"]["motion"] == pytest.approx(0.0, abs=1e-6)
    other = evaluate_folder(
        clips, tmp_path / "b", reference=playground(4), teacher=stage1_run.folder, progress=False
    )
    assert other["frechet"]["motion"] > 1e-6 and other["frechet"]["encoder"] > 1e-6
    # a video shorter than the teacher's clips (9 frames here): named with the fixes, or left out and listed
    import shutil

    from moalign.data.video_io import write_video

    mixed = tmp_path / "mixed"
    shutil.copytree(playground(4) / "videos", mixed)
    write_video(mixed / "short.mp4", _panning(2)[:5], crf=0)
    with pytest.raises(
        MoalignError,
        match=r"short.mp4 cannot be read as the teacher reads clips \(9 frames(.|\n)*drop --teacher",
    ):
        evaluate_folder(mixed, tmp_path / "c", reference=clips, teacher=stage1_run.folder, progress=False)
    kept = evaluate_folder(
        mixed,
        tmp_path / "c",
        reference=clips,
        teacher=stage1_run.folder,
        progress=False,
        skip_bad_videos=True,
    )
    assert kept["aggregate"]["num_videos"] == 5 and kept["frechet"]["motion"] > 0
    assert [Path(k["video"]).name for k in kept["frechet_skipped"]] == ["short.mp4"]


def test_evaluate_with_another_flow_method(plain_folder, tmp_path):
    from moalign.errors import MoalignError
    from moalign.evaluation.folder import evaluate_folder

    result = evaluate_folder(plain_folder, tmp_path / "fb", flow="farneback", progress=False)
    assert result["flow"]["method"] == "farneback"
    assert result["aggregate"]["motion"]["mean"] == pytest.approx(1.0, abs=0.2)  # (0 + 2) / 2 px/frame
    with pytest.raises(MoalignError, match="raft"):  # RAFT without weights: the error says what is missing
        evaluate_folder(plain_folder, tmp_path / "raft", flow="raft", progress=False)


def test_ridge_probe_recovers_a_linear_target_and_not_noise():
    from moalign.evaluation.probes import probe_accuracy, probe_r2

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    train = np.arange(600) % 2 == 0
    assert probe_r2(x, x @ rng.normal(size=(12, 2)), train) > 0.99
    assert probe_r2(x, rng.normal(size=(600, 2)), train) < 0.05
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    accuracy, chance = probe_accuracy(x, labels, train)
    assert accuracy > 0.8 and 0.2 < chance < 0.35  # a least-squares classifier of four quadrants
    accuracy, chance = probe_accuracy(x, rng.integers(0, 4, 600), train)
    assert accuracy < chance + 0.1


def test_token_targets_of_a_playground_clip(playground):
    import torch

    from moalign.data.dataset import VideoClipDataset
    from moalign.evaluation.probes import token_targets
    from moalign.playground.captions import COLOURS

    data = playground(2)
    from conftest import MICRO_DATA

    sample = VideoClipDataset(data, MICRO_DATA)[0]
    frames, flow = np.asarray(sample["frames"]), torch.as_tensor(sample["flow"])
    grid = ((len(frames) - 1) // 2, 4, 4)
    token_flow, colour = token_targets(frames, flow, grid)
    assert token_flow.shape == (grid[0] * 16, 2) and colour.shape == (grid[0] * 16,)
    assert set(np.unique(colour)) <= set(range(-1, len(COLOURS)))
    # token 0: the mean flow of its 8x8 patch over pairs 0 and 1 (the flows into frames 1 and 2)
    expected = flow[0:2, :8, :8].float().mean(dim=(0, 1, 2)).numpy() * 4 / 32  # vectors in token units
    assert np.allclose(token_flow[0], expected, atol=1e-4)


def test_stage1_writes_its_disentanglement_probes(stage1_run):
    probes = stage1_run.metrics["probes"]
    assert probes["clips"] == min(stage1_run.cfg.probe_clips, 10) and probes["tokens"] > 0
    assert set(probes["flow_r2"]) == {"encoder", "motion"}
    assert all(np.isfinite(v) for v in probes["flow_r2"].values())
