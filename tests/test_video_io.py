"""Video files: round trips, byte determinism whatever the buffer alignment, clear errors."""

import numpy as np
import pytest

from moalign.data.video_io import _BT709_LIMITED, read_video, rgb_to_yuv, write_video
from moalign.errors import MoalignError


def _clip(seed=0, t=9, h=32, w=48):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (t, h // 8, w // 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # blocky, so compression keeps it


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_round_trip(tmp_path, pix_fmt):
    frames = _clip()
    write_video(tmp_path / "a.mp4", frames, fps=12, crf=0, pix_fmt=pix_fmt)
    back, fps = read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape and fps == pytest.approx(12.0)
    assert np.abs(back.astype(int) - frames).mean() < 3.0


def test_same_frames_same_bytes_whatever_the_alignment(tmp_path):
    frames = _clip(1)
    # the same pixels in a buffer that starts at an odd address: libswscale could round differently
    shifted = np.empty(frames.size + 1, np.uint8)[1:].reshape(frames.shape)
    shifted[:] = frames
    write_video(tmp_path / "a.mp4", frames)
    write_video(tmp_path / "b.mp4", shifted)
    write_video(tmp_path / "c.mp4", np.ascontiguousarray(frames.copy()))
    a = (tmp_path / "a.mp4").read_bytes()
    assert a == (tmp_path / "b.mp4").read_bytes() == (tmp_path / "c.mp4").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]  # no temporaries


def test_rgb_to_yuv_known_colours():
    px = np.array([[[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 0, 255]]]], np.uint8)  # (1, 2, 2, 3)
    (yuv,) = rgb_to_yuv(px, "yuv444p")
    y, u, v = yuv
    assert y.tolist() == [[16, 235], [63, 32]]  # BT.709 limited range (BT.601 would give red 82, blue 41)
    assert u[0].tolist() == [128, 128] and v[0].tolist() == [128, 128]  # greys carry no chroma
    assert v[1, 0] == 240 and u[1, 1] == 240  # red -> top of the V range, blue -> top of U


def test_bt709_matrix_matches_the_standard():
    """The integer matrix is BT.709's (Kr = 0.2126, Kb = 0.0722) in limited range, within rounding."""
    kr, kb = 0.2126, 0.0722
    kg = 1 - kr - kb
    want = np.array(
        [
            np.array([kr, kg, kb]) * 219 / 255,
            np.array([-kr, -kg, 1 - kb]) / (2 * (1 - kb)) * 224 / 255,
            np.array([1 - kr, -kg, -kb]) / (2 * (1 - kr)) * 224 / 255,
        ]
    )
    assert np.abs(_BT709_LIMITED / 2**16 - want).max() <= 1 / 2**16
    assert _BT709_LIMITED[1:].sum(axis=1).tolist() == [0, 0]  # greys get exactly 128 chroma
    greys = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None, None], 3, axis=3)  # (1, 256, 1, 3)
    (yuv,) = rgb_to_yuv(greys, "yuv444p")
    assert (yuv[1:] == 128).all() and yuv[0, 0, 0] == 16 and yuv[0, -1, 0] == 235


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_files_are_tagged_bt709_limited_range(tmp_path, pix_fmt):
    """Players read the matrix, primaries, transfer and range from the file instead of guessing."""
    import av

    write_video(tmp_path / "a.mp4", _clip(), pix_fmt=pix_fmt)
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        assert ctx.pix_fmt == pix_fmt
        # AVCOL_PRI_BT709 / AVCOL_TRC_BT709 / AVCOL_SPC_BT709 are 1, AVCOL_RANGE_MPEG ("tv", limited) is 1
        assert (ctx.color_primaries, ctx.color_trc, ctx.colorspace, ctx.color_range) == (1, 1, 1, 1)
        frame = next(container.decode(stream))
        assert (frame.colorspace, frame.color_range) == (1, 1)
    assert b"colrnclx" in (tmp_path / "a.mp4").read_bytes()  # the mp4 container says so too


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_grey_and_saturated_colours_round_trip(tmp_path, pix_fmt):
    """The tags match the conversion: a decoder that follows them gets the colours back.

    A BT.601 conversion tagged BT.709 decodes red as about (255, 24, 0); the tolerance is far below that.
    """
    colours = [[128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 200, 90]]
    frames = (
        np.array(colours, np.uint8)[:, None, None, :].repeat(16, axis=1).repeat(16, axis=2)
    )  # (5, 16, 16, 3)
    write_video(tmp_path / "c.mp4", frames, crf=0, pix_fmt=pix_fmt)
    back, _ = read_video(tmp_path / "c.mp4")
    assert np.abs(back.astype(int) - frames).max() <= 3


def test_errors_name_the_file(tmp_path):
    with pytest.raises(MoalignError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(MoalignError, match="bad.mp4.*re-encode"):
        read_video(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 31, 32, 3), np.uint8))
    assert not (tmp_path / "odd.mp4").exists()


def test_repeated_encodes_are_identical(tmp_path):
    """x264's mbtree rate control made ~1 in 15 encodes of the same frames differ; it is off."""
    rng = np.random.default_rng(5)
    smooth = np.cumsum(rng.normal(0, 8, (9, 32, 32, 3)), axis=0)  # textured and moving, like generated video
    frames = np.clip(smooth + 128, 0, 255).astype(np.uint8)
    seen = set()
    for _ in range(30):
        write_video(tmp_path / "x.mp4", frames)
        seen.add((tmp_path / "x.mp4").read_bytes())
    assert len(seen) == 1


