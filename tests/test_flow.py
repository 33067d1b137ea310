"""Flow backends recover known motion; the flow cache is readable, resumable and guarded by its fingerprint."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from conftest import texture

from moalign.data.cache_writer import finalize_cache
from moalign.data.flow import FLOW_METHODS, DISFlow, RAFTFlow, build_flow_estimator
from moalign.data.flow_cache import compute_flow_cache, load_flow_cache
from moalign.errors import MoalignError

TOL = {"dis": 0.1, "farneback": 0.2}


def shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """b(p + (dx, dy)) = a(p): the content moves by (dx, dy), so the flow a -> b is (dx, dy)."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def interior_median(flow: np.ndarray, margin: int = 16) -> np.ndarray:
    return np.median(flow[..., margin:-margin, margin:-margin, :].reshape(-1, 2), axis=0)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_subpixel_shift_recovered(method):
    a = texture(128)
    b = shift(a, 2.5, -1.5)
    flow = build_flow_estimator(method).pair(a, b)
    assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(interior_median(flow), [2.5, -1.5], atol=TOL[method])


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_video_integer_shift(method):
    a = texture(64, seed=1)
    frames = np.stack([a, shift(a, 2, 1), shift(a, 4, 2)])  # moves (+2, +1) px per frame
    est = build_flow_estimator(method)
    flow = est.video(frames)
    assert flow.shape == (2, 64, 64, 2) and flow.dtype == np.float32
    for t in range(2):
        np.testing.assert_allclose(interior_median(flow[t], 12), [2, 1], atol=TOL[method])
    out = est.estimate({"frames": torch.from_numpy(frames)})
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(flow))  # deterministic


