"""The toy VideoPhy2 judge: playground clips pass, shuffled / frozen / recoloured clips fail, folder I/O."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest

from moalign.errors import MoalignError
from moalign.playground.captions import COLOURS, parse_caption
from moalign.playground.judge import JOINT_THRESHOLD, judge_folder, judge_video
from moalign.playground.scenes import SynthConfig
from moalign.playground.synth import make_clip, write_playground
from moalign.playground.tracking import estimate_floor_y

CONFIGS = {"default": SynthConfig(), "big": SynthConfig(radius=(7.0, 12.0))}
CLIPS = range(16)  # seed 0, indices 0..15: static, throw, roll, collide and bounce scenes, 1 to 3 balls
MOVING_WORDS = ("falls", "bounces", "thrown", "rolls", "collide")


@cache
def _clip(name: str, index: int):
    return make_clip(CONFIGS[name], index)


def _moving(name: str) -> list[int]:
    return [i for i in CLIPS if _clip(name, i).meta["motion"] != "static"]


def test_parse_caption_follows_the_grammar() -> None:
    claims = parse_caption(
        "a cyan ball falls and bounces once on the floor, a red ball falls and bounces twice on the floor, "
        "and an orange ball rests on the floor"
    )
    assert [(c.colour, c.action, c.bounces) for c in claims] == [
        ("cyan", "falls", 1),
        ("red", "falls", 2),
        ("orange", "rests", 0),
    ]
    (blue,) = parse_caption(
        "a blue ball is thrown to the right, bounces three times on the floor and hits the right wall"
    )
    assert (blue.action, blue.direction, blue.bounces) == ("thrown", "right", 3)
    a, b = parse_caption("a red ball and a yellow ball collide in the air")
    assert (a.action, a.partners, b.partners) == ("collide", ("yellow",), ("red",))
    rest = parse_caption("a purple ball, a white ball and a green ball rest on the floor")
    assert [c.colour for c in rest] == ["purple", "white", "green"] and {c.action for c in rest} == {"rests"}
    # "hits the X ball" is a contact, not one more ball
    (red,) = parse_caption("a red ball rolls to the left and hits the green ball")
    assert (red.action, red.direction, red.partners) == ("rolls", "left", ("green",))


def test_floor_line_is_found() -> None:
    clip = _clip("default", 0)
    floor_height = max(4, 64 // 8)
    assert estimate_floor_y(clip.frames) == 64 - floor_height - 0.5
    assert estimate_floor_y(np.zeros((3, 64, 64, 3), np.uint8)) == 64 - 8 - 0.5  # no band: fallback


@pytest.mark.parametrize("name", list(CONFIGS))
def test_playground_clips_score_high(name: str) -> None:
    results = [judge_video(_clip(name, i).frames, _clip(name, i).caption) for i in CLIPS]
    assert {_clip(name, i).meta["motion"] for i in CLIPS} >= {"static", "throw", "roll", "collide", "bounce"}
    sa, pc = np.mean([r["sa"] for r in results]), np.mean([r["pc"] for r in results])
    assert sa >= 0.9 and pc >= 0.9, (sa, pc)
    assert np.mean([r["joint"] for r in results]) >= 0.9
    for i, r in zip(CLIPS, results, strict=True):
        assert 0.0 <= r["sa"] <= 1.0 and 0.0 <= r["pc"] <= 1.0 and r["joint"] in (0.0, 1.0)
        assert r["joint"] == float(r["sa"] >= JOINT_THRESHOLD and r["pc"] >= JOINT_THRESHOLD)
        static = _clip(name, i).meta["motion"] == "static"
        assert (r["motion"] < 0.05) if static else (r["motion"] > 0.5), (i, r["motion"])


def test_time_shuffled_clips_fail_physics() -> None:
    rng = np.random.default_rng(0)
    orig, shuffled = [], []
    for i in _moving("default"):
        clip = _clip("default", i)
        perm = rng.permutation(len(clip.frames))
        orig.append(judge_video(clip.frames, clip.caption)["pc"])
        shuffled.append(judge_video(clip.frames[perm], clip.caption)["pc"])
    assert all(s < o for s, o in zip(shuffled, orig, strict=True)), list(zip(shuffled, orig, strict=True))
    assert np.mean(shuffled) < 0.4 < 0.9 < np.mean(orig)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_frozen_first_frame_has_no_motion_and_fails_moving_prompts(name: str) -> None:
    checked = 0
    for i in CLIPS:
        clip = _clip(name, i)
        frozen = np.repeat(clip.frames[:1], len(clip.frames), axis=0)
        r = judge_video(frozen, clip.caption)
        assert r["motion"] < 0.05
        if any(word in clip.caption for word in MOVING_WORDS):
            assert r["sa"] < 0.5 and r["joint"] == 0.0, (clip.caption, r["details"]["motion_checks"])
            checked += 1
        else:  # a static scene stays a static scene
            assert r["sa"] > 0.9
    assert checked >= 8


def test_wrong_colour_in_caption_fails_semantics() -> None:
    for i in CLIPS:
        clip = _clip("default", i)
        first = clip.meta["colours"][0]
        other = next(c for c in COLOURS if c not in clip.meta["colours"])
        article = "an" if other[0] in "aeiou" else "a"
        caption = clip.caption.replace(
            f"{'an' if first[0] in 'aeiou' else 'a'} {first} ball", f"{article} {other} ball"
        )
        assert caption != clip.caption
        r = judge_video(clip.frames, caption)
        assert r["sa"] < 0.5, (caption, r["details"])
        assert r["details"]["presence"] < 1.0 and r["details"]["extraneous"] < 0.5


# channel swap R <-> B recolours these palette colours into another palette colour (the grey background
# stays grey)
SWAPPED = {"red": "blue", "blue": "red", "yellow": "cyan", "cyan": "yellow", "orange": "blue"}


def test_recoloured_ball_pixels_fail_semantics() -> None:
    checked = 0
    for i in range(32):
        clip = make_clip(SynthConfig(), i)
        colours = set(clip.meta["colours"])
        if not colours <= set(SWAPPED) or {SWAPPED[c] for c in colours} == colours:
            continue  # a colour we cannot swap, or a red and a blue ball that trade colours
        frames = clip.frames.copy()
        chroma = frames.max(-1).astype(int) - frames.min(-1)
        ball = chroma > 25  # ball pixels only; the wall and floor are near grey
        frames[ball] = frames[ball][:, ::-1]
        before = judge_video(clip.frames, clip.caption)
        after = judge_video(frames, clip.caption)
        assert before["sa"] > 0.9 and after["sa"] < 0.5, (clip.caption, after["details"])
        assert abs(after["pc"] - before["pc"]) < 0.2  # physics is untouched by the colour
        checked += 1
    assert checked >= 3


@pytest.fixture(scope="module")
def playground_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge_pg")
    rows = write_playground(out, SynthConfig(num_clips=12, radius=(7.0, 12.0)), progress=False)
    return out, rows


def test_judge_folder_on_mp4_round_trip(playground_dir) -> None:
    out, rows = playground_dir
    report = judge_folder(out)
    saved = json.loads((out / "judge.json").read_text())
    assert saved == report
    assert [v["video"] for v in report["videos"]] == [r["video"] for r in rows]
    for v in report["videos"]:
        assert set(v) == {"video", "sa", "pc", "joint", "motion"}
    agg = report["aggregate"]
    assert agg["num_videos"] == len(rows)
    for key in ("sa", "pc", "joint", "motion"):
        assert agg[key] == pytest.approx(np.mean([v[key] for v in report["videos"]]))
    assert agg["sa"] >= 0.9 and agg["pc"] >= 0.9 and agg["joint"] >= 0.9, agg


def test_judge_folder_custom_out_and_errors(playground_dir, tmp_path) -> None:
    out, rows = playground_dir
    target = tmp_path / "scores" / "j.json"
    judge_folder(out, out=target)
    assert json.loads(target.read_text())["aggregate"]["num_videos"] == len(rows)

    with pytest.raises(MoalignError, match="metadata.jsonl"):
        judge_folder(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"video": "v.mp4"}\n')
    with pytest.raises(MoalignError, match="caption"):
        judge_folder(bad)
    (bad / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(MoalignError, match="line 1"):
        judge_folder(bad)
    (bad / "metadata.jsonl").write_text('{"video": "missing.mp4", "caption": "a red ball falls"}\n')
    with pytest.raises(MoalignError, match="missing.mp4"):
        judge_folder(bad)
    (bad / "broken.mp4").write_bytes(b"\x00not a video")
    (bad / "metadata.jsonl").write_text('{"video": "broken.mp4", "caption": "a red ball falls"}\n')
    with pytest.raises(MoalignError, match="broken.mp4"):
        judge_folder(bad)
    assert not (bad / "judge.json").exists()
