"""The synthetic playground: exact flow (photometric check), physics, captions, determinism, files."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from moalign.data.video_io import read_video, write_video
from moalign.errors import MoalignError
from moalign.playground.captions import COLOURS
from moalign.playground.physics import Ball, Physics, run_physics
from moalign.playground.render import exact_flow, render_scene
from moalign.playground.scenes import MOTIONS, SynthConfig, simulate_scene
from moalign.playground.synth import make_clip, write_playground
from moalign.run.serialize import apply_overrides, from_dict, to_dict

SIZES = [(9, 32, 48), (17, 64, 64), (33, 96, 128)]
BALL_RE = re.compile(r"\ban? (\w+) ball\b")
COUNT_RE = re.compile(r"\bbounces (once|twice|three times|four times|five times|six times)\b")
COUNTS = {"once": 1, "twice": 2, "three times": 3, "four times": 4, "five times": 5, "six times": 6}


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) `img` at float pixel positions (x, y) inside [0, W-1] x [0, H-1]."""
    h, w = img.shape[:2]
    x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _photometric(frames: np.ndarray, flow: np.ndarray, valid: np.ndarray, pure: np.ndarray) -> dict:
    """Compare frame t at x with frame t+1 sampled at x + flow(x), on the pixels where that must hold.

    Ball pixels: valid, fully covered by one ball at t, and all four bilinear neighbours of x + flow fully
    covered by the same ball at t+1 (so no anti-aliased edge enters the sample). Background pixels: valid
    and untouched by any ball at t and t+1. Returns per-pixel max-over-channel errors, the error of the
    identity warp (flow 0) on the same ball pixels, and the ball id of each checked ball pixel.
    """
    t_len, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ball_err, ident_err, ball_id, bg_err = [], [], [], []
    for t in range(t_len - 1):
        dx, dy = xx + flow[t, ..., 0], yy + flow[t, ..., 1]
        inside = (dx >= 0) & (dx <= w - 1) & (dy >= 0) & (dy <= h - 1)
        x0 = np.clip(np.floor(dx).astype(int), 0, w - 2)
        y0 = np.clip(np.floor(dy).astype(int), 0, h - 2)
        ok = valid[t] & (pure[t] >= 0) & inside
        for oy in (0, 1):
            for ox in (0, 1):
                ok &= pure[t + 1][y0 + oy, x0 + ox] == pure[t]
        err = np.abs(frames[t] - _bilinear(frames[t + 1], dx, dy)).max(-1)
        ball_err.append(err[ok])
        ident_err.append(np.abs(frames[t] - frames[t + 1]).max(-1)[ok])
        ball_id.append(pure[t][ok])
        bg = valid[t] & (pure[t] == -1) & (pure[t + 1] == -1)
        bg_err.append(np.abs(frames[t] - frames[t + 1]).max(-1)[bg])
    cat = np.concatenate
    return {"ball": cat(ball_err), "ident": cat(ident_err), "id": cat(ball_id), "bg": cat(bg_err)}


# ---------------------------------------------------------------------------------------------------
# Exact flow
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MOTIONS)
@pytest.mark.parametrize("size", SIZES)
def test_flow_is_photometrically_exact_on_float_render(kind, size):
    t_len, h, w = size
    cfg = SynthConfig(motions=(kind,), num_frames=t_len, height=h, width=w)
    for index in range(2):
        scene = simulate_scene(cfg, index)
        render = render_scene(scene)
        flow, valid = exact_flow(scene, render.labels)
        assert flow.shape == (t_len - 1, h, w, 2) and flow.dtype == np.float32
        assert valid.shape == (t_len - 1, h, w) and valid.dtype == bool
        res = _photometric(render.frames.astype(np.float64), flow, valid, render.pure)
        assert res["ball"].size > 10 * (t_len - 1), "too few interior ball pixels were checked"
        # Bilinear sampling of the smooth shading errs by at most ~curvature/8 ~ 0.34 / r^2 (measured);
        # the tolerance follows the radius of the ball each pixel belongs to.
        tol = 0.5 / scene.radii[res["id"]] ** 2
        assert np.all(res["ball"] <= tol), (res["ball"] - tol).max()
        assert res["ball"].mean() < 0.3 * tol.mean()
        # the background never moves: exact equality
        assert res["bg"].size > 0.5 * (t_len - 1) * h * w
        assert np.all(res["bg"] == 0.0)
        # flow is the rigid displacement of whichever ball is on top, and 0 on the background
        disp = scene.centres[1:] - scene.centres[:-1]
        for k in range(len(scene.colours)):
            on_k = render.labels[:-1] == k
            want = np.broadcast_to(disp[:, k, None, None, :], flow.shape)[on_k]
            np.testing.assert_allclose(flow[on_k], want, atol=1e-5)
        assert np.all(flow[render.labels[:-1] < 0] == 0.0)