# ------------------------------------------------------------------------ display matrix (phone rotation)


def write_turned(
    path, stored: np.ndarray, degrees: float, hflip: bool = False, vflip: bool = False, fps: float = 8.0
) -> None:
    """An H.264 mp4 of `stored` (uint8 RGB (T, H, W, 3), as the sensor wrote them) whose container says to show
    them turned `degrees` counterclockwise (PyAV's sign: -90 is a phone's portrait clip, the old `rotate=90`
    tag) and then mirrored: the display matrix a phone writes, in the mp4 `tkhd` box. Untagged BT.601, as
    PyAV converts, so any decoder gets the same colours."""
    import av

    t, h, w, _ = stored.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"  # no chroma blur across block edges
        stream.options = {"crf": "0"}
        stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for frame in stored:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def portrait_moving_down(t: int = 9, h: int = 48, w: int = 32, step: int = 2) -> np.ndarray:
    """Upright portrait frames (T, H, W, 3), H > W: a smooth texture moving down `step` px per frame."""
    from conftest import texture

    base = texture(h + step * t, w, seed=3, blur=2.0)
    return np.stack([base[step * (t - i) : step * (t - i) + h] for i in range(t)])


# (degrees counterclockwise, hflip, vflip) -> how the shown frame comes from the stored one (numpy, by hand)
ORIENTATIONS = {
    (0, False, False): lambda f: f,
    (-90, False, False): lambda f: np.rot90(f, -1),  # a phone's portrait clip: turn clockwise
    (90, False, False): lambda f: np.rot90(f, 1),
    (180, False, False): lambda f: f[::-1, ::-1],
    (0, True, False): lambda f: f[:, ::-1],
    (0, False, True): lambda f: f[::-1],
    (-90, True, False): lambda f: np.rot90(f, -1)[:, ::-1],  # mirrored after the turn
    (90, True, False): lambda f: np.rot90(f, 1)[:, ::-1],
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS), ids=lambda o: f"{o[0]}{'h' * o[1]}{'v' * o[2]}")
def test_read_video_shows_frames_as_the_display_matrix_says(tmp_path, orientation):
    stored = _clip(7, t=3, h=32, w=48)  # landscape as stored
    write_turned(tmp_path / "a.mp4", stored, *orientation)
    frames, _ = read_video(tmp_path / "a.mp4")
    want = np.stack([ORIENTATIONS[orientation](f) for f in stored])
    assert frames.shape == want.shape and frames.flags["C_CONTIGUOUS"]
    assert np.abs(frames.astype(int) - want).mean() < 3.0


def test_portrait_phone_clip_reads_upright_and_moves_down(tmp_path):
    """A portrait clip stored landscape with rotation 90: portrait frames, the texture moving down (+y)."""
    import av

    from moalign.data.flow import build_flow_estimator

    upright = portrait_moving_down()  # (9, 48, 32, 3), moving down 2 px/frame
    stored = np.rot90(upright, 1, axes=(1, 2))  # (9, 32, 48, 3): what the phone's sensor wrote
    write_turned(tmp_path / "phone.mp4", stored, -90)
    with av.open(str(tmp_path / "phone.mp4")) as container:  # the file says so, read back by PyAV itself
        frame = next(container.decode(container.streams.video[0]))
        assert (frame.width, frame.height) == (48, 32) and frame.rotation == -90
    frames, fps = read_video(tmp_path / "phone.mp4")
    assert frames.shape == (9, 48, 32, 3) and fps == pytest.approx(8.0)
    assert np.abs(frames.astype(int) - upright).mean() < 3.0
    flow = build_flow_estimator("dis").pair(frames[3], frames[4])[8:-8, 8:-8]  # (H, W, 2) as (dx, dy)
    assert np.median(flow[..., 1]) == pytest.approx(2.0, abs=0.3)  # down, not sideways
    assert abs(np.median(flow[..., 0])) < 0.3


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_turns_agree_with_opencv(tmp_path, degrees):
    """OpenCV's own FFmpeg build applies the turn too (CAP_PROP_ORIENTATION_AUTO): the same frames."""
    import cv2

    grey = np.repeat(_clip(2, t=3, h=32, w=48)[..., :1], 3, axis=-1)  # greys: no YUV matrix question
    write_turned(tmp_path / "a.mp4", grey, degrees)
    frames, _ = read_video(tmp_path / "a.mp4")
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    theirs = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        theirs.append(bgr[..., ::-1])
    cap.release()
    assert np.stack(theirs).shape == frames.shape
    assert np.abs(np.stack(theirs).astype(int) - frames).mean() < 2.0


def test_a_turn_that_is_not_a_quarter_is_refused_naming_the_file(tmp_path):
    write_turned(tmp_path / "tilted.mp4", _clip(t=2), 30)
    with pytest.raises(
        MoalignError, match=r"tilted\.mp4: the file says to show its frames turned 30\.0 degrees"
    ):
        read_video(tmp_path / "tilted.mp4")
