"""Dataset manifests: which videos, which captions, which exact flow files.

A dataset is a folder with a manifest, found in this order:

1. ``metadata.jsonl``: one JSON object a line (the format the playground writes);
2. ``metadata.csv``: the same columns, with a header row;
3. ``prompts.txt`` + ``videos.txt``: line-aligned captions and video paths (the diffusers / finetrainers
   convention).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moalign.errors import MoalignError

VIDEO_COLUMNS = ("video", "video_path", "path", "file_name", "file")


CAPTION_COLUMNS = ("caption", "prompt", "text", "title")


FLOW_COLUMN = "flow"


@dataclass(frozen=True)
class ClipRecord:
    """One row of a manifest.

    Args:
        index: row number in the manifest (0-based, counting rows that hold a clip).
        video: absolute path of the video file.
        caption: the text prompt.
        flow: ground-truth flow safetensors (playground manifests have it), else None.
        extra: the rest of the row (e.g. the playground's 'states', 'motion', 'fps').
        source: where the row came from ("/data/metadata.jsonl:3"), for error messages.
    """

    index: int
    video: Path
    caption: str
    flow: Path | None = None
    extra: dict = field(default_factory=dict)
    source: str = ""


def read_manifest(root: str | os.PathLike) -> list[ClipRecord]:
    """Read the clip list of a dataset folder.

    Looks, in this order, for ``metadata.jsonl``, ``metadata.csv``, then ``prompts.txt`` + ``videos.txt``.
    Video column: first of video, video_path, path, file_name, file; caption column: first of caption,
    prompt, text, title; optional ``flow`` column. Relative paths are relative to the manifest's folder.

    Args:
        root: the dataset folder, or the path of a ``.jsonl`` / ``.csv`` manifest itself.

    Returns:
        One ClipRecord per row, in manifest order, with absolute paths.

    Raises:
        MoalignError: no manifest, a malformed line, a missing column, an empty manifest, or
            prompts.txt and videos.txt of different lengths; the message names the file and line.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix == ".jsonl":
            return _read_jsonl(root.resolve())
        if root.suffix == ".csv":
            return _read_csv(root.resolve())
        raise MoalignError(
            f"{root} is not a dataset folder or a .jsonl/.csv manifest. Pass the folder that holds "
            "metadata.jsonl, metadata.csv or prompts.txt + videos.txt."
        )
    if not root.is_dir():
        raise MoalignError(f"dataset folder not found: {root}. Check the --data path.")
    root = root.resolve()
    if (root / "metadata.jsonl").is_file():
        return _read_jsonl(root / "metadata.jsonl")
    if (root / "metadata.csv").is_file():
        return _read_csv(root / "metadata.csv")
    prompts, videos = root / "prompts.txt", root / "videos.txt"
    if prompts.is_file() and videos.is_file():
        return _read_txt_pair(prompts, videos)
    if prompts.is_file() or videos.is_file():
        have, lack = (prompts, videos) if prompts.is_file() else (videos, prompts)
        raise MoalignError(
            f"{root} has {have.name} but no {lack.name}. Add {lack} (one line per clip, aligned with "
            f"{have.name}) or write a metadata.jsonl / metadata.csv instead."
        )
    raise MoalignError(
        f"no dataset manifest in {root}: looked for metadata.jsonl, metadata.csv, and prompts.txt + "
        "videos.txt. Add one of them (one clip per line/row with a video path and a caption), or point "
        "--data at the right folder."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MoalignError(f"{path} is not UTF-8 text ({err}). Re-save it as UTF-8.") from err


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _record(row: dict, index: int, source: str, base: Path) -> ClipRecord:
    """Turn one manifest row into a ClipRecord; errors name `source` (file:line)."""
    vkey = next((k for k in VIDEO_COLUMNS if k in row), None)
    if vkey is None:
        raise MoalignError(
            f"{source}: no video column. Accepted names: {', '.join(VIDEO_COLUMNS)}; the row has: "
            f"{', '.join(map(str, row)) or 'nothing'}. Rename the column holding the video path."
        )
    ckey = next((k for k in CAPTION_COLUMNS if k in row), None)
    if ckey is None:
        raise MoalignError(
            f"{source}: no caption column. Accepted names: {', '.join(CAPTION_COLUMNS)}; the row has: "
            f"{', '.join(map(str, row))}. Rename the column holding the caption."
        )
    video = row[vkey]
    if not isinstance(video, str) or not video.strip():
        raise MoalignError(
            f"{source}: empty or non-text video path in column '{vkey}' ({video!r}). Fix the row."
        )
    caption = row[ckey]
    caption = "" if caption is None else str(caption)
    flow = row.get(FLOW_COLUMN)
    if flow is not None and not isinstance(flow, str):
        raise MoalignError(f"{source}: the 'flow' column must be a path, got {flow!r}. Fix the row.")
    flow_path = _resolve(base, flow.strip()) if flow and flow.strip() else None
    extra = {k: v for k, v in row.items() if k not in (vkey, ckey, FLOW_COLUMN)}
    return ClipRecord(index, _resolve(base, video.strip()), caption, flow_path, extra, source)


def _empty(path: Path) -> MoalignError:
    return MoalignError(f"{path} lists no clips. Add one clip per line (a video path and a caption).")


def _read_jsonl(path: Path) -> list[ClipRecord]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoalignError(
                f"{source}: malformed JSON ({err.msg} at column {err.colno}). Each line of a .jsonl "
                "manifest must be one JSON object; fix or remove that line."
            ) from err
        if not isinstance(row, dict):
            raise MoalignError(
                f"{source}: expected a JSON object {{...}}, got {type(row).__name__}. Fix the line."
            )
        records.append(_record(row, len(records), source, path.parent))
    if not records:
        raise _empty(path)
    return records


def _read_csv(path: Path) -> list[ClipRecord]:
    reader = csv.DictReader(_read_text(path).splitlines())
    header = reader.fieldnames or []
    if not header:
        raise _empty(path)
    for names, what in ((VIDEO_COLUMNS, "video"), (CAPTION_COLUMNS, "caption")):
        if not any(n in header for n in names):
            raise MoalignError(
                f"{path}:1: the header has no {what} column. Accepted names: {', '.join(names)}; the header "
                f"is: {', '.join(header)}. Rename that column in the header row."
            )
    records = []
    for row in reader:
        source = f"{path}:{reader.line_num}"
        if None in row:
            raise MoalignError(
                f"{source}: the row has more fields than the header ({len(header)}). Quote fields that "
                'contain commas, e.g. "a red ball, then a blue one".'
            )
        if any(v is None for v in row.values()):
            raise MoalignError(
                f"{source}: the row has fewer fields than the header ({len(header)}). Fix the row."
            )
        records.append(_record(row, len(records), source, path.parent))
    if not records:
        raise _empty(path)
    return records


def _read_txt_pair(prompts: Path, videos: Path) -> list[ClipRecord]:
    def lines(p: Path) -> list[str]:
        out = _read_text(p).splitlines()
        while out and not out[-1].strip():
            out.pop()
        return out

    captions, paths = lines(prompts), lines(videos)
    if len(captions) != len(paths):
        raise MoalignError(
            f"{prompts} has {len(captions)} lines but {videos} has {len(paths)}: they must be line-aligned "
            "(line i of prompts.txt is the caption of the video on line i of videos.txt). Fix the files."
        )
    if not paths:
        raise _empty(videos)
    records = []
    for i, (caption, video) in enumerate(zip(captions, paths, strict=True)):
        if not video.strip():
            raise MoalignError(
                f"{videos}:{i + 1}: empty video path. Fill the line or remove it (and its prompt)."
            )
        source = f"{videos}:{i + 1}"
        records.append(
            ClipRecord(i, _resolve(videos.parent, video.strip()), caption.strip(), None, {}, source)
        )
    return records