@pytest.mark.parametrize("kind", [m for m in MOTIONS if m != "static"])
def test_flow_holds_on_uint8_frames_and_decoded_mp4(kind, tmp_path):
    cfg = SynthConfig(motions=(kind,))
    for index in range(2):
        clip = make_clip(cfg, index)
        pure = render_scene(simulate_scene(cfg, index)).pure
        radii = np.array([s["radius"] for s in clip.states[0]])
        res = _photometric(clip.frames / 255.0, clip.flow, clip.valid, pure)
        assert np.all(res["ball"] <= 0.5 / radii[res["id"]] ** 2 + 1.0 / 255)  # + rounding to uint8
        assert np.all(res["bg"] == 0.0)

        write_video(tmp_path / "clip.mp4", clip.frames, fps=cfg.fps, crf=cfg.crf)
        decoded, fps = read_video(tmp_path / "clip.mp4")
        assert decoded.shape == clip.frames.shape and fps == pytest.approx(cfg.fps)
        res = _photometric(decoded / 255.0, clip.flow, clip.valid, pure)
        # lossy yuv420p blurs colour at edges: a loose bound, far below what ignoring the motion costs
        assert res["ball"].mean() < 0.05
        assert res["ball"].mean() < 0.3 * res["ident"].mean()
        assert res["bg"].mean() < 0.01


def test_valid_marks_disocclusion_and_exit():
    cfg = SynthConfig(motions=("bounce",))
    clip = make_clip(cfg, 1)
    scene = simulate_scene(cfg, 1)
    labels = render_scene(scene).labels
    # background pixels covered by a ball in the next frame are not valid; all other background is
    covered_next = (labels[:-1] < 0) & (labels[1:] >= 0)
    assert covered_next.any()
    assert not clip.valid[covered_next].any()
    assert clip.valid[(labels[:-1] < 0) & (labels[1:] < 0)].all()
    # a ball pixel stays valid as long as its destination lies in the image (nothing is in front here)
    h, w = labels.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    dest_x, dest_y = xx + clip.flow[..., 0], yy + clip.flow[..., 1]
    inside = (dest_x >= -0.5) & (dest_x < w - 0.5) & (dest_y >= -0.5) & (dest_y < h - 0.5)
    on_ball = labels[:-1] >= 0
    assert np.array_equal(clip.valid[on_ball], inside[on_ball])


