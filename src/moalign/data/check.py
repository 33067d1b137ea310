"""`moalign check-data`: read a whole dataset once and report every problem before a run meets it.

Each clip gets the header probe that ``skip_bad_videos`` uses (`moalign.data.dataset.drop_reason`: frame
count and rate from the header, first frame decoded), so the clips reported as dropped are exactly the ones a
run drops, plus its frame size from the header; nothing is decoded further except the frames of the contact
sheet. The problems, in report order (`PROBLEMS`):

- missing, unreadable, frame_rate, too_short: what a run with ``skip_bad_videos`` drops (and, without it,
  stops at);
- missing_caption (a sidecar video without its .txt, a row without a caption column: a run stops on it) and
  empty_caption (empty, blank or null: a run stops on it too, unless ``data.allow_empty_captions``, when it
  trains as the empty prompt);
- small: the video is smaller than data.height x data.width in either side, so it is enlarged;
- crop: the centre crop (`moalign/data/geometry.py`) drops more than `MAX_CROP_LOSS` = 30% of the resized
  frame, e.g. a 16:9 video cut to a square clip loses 44%, a 4:3 one cut to 3:2 loses 11%;
- duplicate_row (the same video and caption listed again: that example is trained twice; a run keeps it and
  warns), duplicate_path (a video listed again with another caption) and duplicate_content (the same bytes
  as another file: sha256 of the files whose byte sizes collide). Each copy after the first is counted; the
  first is named.

Sizes are the shown ones: a video whose display matrix turns it (a phone's portrait clip) is reported, cropped
and sampled upright (`moalign.data.video_io.frame_rgb`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from moalign.data.dataset import DROP_KINDS, drop_reason
from moalign.data.geometry import cover_geometry, resize_center_crop
from moalign.data.manifest import (
    CAPTION_COLUMNS,
    ClipRecord,
    Manifest,
    duplicate_rows,
    empty_captions,
    open_manifest,
    where,
)
from moalign.data.sampling import DataConfig, read_clip
from moalign.errors import MoalignError
from moalign.run.atomic import atomic_path, write_json
from moalign.run.console import get_logger

logger = get_logger(__name__)

PROBLEMS = {
    "missing": "video file not found",
    "unreadable": "unreadable (corrupt, not a video, or no frames)",
    "frame_rate": "frame rate unusable at data.fps",
    "too_short": "too short for the clip window",
    "missing_caption": "no caption",
    "empty_caption": "empty or null caption",
    "small": "smaller than the clip size (enlarged)",
    "crop": "centre crop drops more than 30% of the frame",
    "duplicate_row": "row repeated (same video and caption: trained twice)",
    "duplicate_path": "video listed again with another caption",
    "duplicate_content": "same bytes as another video",
}


# the fraction of the resized frame the centre crop may drop before a clip is reported as "crop"
MAX_CROP_LOSS = 0.3


REPORT_NAME = "check_data.json"


SHEET_NAME = "contact_sheet.png"


def check_dataset(
    data_dir: str | os.PathLike,
    data_cfg: DataConfig,
    out_dir: str | os.PathLike | None = None,
    sample: int = 16,
) -> dict[str, Any]:
    """Probe every clip of a dataset and report each problem with counts, without stopping at the first.

    Args:
        data_dir: the dataset folder (any layout of `moalign/data/manifest.py`; data_cfg.caption_column /
            video_column pick the columns).
        data_cfg: the clip config a run would use (num_frames, fps, window, height, width,
            skip_bad_videos).
        out_dir: where to write ``check_data.json`` (the report) and ``contact_sheet.png`` (atomically);
            None writes nothing.
        sample: clips on the contact sheet (evenly spaced over the clips a run keeps): one row each with
            the first, middle and last frame of its clip window at data_cfg's size, and its caption. 0: no
            sheet.

    Returns:
        The report, a JSON-able dict:
            data, layout, manifest, split: the folder, the layout read ("metadata.jsonl", "prompts.txt +
                videos.txt", "sidecar .txt captions", ...), the file read, and "train" when ROOT/train was
                read (else None);
            columns: the column names of a metadata.jsonl / .csv ([] for the other layouts);
            config: data_cfg as a dict;
            num_clips: clips listed; num_ok: clips without any problem;
            counts: {problem: number of clips} for every key of `PROBLEMS` (zeros included);
            problems: {problem: [{"index", "video", "caption", "detail"}]}, the clips of each problem, in
                manifest order (detail: the error message, the size, the first copy);
            would_drop: {"count", "by_kind": {kind: n}}: what skip_bad_videos drops (missing, unreadable,
                frame_rate, too_short), the same number `VideoClipDataset(..., skip_bad_videos=True)`
                drops;
            run_stops: reasons a run with data_cfg as given stops (missing captions: when no clip has one
                because the metadata file has no caption column, its columns and the --caption-column fix;
                empty or null captions unless data_cfg.allow_empty_captions; any would-drop video when
                skip_bad_videos is off), [] when it runs;
            clips: per clip {"index", "video", "caption", "frames", "fps", "height", "width", "problems"}
                (frames and fps from the header, 0 where it has none; height and width as the video is shown,
                i.e. turned by its display matrix; None where the file could not be opened);
            sheet_errors: [{"video", "detail"}] sampled clips that failed to decode past the probe;
            report, contact_sheet: the files written (None when not written).

    Raises:
        MoalignError: no dataset at data_dir, or a manifest that cannot be read at all (malformed line,
            missing video column); missing captions are reported, not raised.
    """
    manifest = open_manifest(
        data_dir, data_cfg.caption_column, data_cfg.video_column, missing_captions_ok=True
    )
    records = manifest.records
    problems: dict[str, list[dict]] = {k: [] for k in PROBLEMS}

    def note(kind: str, r: ClipRecord, detail: str) -> None:
        problems[kind].append(
            {"index": r.index, "video": str(r.video), "caption": r.caption, "detail": detail}
        )

    def probe(r: ClipRecord) -> tuple[tuple[str, str] | None, dict | None]:
        return drop_reason(r.video, data_cfg), _header(r.video)

    workers = max(1, min(8, os.cpu_count() or 1, len(records)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probed = list(pool.map(probe, records))

    empty = {r.index for r in empty_captions(records, manifest.missing_captions)}
    clips = _clip_problems(records, probed, set(manifest.missing_captions), empty, data_cfg, note)
    _duplicates(records, note)
    by_index = {c["index"]: c for c in clips}
    for kind, rows in problems.items():
        for row in rows:
            by_index[row["index"]]["problems"].append(kind)

    by_kind = {k: len(problems[k]) for k in DROP_KINDS}
    n_drop = sum(by_kind.values())
    run_stops = _run_stops(problems, n_drop, data_cfg, _no_caption_column(manifest, data_cfg))
    report: dict[str, Any] = {
        "data": str(Path(data_dir).expanduser().resolve()),
        "layout": manifest.layout,
        "manifest": str(manifest.path),
        "split": manifest.split,
        "columns": list(manifest.columns),
        "config": dataclasses.asdict(data_cfg),
        "num_clips": len(records),
        "num_ok": sum(not c["problems"] for c in clips),
        "counts": {k: len(v) for k, v in problems.items()},
        "problems": problems,
        "would_drop": {"count": n_drop, "by_kind": by_kind},
        "run_stops": run_stops,
        "clips": clips,
        "sheet_errors": [],
        "report": None,
        "contact_sheet": None,
    }
    if out_dir is not None:
        _write(Path(out_dir), records, problems, data_cfg, sample, report)
    return report


def _clip_problems(
    records, probed, missing_captions: set[int], empty: set[int], data_cfg: DataConfig, note
) -> list[dict]:
    """Per clip: the header facts, each problem `note`d (drops, captions, size, crop); problems filled later."""
    clips = []
    target = (data_cfg.height, data_cfg.width)
    for r, (dropped, header) in zip(records, probed, strict=True):
        if dropped is not None:
            note(dropped[0], r, dropped[1])
        if r.index in missing_captions:
            note("missing_caption", r, f"no caption for {r.video} ({r.source})")
        elif r.index in empty:
            note("empty_caption", r, f"empty or null caption ({where(r)})")
        if dropped is None and header is not None and header["height"] > 0 and header["width"] > 0:
            h, w = header["height"], header["width"]
            if h < target[0] or w < target[1]:
                note(
                    "small", r, f"{w}x{h} (width x height) is smaller than the clip's {target[1]}x{target[0]}"
                )
            loss = crop_loss((h, w), target)
            if loss > MAX_CROP_LOSS:
                note("crop", r, f"{w}x{h} cut to {target[1]}x{target[0]} drops {loss:.0%} of the frame")
        unknown = {"frames": None, "fps": None, "height": None, "width": None}
        clips.append(
            {
                "index": r.index,
                "video": str(r.video),
                "caption": r.caption,
                **(header or unknown),
                "problems": [],
            }
        )
    return clips


def _no_caption_column(manifest: Manifest, data_cfg: DataConfig) -> str | None:
    """When no clip has a caption because the metadata file has no caption column: its columns and the fix."""
    if not manifest.columns or len(manifest.missing_captions) < len(manifest.records):
        return None
    if data_cfg.caption_column is not None:
        lacks = f"no column {data_cfg.caption_column!r} (--caption-column)"
    else:
        lacks = f"no caption column (none of {', '.join(CAPTION_COLUMNS)})"
    first = manifest.records[0].extra  # the first row less its video and flow columns
    text = {c: first[c] for c in manifest.columns if isinstance(first.get(c), str) and first[c].strip()}
    # the likeliest caption: the most words (a csv holds numbers as text too)
    likely = max(text, key=lambda c: (len(text[c].split()), len(text[c])), default=None)
    example = f", e.g. --caption-column {likely}" if likely else ""
    return (
        f"{manifest.path} has {lacks}, so no clip has a caption; its columns are: "
        f"{', '.join(manifest.columns)}. Pass --caption-column NAME with the column that holds the "
        f"captions{example}."
    )


def _run_stops(
    problems: dict[str, list[dict]], n_drop: int, data_cfg: DataConfig, no_column: str | None = None
) -> list[str]:
    """Why a run with `data_cfg` as given stops (missing captions, or `no_column`: a manifest without a
    caption column; empty captions unless allowed; a bad video without skip_bad_videos)."""
    run_stops = []
    if no_column is not None:
        run_stops.append(no_column)
    elif problems["missing_caption"]:
        run_stops.append(
            f"{len(problems['missing_caption'])} clip(s) have no caption: reading the manifest fails (first: "
            f"{problems['missing_caption'][0]['video']}). Add the captions or remove those videos."
        )
    if problems["empty_caption"] and not data_cfg.allow_empty_captions:
        first = problems["empty_caption"][0]
        run_stops.append(
            f"{len(problems['empty_caption'])} clip(s) have an empty or null caption (first: {first['video']}, "
            f"{first['detail']}): the dataset refuses them. Write their captions (or remove those rows), or pass "
            "--set data.allow_empty_captions=true to train them as the empty prompt."
        )
    if n_drop and not data_cfg.skip_bad_videos:
        first = next(problems[k][0] for k in DROP_KINDS if problems[k])
        run_stops.append(
            f"{n_drop} video(s) are missing, unreadable or too short and skip_bad_videos is off: the run stops "
            f"before any work, naming them (e.g. {first['video']}). Fix them, or pass --skip-bad-videos to drop them."
        )
    return run_stops


def _write(out: Path, records, problems: dict, data_cfg: DataConfig, sample: int, report: dict) -> None:
    """OUT/contact_sheet.png (a sample of the kept clips) and OUT/check_data.json, atomically."""
    if sample > 0:
        dropped_idx = {row["index"] for k in DROP_KINDS for row in problems[k]}
        kept = [r for r in records if r.index not in dropped_idx]
        sheet = _sheet(kept, data_cfg, sample, report["sheet_errors"])
        if sheet is not None:
            from PIL import Image

            with atomic_path(out / SHEET_NAME) as tmp:
                Image.fromarray(sheet).save(tmp, format="PNG")
            report["contact_sheet"] = str(out / SHEET_NAME)
    report["report"] = str(out / REPORT_NAME)
    write_json(out / REPORT_NAME, report)


def crop_loss(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> float:
    """Fraction of the resized frame (`cover_geometry`) the centre crop to `dst_hw` drops, in [0, 1)."""
    rh, rw, _, _ = cover_geometry(src_hw, dst_hw)
    return 1.0 - (dst_hw[0] * dst_hw[1]) / (rh * rw)


def format_report(report: dict[str, Any], examples: int = 1) -> list[str]:
    """A few human lines summarising a `check_dataset` report (what `moalign check-data` prints).

    Args:
        report: the dict `check_dataset` returns (or its check_data.json, loaded).
        examples: clips named per problem.

    Returns:
        Lines without trailing newlines: what was checked, how many clips are fine, what a run drops or
        stops at, one line per problem found (count, description, first clips), and the files written.
    """
    cfg = report["config"]
    fps = "the native rate" if cfg.get("fps") is None else f"{cfg['fps']:g} fps"
    split = f", split {report['split']}/" if report.get("split") else ""
    lines = [
        f"checked {report['num_clips']} clips in {report['data']} ({report['layout']}{split}) for "
        f"{cfg['num_frames']} frames at {fps}, {cfg['width']}x{cfg['height']} (width x height), "
        f"{cfg['window']} window",
        f"  ok: {report['num_ok']} of {report['num_clips']}",
    ]
    drop = report["would_drop"]
    if drop["count"]:
        parts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in drop["by_kind"].items() if n)
        lines.append(f"  with --skip-bad-videos a run drops {drop['count']}: {parts}")
    for kind, description in PROBLEMS.items():
        rows = report["problems"].get(kind, [])
        if rows:
            shown = "; ".join(_short(f"{r['video']}: {r['detail']}") for r in rows[:examples])
            lines.append(f"  {description}: {len(rows)}, e.g. {shown}")
    if not any(report["counts"].values()):
        lines.append("  no problems found")
    for reason in report["run_stops"]:
        lines.append(f"  a run stops: {reason}")
    if report.get("sheet_errors"):
        lines.append(
            f"  {len(report['sheet_errors'])} sampled clip(s) failed to decode past the header probe"
        )
    written = [p for p in (report.get("report"), report.get("contact_sheet")) if p]
    if written:
        lines.append(f"  wrote {' and '.join(written)}")
    return lines


def _short(text: str, limit: int = 240) -> str:
    """One line of at most `limit` characters; a longer one keeps its start and its end (where the fix is)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " ... " + text[-(limit - head - 5) :]


def _header(path: Path) -> dict | None:
    """Frames and fps from the container header, and the size as shown (the first frame decoded, turned by its
    display matrix); None when the file cannot be opened. Header sizes where no frame decodes."""
    import av

    from moalign.data.video_io import display_size

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            ctx = stream.codec_context
            header = {
                "frames": int(stream.frames or 0),
                "fps": float(rate) if rate else 0.0,
                "height": int(ctx.height or 0),
                "width": int(ctx.width or 0),
            }
            try:
                first = next(container.decode(stream), None)
                if first is not None:
                    header["height"], header["width"] = display_size(first, path)
            except Exception:  # undecodable or turned by an odd angle: drop_reason has named it
                pass
            return header
    except Exception:  # a missing or corrupt file: drop_reason has already named it
        return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _duplicates(records: list[ClipRecord], note: Any) -> None:
    """Report rows repeated whole (same video and caption), videos listed again with another caption, and
    different files with the same bytes."""
    repeats = duplicate_rows(records)
    repeated = {id(r) for r, _ in repeats}
    for r, first in repeats:
        note(
            "duplicate_row",
            r,
            f"{where(r)} repeats clip {first.index} ({where(first)}): same video and caption",
        )
    first_of: dict[Path, ClipRecord] = {}
    by_size: dict[int, list[ClipRecord]] = {}
    for r in records:
        if r.video in first_of:
            if id(r) not in repeated:
                f = first_of[r.video]
                note("duplicate_path", r, f"also listed as clip {f.index} ({where(f)}) with another caption")
            continue
        first_of[r.video] = r
        if r.video.is_file():
            by_size.setdefault(r.video.stat().st_size, []).append(r)
    for group in by_size.values():
        if len(group) < 2:
            continue
        seen: dict[str, ClipRecord] = {}
        for r in group:  # manifest order: the first copy is the one kept in the message
            digest = _file_hash(r.video)
            if digest in seen:
                note(
                    "duplicate_content", r, f"same bytes as {seen[digest].video} (clip {seen[digest].index})"
                )
            else:
                seen[digest] = r


def _caption_font() -> Any:
    """PIL's bitmap default font, whose space is a whole character wide: Pillow >= 10.1's default (FreeType)
    font draws a 2-pixel space at its 10 px size, so a caption read "acrossa room" on the sheet."""
    from PIL import ImageFont

    # Pillow < 10.1 has no load_default_imagefont: its load_default is this font
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    return bitmap() if bitmap is not None else ImageFont.load_default()


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` as lines at most `width` pixels wide in `font`, its words joined by single spaces; a word wider
    than a line is cut into pieces that fit (a piece is at least one character)."""
    lines, line = [], ""
    for word in text.split():
        for piece in _cut(word, font, width):
            trial = f"{line} {piece}" if line else piece
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = piece
            else:
                line = trial
    return [*lines, line] if line else lines


def _cut(word: str, font: Any, width: int) -> list[str]:
    """`word` in pieces at most `width` pixels wide (one piece when it fits)."""
    if font.getlength(word) <= width:
        return [word]
    pieces, piece = [], ""
    for char in word:
        if piece and font.getlength(piece + char) > width:
            pieces.append(piece)
            piece = char
        else:
            piece += char
    return [*pieces, piece]


def _sheet(records: list[ClipRecord], cfg: DataConfig, sample: int, errors: list[dict]) -> np.ndarray | None:
    """First, middle and last frame of up to `sample` clip windows, one row each, caption beside: uint8
    (rows * H', 3 * W' + panel, 3)."""
    from PIL import Image, ImageDraw

    from moalign.generate import contact_sheet

    if not records:
        return None
    picks = sorted(
        set(np.linspace(0, len(records) - 1, min(sample, len(records))).round().astype(int).tolist())
    )
    scale = max(1, math.ceil(96 / cfg.height))  # tiny clips are enlarged (nearest) so the rows are readable
    font = _caption_font()
    rows = []
    for i in picks:
        r = records[i]
        try:
            frames, _, _ = read_clip(r.video, cfg)
        except MoalignError as err:
            errors.append({"video": str(r.video), "detail": str(err)})
            continue
        clip = resize_center_crop(frames, cfg.height, cfg.width)
        three = clip[[0, len(clip) // 2, len(clip) - 1]].repeat(scale, axis=1).repeat(scale, axis=2)
        strip = contact_sheet([three], columns=3)  # (H', 3 W', 3)
        panel_w = max(320, strip.shape[1])
        panel = Image.new("RGB", (panel_w, strip.shape[0]), (255, 255, 255))
        draw = ImageDraw.Draw(panel)
        text = [f"#{r.index} {r.video.name}", *_wrap(r.caption or "(no caption)", font, panel_w - 12)]
        y = 4
        for line in text:
            if y + 12 > strip.shape[0]:
                break
            draw.text((6, y), line, fill=(0, 0, 0), font=font)
            y += 13
        rows.append(np.concatenate([strip, np.asarray(panel)], axis=1))
    if not rows:
        return None
    gap = np.full((2, rows[0].shape[1], 3), 200, np.uint8)
    return np.concatenate([x for row in rows for x in (row, gap)][:-1], axis=0)
