"""Run trackers beside RUN/log.jsonl: wandb (offline) and TensorBoard get the scalars, the validation videos and
the run's config; a resumed run continues its wandb run; a missing wandb says how to install it."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_transformer

from moalign.backbones import get_backbone
from moalign.data.video_io import write_video
from moalign.errors import MoalignError
from moalign.run.training import WANDB_RUN, RunLogger, check_report_to


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb logging to files under tmp_path/wandb-home (no server, no login), project from the default."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    home = tmp_path / "wandb-home"
    home.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(home))
    yield home
    import wandb

    wandb.teardown()  # wandb reads its environment once per process: the next test starts it afresh


def wandb_records(home: Path, run_id: str) -> list[dict]:
    """Every launch's records of the offline run `run_id`, in launch order: {"kind": "run", "project",
    "name", "config"} and {"kind": "history", <key>: value} rows (media as their JSON fields, e.g.
    "validation/video_0/caption").

    An offline run is a LevelDB-style log (wandb's transaction log: a 7-byte ":W&B" header, 32 KiB blocks of
    records with a 7-byte header: crc32, length, type) of wandb_internal_pb2.Record messages.
    """
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # a finished run's offline file is complete once wandb's service process has stopped
    out = []
    for folder in launches(home, run_id):
        raw = (folder / f"run-{run_id}.wandb").read_bytes()
        assert raw[:4] == b":W&B"
        pos, chunk = 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            chunk += raw[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind not in (1, 4):  # FIRST / MIDDLE pieces of a record spanning blocks
                continue
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
                out.append({"kind": "run", "project": record.run.project, "name": record.run.display_name,
                            "config": config})  # fmt: skip
            elif which == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                out.append({"kind": "history", **items})
            elif which == "config":
                config = {u.key: json.loads(u.value_json) for u in record.config.update}
                out.append({"kind": "config", "config": config})
    return out


def launches(home: Path, run_id: str) -> list[Path]:
    """The offline run folders of `run_id` in launch order: offline-run-<time>-<id>, then -<id>-1, -<id>-2 for
    launches within the same second."""

    def order(folder: Path) -> tuple[str, int]:
        parts = folder.name.split("-")  # offline, run, <time>, <id>[, <n>]
        return parts[2], int(parts[4]) if len(parts) > 4 else 0

    return sorted(home.glob(f"wandb/offline-run-*-{run_id}*"), key=order)


def history(records: list[dict], key: str) -> list[tuple[int, object]]:
    return [(r["_step"], r[key]) for r in records if r["kind"] == "history" and key in r]


def test_report_to_values():
    for value in ("none", "tensorboard", "wandb", "all"):
        check_report_to(value)
    with pytest.raises(
        ValueError, match="report_to must be one of none, tensorboard, wandb, all, got 'comet'"
    ):
        check_report_to("comet")


def test_wandb_and_tensorboard_get_scalars_videos_and_config(offline_wandb, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "my-run"
    run.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames[:3])
    log = RunLogger(run, report_to="all", config={"lr": 1e-3, "align": {"mode": "moalign"}})
    log.log(0, total=1.5, lr=1e-3)
    log.log(1, total=0.75, lr=5e-4)
    log.log_media(1, "validation/video_0", frames, caption="a red ball falls")
    log.log_media(1, "validation/video_1", tmp_path / "v.mp4", caption="a cube slides")
    log.close()

    run_id = json.loads((run / WANDB_RUN).read_text())["id"]
    records = wandb_records(offline_wandb, run_id)
    start = next(r for r in records if r["kind"] == "run")
    config = {k: v for r in records if r["kind"] in ("run", "config") for k, v in r["config"].items()}
    assert start["project"] == "moalign" and start["name"] == "my-run"
    assert config["lr"] == 1e-3 and config["align"] == {"mode": "moalign"}
    assert history(records, "total") == [(0, 1.5), (1, 0.75)] and history(records, "lr") == [
        (0, 1e-3),
        (1, 5e-4),
    ]
    assert history(records, "validation/video_0/caption") == [(1, "a red ball falls")]
    assert history(records, "validation/video_1/caption") == [(1, "a cube slides")]
    media = sorted(offline_wandb.glob("wandb/offline-run-*/files/media/videos/validation/*.mp4"))
    assert len(media) == 2  # frames were encoded to an mp4 that wandb copied before the temporary went away
    # TensorBoard: the same scalars, and each video as a strip of its frames (5 and 3 frames of 16x16)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("total")] == [(0, 1.5), (1, 0.75)]
    strips = {tag: events.Images(tag) for tag in ("validation/video_0", "validation/video_1")}
    assert [(e.step, e.width, e.height) for e in strips["validation/video_0"]] == [(1, 80, 16)]
    assert [(e.step, e.width, e.height) for e in strips["validation/video_1"]] == [(1, 48, 16)]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_a_resumed_run_continues_its_wandb_run_without_resending_held_steps(
    offline_wandb, tmp_path, monkeypatch
):
    """Launch 1 logs steps 0-3 and dies after its step-2 checkpoint; launch 2 resumes at step 2 with the same
    wandb id. The wandb server then holds steps 0-3 (`Run.starting_step` 4; offline runs report 0, so the
    server's answer is stood in for), and only steps from 4 on are sent again."""
    import wandb

    run = tmp_path / "run"
    run.mkdir()
    first = RunLogger(run, report_to="wandb", config={"steps": 4})
    for step in range(4):
        first.log(step, total=float(step))
    first.close()  # (a kill leaves wandb to close the run at exit)
    run_id = json.loads((run / WANDB_RUN).read_text())["id"]
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "starting_step", property(lambda self: 4))
    second = RunLogger(run, resume_from_step=1, report_to="wandb", config={"steps": 6})
    for step in range(2, 6):
        second.log(step, total=10.0 + step)
    second.log_media(3, "validation/video_0", np.zeros((3, 8, 8, 3), np.uint8))  # held step: not sent
    second.close()

    assert json.loads((run / WANDB_RUN).read_text())["id"] == run_id
    assert len(launches(offline_wandb, run_id)) == 2  # both launches logged to the one run id
    records = wandb_records(offline_wandb, run_id)
    assert history(records, "total") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert not history(records, "validation/video_0/caption") and not history(
        records, "validation/video_0/path"
    )
    assert [r["config"]["steps"] for r in records if r["kind"] == "config" and "steps" in r["config"]][
        -1
    ] == 6
    # the JSON log dropped the killed launch's steps after the checkpoint and has the resumed values
    assert [(r["step"], r["total"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())] == [
        (0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 15.0)]  # fmt: skip


def test_wandb_project_comes_from_the_environment_and_stays_with_the_run(
    offline_wandb, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("WANDB_PROJECT", "videos")
    RunLogger(run, report_to="wandb").close()
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")  # a resumed run stays in the project it started in
    RunLogger(run, report_to="wandb").close()
    run_id = json.loads((run / WANDB_RUN).read_text())["id"]
    assert [r["project"] for r in wandb_records(offline_wandb, run_id) if r["kind"] == "run"] == [
        "videos"
    ] * 2


def test_a_missing_wandb_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(
        MoalignError, match=r"report_to=wandb needs the wandb package: pip install 'moalign\[wandb\]'"
    ):
        RunLogger(tmp_path, report_to="all")
    RunLogger(tmp_path, report_to="wandb", enabled=False).close()  # other processes never import it
    assert not (tmp_path / WANDB_RUN).exists()


def test_validation_videos_and_motion_reach_the_trackers(tiny_cogvideox_pipeline, offline_wandb, tmp_path):
    """MotionWatch with a tiny pipeline: the base model's step-0 videos (and val_motion_base) when the watch
    starts, then each validation's videos beside val_motion, in TensorBoard and wandb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moalign.alignment import AlignConfig
    from moalign.evaluation.validation import MotionWatch
    from moalign.stage2 import Stage2Config

    cfg = Stage2Config(align=AlignConfig(mode="none"), lora_rank=2, validation_prompts=("a red ball falls",),
                       validate_every=2, validation_pipeline=str(tiny_cogvideox_pipeline), validation_frames=9,
                       validation_size=(32, 32), validation_steps=2)  # fmt: skip
    model = torch.nn.Module()
    model.transformer = tiny_transformer("cogvideox")
    run = tmp_path / "run"
    run.mkdir()
    log = RunLogger(run, report_to="all")
    watch = MotionWatch(get_backbone("cogvideox"), cfg, run, torch.device("cpu"), True, model, 0, log=log)
    watch(model, 1, 0, log)  # not due
    watch(model, 2, 1, log)
    log.close()

    base = json.loads((run / "validation" / "step-0" / "motion.json").read_text())["mean"]
    after = json.loads((run / "validation" / "step-2" / "motion.json").read_text())["mean"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.width, e.height) for e in events.Images("validation/video_0")] == [
        (0, 32 * 8, 32),
        (1, 32 * 8, 32),
    ]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("val_motion")] == [(1, after)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("val_motion_base")] == [(0, base)]
    records = wandb_records(offline_wandb, json.loads((run / WANDB_RUN).read_text())["id"])
    assert history(records, "val_motion") == [(1, pytest.approx(after))]
    assert history(records, "validation/video_0/caption") == [
        (0, "a red ball falls"),
        (1, "a red ball falls"),
    ]