def test_valid_hides_ball_behind_a_ball_in_front():
    # Physics keeps discs apart, so build the overlap by hand: ball 1 (drawn in front) sweeps across ball 0.
    cfg = SynthConfig(motions=("static",), max_balls=2)
    scene = next(s for s in (simulate_scene(cfg, i) for i in range(50)) if len(s.colours) == 2)
    t_len = cfg.num_frames
    track = np.zeros((t_len, 2, 4))
    track[:, 0, :2] = (32.0, 30.0)  # ball 0 rests
    track[:, 1, 0] = np.linspace(6.0, 58.0, t_len)  # ball 1 moves 3.25 px/frame to the right
    track[:, 1, 1] = 31.0
    scene = dataclasses.replace(scene, track=track)
    render = render_scene(scene)
    flow, valid = exact_flow(scene, render.labels)
    h, w = render.labels.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    c1 = track[1:, 1, None, None, :2]
    under_next = (xx - c1[..., 0]) ** 2 + (yy - c1[..., 1]) ** 2 < scene.radii[1] ** 2  # ball 1 at t+1
    hidden = (render.labels[:-1] == 0) & under_next
    assert hidden.sum() > 20
    assert not valid[hidden].any()
    assert valid[(render.labels[:-1] == 0) & ~under_next].all()
    assert valid[render.labels[:-1] == 1].all()  # the front ball is never hidden
    assert np.all(flow[render.labels[:-1] == 0] == 0.0)
    res = _photometric(render.frames.astype(np.float64), flow, valid, render.pure)
    assert res["ball"].size > 100
    assert np.all(res["ball"] <= 0.5 / scene.radii[res["id"]] ** 2)
    assert np.all(res["bg"] == 0.0)


# ---------------------------------------------------------------------------------------------------
# Physics
# ---------------------------------------------------------------------------------------------------


def _phys(**kw) -> Physics:
    base = dict(gravity=0.5, restitution=0.8, friction=0.1, floor_y=59.5, right_wall=63.5, substeps=16)
    base.update(kw)
    return Physics(**base)


def _apex_height(track: np.ndarray, k: int, times: np.ndarray, floor_centre_y: float) -> float:
    """Fit y(t) = a t^2 + b t + c on frames of one flight arc; return the apex height above the floor."""
    a, b, c = np.polyfit(times, track[times, k, 1], 2)
    return floor_centre_y - (c - b * b / (4 * a))


def test_bounce_peaks_shrink_by_e_squared():
    phys = _phys(settle_speed=0.5)
    r, y0 = 4.0, 10.0
    track, _, events = run_physics([Ball(r, 32.0, y0)], phys, num_frames=60)
    bounces = [ev["time"] for ev in events if ev["type"] == "bounce"]
    assert len(bounces) >= 3
    yf = phys.floor_y - r
    heights = [yf - y0]  # dropped from rest: the first peak is the drop height
    for t0, t1 in zip(bounces[:-1], bounces[1:], strict=True):
        times = np.arange(math.floor(t0) + 1, math.ceil(t1))  # frames strictly inside the arc
        assert len(times) >= 4
        heights.append(_apex_height(track, 0, times, yf))
        # the arc is a parabola of the configured gravity
        assert np.polyfit(times, track[times, 0, 1], 2)[0] == pytest.approx(phys.gravity / 2, rel=1e-3)
    ratios = np.array(heights[1:]) / np.array(heights[:-1])
    np.testing.assert_allclose(ratios, phys.restitution**2, rtol=5e-3)
    # impacts happen at the floor with the speed free fall predicts
    first = next(ev for ev in events if ev["type"] == "bounce")
    assert first["speed_in"] == pytest.approx(math.sqrt(2 * phys.gravity * (yf - y0)), rel=1e-4)
    assert first["speed_out"] == pytest.approx(phys.restitution * first["speed_in"], rel=1e-4)
    assert track[:, 0, 1].max() <= yf + 1e-6  # never below the floor


def _momentum(track: np.ndarray, masses: np.ndarray, t: int) -> np.ndarray:
    return (masses[:, None] * track[t, :, 2:4]).sum(0)