def test_dis_options_enter_config():
    cfg = build_flow_estimator("dis", preset="fast", patch_size=12).config()
    assert cfg["method"] == "dis" and cfg["preset"] == "fast" and cfg["patch_size"] == 12
    with pytest.raises(ValueError, match="ultrafast, fast, medium"):
        DISFlow(preset="slow")
    with pytest.raises(ValueError, match="at least 12 px"):
        DISFlow().pair(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_dis_result_does_not_depend_on_earlier_calls():
    """OpenCV's DIS object lowers its finest scale after a small frame; each pair must start fresh."""
    est = DISFlow()
    a = texture(128)
    b = shift(a, 2.5, -1.5)
    before = est.pair(a, b)
    est.pair(texture(16), texture(16, seed=1))
    np.testing.assert_array_equal(est.pair(a, b), before)
    assert est.config()["finest_scale"] == 1


def test_exact_returns_sample_flow():
    flow = torch.randn(4, 8, 8, 2)
    valid = torch.rand(4, 8, 8) > 0.3
    est = build_flow_estimator("exact")
    sample = {"frames": torch.zeros(5, 8, 8, 3, dtype=torch.uint8), "flow": flow, "flow_valid": valid}
    assert torch.equal(est.estimate(sample), flow)
    assert torch.equal(est.extras(sample)["valid"], valid)
    with pytest.raises(MoalignError, match="no ground-truth flow column.*--method dis"):
        est.estimate({"frames": sample["frames"]})


def test_unknown_method_lists_valid_ones():
    with pytest.raises(MoalignError) as err:
        build_flow_estimator("pwcnet")
    assert "'pwcnet'" in str(err.value) and all(name in str(err.value) for name in FLOW_METHODS)
    assert set(FLOW_METHODS) == {"dis", "farneback", "raft", "exact"}


def test_raft_errors_are_clear(tmp_path):
    with pytest.raises(MoalignError, match="--raft-weights.*--method dis"):
        build_flow_estimator("raft")
    missing = tmp_path / "raft_large.pth"
    with pytest.raises(MoalignError, match=f"not found: {missing}"):
        build_flow_estimator("raft", raft_weights=missing)
    with pytest.raises(ValueError, match="valid: large, small"):
        build_flow_estimator("raft", raft_weights=missing, model="huge")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_raft_without_torchvision(tmp_path):
    weights = tmp_path / "raft_large.pth"
    torch.save({}, weights)
    with pytest.raises(MoalignError, match="working torchvision.*--method dis"):
        build_flow_estimator("raft", raft_weights=weights)


class FakeRaft(torch.nn.Module):
    """Stands in for torchvision RAFT: checks its input contract and returns a flow that encodes position."""

    def forward(self, img1, img2, num_flow_updates=12):
        b, c, h, w = img1.shape
        assert c == 3 and h % 8 == 0 and w % 8 == 0 and img1.min() >= -1 and img1.max() <= 1
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        flow = torch.stack([xs, ys]).float().expand(b, 2, h, w)  # channel 0 = x, 1 = y
        return [flow * 0, flow]  # RAFT returns every refinement step; the last is the answer


def test_raft_pads_to_multiple_of_8_and_crops_back():
    est = RAFTFlow.from_module(FakeRaft(), batch_size=2)
    frames = np.random.default_rng(0).integers(0, 256, (5, 13, 21, 3), dtype=np.uint8)
    flow = est.video(frames)
    assert flow.shape == (4, 13, 21, 2)
    # padding 16 - 13 = 3 rows (1 top) and 24 - 21 = 3 columns (1 left): cropping restores the coordinates
    np.testing.assert_array_equal(flow[0, 5, 7], [7 + 1, 5 + 1])
    np.testing.assert_array_equal(flow[3], est.pair(frames[3], frames[4]))


# --- the flow cache on a tiny fake dataset ----------------------------------------------------------------


@dataclass(frozen=True)
class FakeConfig:
    num_frames: int = 3
    height: int = 32
    width: int = 32
    fps: float | None = None
    window: str = "start"
    skip_bad_videos: bool = False


@dataclass(frozen=True)
class FakeRecord:
    video: str
    caption: str


class FakeDataset(torch.utils.data.Dataset):
    """VideoClipDataset's shape: clip i is a texture moving (i % 3, 1) px per frame, with exact flow."""

    def __init__(self, n: int = 5, cfg: FakeConfig | None = None, bad: tuple[int, ...] = ()) -> None:
        self.cfg = cfg or FakeConfig()
        self.records = [FakeRecord(f"clips/{i}.mp4", f"clip {i}") for i in range(n)]
        self.bad = bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        if i in self.bad:
            raise MoalignError(f"cannot decode video {self.records[i].video}: corrupt.")
        c = self.cfg
        a = texture(c.height, seed=i)
        dx, dy = i % 3, 1
        frames = np.stack([shift(a, dx * t, dy * t) for t in range(c.num_frames)])
        flow = torch.tensor([float(dx), float(dy)]).expand(c.num_frames - 1, c.height, c.width, 2).clone()
        return {
            "index": i,
            "frames": torch.from_numpy(frames),
            "caption": self.records[i].caption,
            "video": self.records[i].video,
            "frame_indices": torch.arange(c.num_frames),
            "flow": flow,
            "flow_valid": torch.ones(c.num_frames - 1, c.height, c.width, dtype=torch.bool),
        }


class CountingDIS(DISFlow):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def estimate(self, sample: dict) -> torch.Tensor:
        self.calls.append(sample["index"])
        return super().estimate(sample)


def test_flow_cache_round_trip_and_resume(tmp_path):
    data = FakeDataset(5)
    est = CountingDIS()
    out = compute_flow_cache(data, est, tmp_path / "flow", shard_size=2, progress=False)
    assert sorted(est.calls) == [0, 1, 2, 3, 4]
    cache = load_flow_cache(out, data)
    assert len(cache) == 5 and cache.fingerprint["method"]["method"] == "dis"
    first = {i: cache[i]["flow"] for i in range(5)}
    assert first[3].shape == (2, 32, 32, 2) and first[3].dtype == torch.float16
    np.testing.assert_allclose(interior_median(first[2].float().numpy(), 8), [2, 1], atol=0.1)
    expected = DISFlow().estimate(data[4])
    assert (first[4].float() - expected).abs().max() < 0.05  # fp16 storage error

    (out / "shard-00001.safetensors").unlink()  # as if the run had died before writing it
    est.calls.clear()
    compute_flow_cache(data, est, out, shard_size=2, progress=False)
    assert est.calls == [2, 3]  # only the missing shard is recomputed
    cache = load_flow_cache(out, data)
    assert all(torch.equal(cache[i]["flow"], first[i]) for i in range(5))


def test_flow_cache_split_over_processes(tmp_path):
    data = FakeDataset(5)
    out = tmp_path / "flow"
    compute_flow_cache(data, "dis", out, shard_size=1, progress=False, rank=1, world_size=2)
    assert not (out / "manifest.json").exists()  # rank 0's shards are still missing
    compute_flow_cache(data, "dis", out, shard_size=1, progress=False, rank=0, world_size=2)
    assert not (out / "manifest.json").exists()  # with several processes, one finalizes after all are done
    finalize_cache(out)
    assert len(load_flow_cache(out, data)) == 5
    with pytest.raises(MoalignError, match="delete each other's shards"):
        compute_flow_cache(data, "dis", out, overwrite=True, rank=0, world_size=2)


def test_exact_flow_cache_stores_valid(tmp_path):
    data = FakeDataset(3)
    cache = load_flow_cache(compute_flow_cache(data, "exact", tmp_path, dtype=torch.float32, progress=False))
    assert torch.equal(cache[1]["flow"], data[1]["flow"]) and cache[1]["valid"].all()
    assert cache.fingerprint["dtype"] == "float32"


def test_flow_cache_skips_bad_videos_when_allowed(tmp_path):
    strict = FakeDataset(4, bad=(2,))
    with pytest.raises(MoalignError, match="cannot decode video clips/2.mp4"):
        compute_flow_cache(strict, "dis", tmp_path / "a", shard_size=2, progress=False)
    lenient = FakeDataset(4, FakeConfig(skip_bad_videos=True), bad=(2,))
    # skip_bad_videos is not part of the fingerprint: the failed run above resumes with it
    out = compute_flow_cache(lenient, "dis", tmp_path / "a", shard_size=2, progress=False)
    cache = load_flow_cache(out, lenient)
    assert cache.indices == [0, 1, 3] and 2 not in cache
    assert "clips/2.mp4" in cache.skipped[2]


def test_flow_cache_refuses_mismatch(tmp_path):
    data = FakeDataset(3)
    out = compute_flow_cache(data, "dis", tmp_path, progress=False)
    with pytest.raises(MoalignError, match=r"(?s)method.method: \"dis\" -> \"farneback\".*--overwrite"):
        compute_flow_cache(data, "farneback", out, progress=False)
    with pytest.raises(MoalignError, match="data.height: 32 -> 16"):
        load_flow_cache(out, FakeDataset(3, FakeConfig(height=16, width=16)))
    with pytest.raises(MoalignError, match="num_clips: 3 -> 4"):
        load_flow_cache(out, FakeDataset(4))
    moved = FakeDataset(3)
    moved.records = [FakeRecord("/new/" + r.video, r.caption) for r in moved.records]
    with pytest.warns(UserWarning, match="other video paths or captions"):
        load_flow_cache(out, moved)
    compute_flow_cache(data, "farneback", out, overwrite=True, progress=False)
    assert load_flow_cache(out).fingerprint["method"]["method"] == "farneback"


def test_fp16_storage_error_bound():
    """The docstring's claim: float16 costs < 0.05 px for |flow| < 64 px."""
    x = torch.linspace(-64, 64, 100_001)
    assert (x.half().float() - x).abs().max() < 0.05