def _check_collision_momentum(track, events, masses, gravity) -> None:
    hit = next(ev for ev in events if ev["type"] == "collision")
    t0, t1 = math.floor(hit["time"]) - 1, math.ceil(hit["time"]) + 1
    others = [ev for ev in events if ev is not hit and t0 <= ev["time"] <= t1]
    assert not others, f"floor/wall contact near the collision: {others}"
    p0, p1 = _momentum(track, masses, t0), _momentum(track, masses, t1)
    before = track[t0, 0, 2:4] - track[t0, 1, 2:4]
    after = track[t1, 0, 2:4] - track[t1, 1, 2:4]
    assert np.linalg.norm(after - before) > 1.0, "the collision must change the velocities"
    # horizontal momentum is conserved; vertical changes only by gravity on the total mass
    assert p1[0] == pytest.approx(p0[0], abs=1e-3 * masses.sum())
    assert p1[1] - p0[1] == pytest.approx(masses.sum() * gravity * (t1 - t0), abs=1e-3 * masses.sum())
    # a restitution below 1 loses kinetic energy of the relative motion
    assert np.linalg.norm(after) < np.linalg.norm(before)


def test_ball_ball_collision_conserves_momentum():
    phys = _phys()
    balls = [Ball(4.0, 14.0, 20.0, 3.0, -1.0), Ball(6.0, 50.0, 22.0, -2.5, -1.0)]
    track, _, events = run_physics(balls, phys, num_frames=12)
    masses = np.array([16.0, 36.0])
    _check_collision_momentum(track, events, masses, phys.gravity)


def test_collide_scenes_collide_in_the_air_and_conserve_momentum():
    cfg = SynthConfig(motions=("collide",))
    for index in range(8):
        scene = simulate_scene(cfg, index)
        assert "collide in the air" in scene.caption
        assert scene.meta["collisions"] >= 1
        masses = scene.radii**2
        _check_collision_momentum(scene.track, scene.events, masses, scene.physics.gravity)


def test_friction_slows_rolling_balls():
    cfg = SynthConfig(motions=("roll",), num_frames=33)
    stopped = 0
    for index in range(6):
        scene = simulate_scene(cfg, index)
        mu = scene.physics.friction
        vx = scene.track[:, 0, 2]
        assert scene.on_floor[:, 0].all() and np.all(scene.track[:, 0, 3] == 0.0)
        walls = [ev["time"] for ev in scene.events if ev["type"] == "wall"]
        for t in range(len(vx) - 1):
            if any(t <= tw <= t + 1 for tw in walls):
                continue
            # constant deceleration mu until the ball stops
            assert abs(vx[t + 1]) == pytest.approx(max(0.0, abs(vx[t]) - mu), abs=2e-4)
            assert scene.track[t + 1, 0, 0] - scene.track[t, 0, 0] == pytest.approx(
                0.5 * (vx[t] + vx[t + 1]) if vx[t + 1] != 0 else vx[t] ** 2 / (2 * mu) * np.sign(vx[t]),
                abs=1e-3,
            )
        assert abs(vx[-1]) < abs(vx[0])
        assert "slows down" in scene.caption
        if vx[-1] == 0.0:
            stopped += 1
            assert scene.caption.endswith("and stops")
    assert stopped > 0


def test_static_scenes_never_move():
    cfg = SynthConfig(motions=("static",))
    for index in range(4):
        clip = make_clip(cfg, index)
        assert np.all(clip.flow == 0.0)
        assert clip.valid.all()
        assert all(np.array_equal(clip.frames[0], f) for f in clip.frames)
        assert clip.meta["events"] == []
        assert all(s["vx"] == 0 and s["vy"] == 0 and s["on_floor"] for row in clip.states for s in row)


def test_motion_is_substantial_for_moving_kinds():
    for kind in ("bounce", "throw", "roll", "collide"):
        cfg = SynthConfig(motions=(kind,))
        for index in range(6):
            c = simulate_scene(cfg, index).centres
            fastest = np.linalg.norm(c[1:] - c[:-1], axis=-1).max(-1)  # (T-1,) px/frame of the fastest ball
            assert fastest.mean() > 1.5, (kind, index, fastest.mean())


def test_balls_stay_in_the_room_and_visible():
    for size in SIZES:
        t_len, h, w = size
        cfg = SynthConfig(num_frames=t_len, height=h, width=w)
        for index in range(12):
            scene = simulate_scene(cfg, index)
            x, y, r = scene.track[..., 0], scene.track[..., 1], scene.radii[None]
            assert np.all(x - r >= -0.5 - 1e-6) and np.all(x + r <= w - 0.5 + 1e-6)
            assert np.all(y + r <= scene.physics.floor_y + 1e-6)
            assert np.all(r >= 3.0) and np.all(r <= 0.12 * min(h, w) + 1e-6)
            # no two balls overlap at a frame by more than a sliver (contacts are resolved every substep)
            for i in range(len(r[0])):
                for j in range(i + 1, len(r[0])):
                    dist = np.linalg.norm(scene.centres[:, i] - scene.centres[:, j], axis=-1)
                    assert np.all(dist >= scene.radii[i] + scene.radii[j] - 0.5)


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------


def test_captions_name_the_right_colours_counts_and_motion():
    words = {"bounce": "falls", "throw": "is thrown to the", "roll": "rolls to the", "collide": "collide"}
    cfg = SynthConfig(num_clips=200)
    seen = set()
    for index in range(60):
        scene = simulate_scene(cfg, index)
        kind, caption = scene.kind, scene.caption
        seen.add(kind)
        named = BALL_RE.findall(caption)
        assert sorted(named) == sorted(scene.colours), caption
        assert len(set(scene.colours)) == len(scene.colours)
        assert set(named) <= set(COLOURS)
        if kind == "static":
            assert caption.endswith("rest on the floor" if len(named) > 1 else "rests on the floor")
        else:
            assert words[kind] in caption
        if kind in ("bounce", "throw"):
            # honest bounce counts: every counted bounce turns a falling ball upwards between two frames
            vy = scene.track[..., 3]
            from_states = ((vy[:-1] > 0) & (vy[1:] < 0)).sum(0)
            assert list(from_states) == scene.meta["bounces"]
            said = [COUNTS[m] for m in COUNT_RE.findall(caption)]
            assert said == [n for n in scene.meta["bounces"] if n > 0], caption
            for side in ("left", "right"):
                assert (f"hits the {side} wall" in caption) == any(
                    ev["type"] == "wall" and ev["side"] == side for ev in scene.events
                )
    assert seen == set(MOTIONS)


def test_caption_examples():
    assert simulate_scene(SynthConfig(motions=("collide",)), 0).caption.endswith("collide in the air")
    cap = simulate_scene(SynthConfig(motions=("bounce",), max_balls=1), 0).caption
    assert re.fullmatch(r"an? \w+ ball falls and bounces (once|twice|three times) on the floor", cap), cap
    cap = simulate_scene(SynthConfig(motions=("static",), max_balls=1), 0).caption
    assert re.fullmatch(r"an? \w+ ball rests on the floor", cap), cap


# ---------------------------------------------------------------------------------------------------
# Config, determinism
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_any_4k1_length_and_16_divisible_size_works(size):
    t_len, h, w = size
    cfg = SynthConfig(num_frames=t_len, height=h, width=w)
    clip = make_clip(cfg, 0)
    assert clip.frames.shape == (t_len, h, w, 3) and clip.frames.dtype == np.uint8
    assert clip.flow.shape == (t_len - 1, h, w, 2)
    assert clip.valid.shape == (t_len - 1, h, w)
    assert len(clip.states) == t_len


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_frames": 16}, "4k\\+1.*e.g. 17"),
        ({"num_frames": 1}, "4k\\+1"),
        ({"height": 60}, "multiple of 16.*e.g. 64"),
        ({"width": 40}, "multiple of 16"),
        ({"motions": ("bounce", "spin")}, "valid kinds"),
        ({"motions": ("collide",), "max_balls": 1}, "max_balls >= 2"),
        ({"background": "sky"}, "plain"),
        ({"restitution": (0.5, 1.2)}, "restitution"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_config_roundtrip_and_auto_scaling():
    cfg = SynthConfig(height=128, width=64)
    res = cfg.resolved()
    assert res.gravity == pytest.approx(3.0) and res.floor_height == 16
    assert from_dict(SynthConfig, json.loads(json.dumps(to_dict(cfg.resolved())))) == res
    assert res.resolved() == res
    assert apply_overrides(SynthConfig(), ["motions=['bounce', 'roll']"]).motions == ("bounce", "roll")


def test_clips_are_deterministic_and_independent_of_num_clips():
    a = make_clip(SynthConfig(num_clips=4, seed=3), 2)
    b = make_clip(SynthConfig(num_clips=500, seed=3), 2)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.flow, b.flow)
    assert np.array_equal(a.valid, b.valid)
    assert a.caption == b.caption and a.states == b.states and a.meta == b.meta
    c = make_clip(SynthConfig(seed=4), 2)
    assert not np.array_equal(a.frames, c.frames)
    d = make_clip(SynthConfig(seed=3), 3)
    assert not np.array_equal(a.frames, d.frames)


def test_plain_background_is_flat_above_the_floor():
    cfg = SynthConfig(background="plain", motions=("roll",))
    scene = simulate_scene(cfg, 0)
    wall = scene.background[: cfg.height - cfg.resolved().floor_height]
    assert np.all(wall == wall[0, 0])
    textured = simulate_scene(SynthConfig(motions=("roll",)), 0).background
    assert textured[:20].std() > 0.01


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_playground_files_and_byte_determinism(tmp_path):
    cfg = SynthConfig(num_clips=3, seed=7)
    rows = write_playground(tmp_path / "a", cfg, progress=False)
    write_playground(tmp_path / "b", cfg, progress=False)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys() and len(files_a) == 2 * 3 + 2
    for name in files_a:
        assert files_a[name] == files_b[name], name

    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    for i, row in enumerate(rows):
        clip = make_clip(cfg, i)
        for key in ("id", "video", "caption", "flow", "states", "motion", "num_frames", "fps", "height"):
            assert key in row
        assert row["video"] == f"videos/clip_{i:05d}.mp4" and row["flow"] == f"flow/clip_{i:05d}.safetensors"
        assert row["caption"] == clip.caption and row["states"] == clip.states
        assert (row["num_frames"], row["height"], row["width"], row["seed"]) == (17, 64, 64, 7)
        assert {"gravity", "restitution", "friction", "floor_y"} <= set(row["physics"])
        tensors = load_file(tmp_path / "a" / row["flow"])
        assert tensors["flow"].dtype == np.float32 and tensors["valid"].dtype == np.uint8
        assert np.array_equal(tensors["flow"], clip.flow)
        assert np.array_equal(tensors["valid"] != 0, clip.valid)
        frames, fps = read_video(tmp_path / "a" / row["video"])
        assert frames.shape == clip.frames.shape and fps == pytest.approx(8.0)
        assert np.abs(frames.astype(int) - clip.frames).mean() < 4.0
    stored = json.loads((tmp_path / "a" / "playground.json").read_text())
    assert from_dict(SynthConfig, stored) == cfg.resolved()


def test_write_playground_resumes_and_refuses_other_configs(tmp_path):
    cfg = SynthConfig(num_clips=3)
    out = tmp_path / "pg"
    rows = write_playground(out, cfg, progress=False)
    before = _files(out)
    kept = out / "videos" / "clip_00000.mp4"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "videos" / "clip_00001.mp4").unlink()
    (out / "metadata.jsonl").unlink()

    assert write_playground(out, cfg, progress=False) == rows
    assert _files(out) == before  # the missing clip comes back byte for byte
    assert kept.stat().st_mtime_ns == kept_mtime  # the existing clip was skipped, not rewritten

    grown = write_playground(out, SynthConfig(num_clips=4), progress=False)
    assert grown[:3] == rows and len(grown) == 4

    with pytest.raises(MoalignError, match=r"pg.*different config.*seed.*new --out"):
        write_playground(out, SynthConfig(num_clips=3, seed=1), progress=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(MoalignError, match="foreign"):
        write_playground(foreign, cfg, progress=False)
