"""Dataset manifests: which videos, which captions, which exact flow files.

A dataset is a folder. Its clip list is found in this order; the first layout that applies is read:

1. ``metadata.jsonl``: one JSON object a line (the format the playground writes; also the Hugging Face
   videofolder / imagefolder convention, whose video column is ``file_name``);
2. ``metadata.csv``: the same columns, with a header row; then ``metadata.json``: a JSON array of such
   objects (finetrainers' and many datasets' .json file);
3. text files, line-aligned: captions from ``prompts.txt``, ``prompt.txt``, ``captions.txt`` or
   ``caption.txt``, video paths from ``videos.txt`` or ``video.txt`` (the CogVideo / finetrainers /
   diffusers convention; the first name present is read, the others are listed in a warning);
4. a split folder: the folder has none of 1-3 but its ``train/`` subfolder has one (a Hugging Face
   datasets-style ``ROOT/train/metadata.jsonl``): ``ROOT/train`` is read and the log says so;
5. sidecar captions: every video below the folder (.mp4, .webm, .mov, .mkv, .avi, .gif; searched
   recursively, hidden files and folders left out, sorted by path) with a same-stem ``.txt`` caption beside
   it (``clip.mp4`` + ``clip.txt``). A video without its ``.txt`` is an error naming it.

Columns (1, 2): the video path is the first of video, video_path, path, file_name, file; the caption the
first of caption, prompt, text, title; an optional ``flow`` column names a ground-truth flow file.
``caption_column`` / ``video_column`` (DataConfig fields, `--set data.caption_column=...`) name the exact
column instead; in layout 3 they may name the text files (``caption_column="prompt.txt"``, as finetrainers'
``--caption_column prompt.txt``). A caption is taken whole: never split on commas.

Each file is read as its format defines it, with that format's own reader, so every valid file reads as
it means: CSV by the csv module (quoted fields may hold commas, quotes and line breaks), JSON and JSON Lines
by the json module (JSON Lines split on line feeds only: a caption may hold U+2028 and the like), text files
by lines (LF, CRLF or CR); a UTF-8 byte-order mark is allowed everywhere. `empty_captions` and
`duplicate_rows` find the rows a dataset (`moalign.data.dataset`) and `moalign check-data` report.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from moalign.errors import MoalignError
from moalign.run.console import get_logger

logger = get_logger(__name__)

VIDEO_COLUMNS = ("video", "video_path", "path", "file_name", "file")


CAPTION_COLUMNS = ("caption", "prompt", "text", "title")


FLOW_COLUMN = "flow"


# layout 3: caption files, then video-list files, each in the order they are looked for
CAPTION_FILES = ("prompts.txt", "prompt.txt", "captions.txt", "caption.txt")


VIDEO_FILES = ("videos.txt", "video.txt")


# layout 4: the split read from a Hugging Face datasets-style folder
SPLIT = "train"


# layout 5: the video files searched for (lower-case suffixes; .MP4 matches too)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


class NoManifestError(MoalignError):
    """A folder holds none of the layouts: no manifest file and no video with a caption beside it.

    Raised by `open_manifest` / `read_manifest` (the message lists what was looked for), so that a caller for
    whom captions are optional (`moalign.evaluation.folder.find_videos`) can tell "nothing here" from a
    malformed manifest, which stays a plain MoalignError.
    """


LOOKED_FOR = (
    "metadata.jsonl, metadata.csv, metadata.json, prompts.txt + videos.txt (or prompt.txt / captions.txt / caption.txt + "
    "video.txt), the same in a train/ subfolder, and videos (" + ", ".join(VIDEO_SUFFIXES) + ") with a "
    "same-stem .txt caption beside each"
)


@dataclass(frozen=True)
class ClipRecord:
    """One row of a manifest.

    Args:
        index: row number in the manifest (0-based, counting rows that hold a clip).
        video: absolute path of the video file.
        caption: the text prompt.
        flow: ground-truth flow safetensors (playground manifests have it), else None.
        extra: the rest of the row (e.g. the playground's 'states', 'motion', 'fps').
        source: where the row came from ("/data/metadata.jsonl:3", "/data/metadata.json[2]" (0-based item),
            or a sidecar caption file), for error messages.
    """

    index: int
    video: Path
    caption: str
    flow: Path | None = None
    extra: dict = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class Manifest:
    """What `open_manifest` read.

    Args:
        records: one ClipRecord per clip, in manifest order (see `read_manifest`).
        layout: which layout was read, for messages: "metadata.jsonl", "metadata.csv", "metadata.json",
            "prompts.txt + videos.txt" (the file names found), or "sidecar .txt captions".
        path: the manifest file read (layouts 1-3) or the folder searched (layout 5).
        split: "train" when the folder's train/ split was read (layout 4), else None.
        missing_captions: indices (into `records`) of clips with no caption at all: a sidecar video without
            its .txt, or a row without a caption column. Always empty unless `open_manifest` was called with
            ``missing_captions_ok=True`` (otherwise they are errors); such records hold caption "".
        columns: the column names of a metadata.jsonl / .csv / .json (the csv header; the keys of every json
            row, in order of first appearance), for messages; () for the other layouts.
    """

    records: list[ClipRecord]
    layout: str
    path: Path
    split: str | None = None
    missing_captions: tuple[int, ...] = ()
    columns: tuple[str, ...] = ()


def read_manifest(
    root: str | os.PathLike, caption_column: str | None = None, video_column: str | None = None
) -> list[ClipRecord]:
    """Read the clip list of a dataset folder.

    Tries the layouts of this module's docstring in order: ``metadata.jsonl``, ``metadata.csv``,
    ``metadata.json``, caption +
    video text files, the same in ``ROOT/train/``, then videos with same-stem ``.txt`` captions. Relative
    paths are relative to the manifest's folder.

    Args:
        root: the dataset folder, or the path of a ``.jsonl`` / ``.csv`` / ``.json`` manifest itself.
        caption_column: the exact column holding the caption (jsonl / csv), or the caption file's name
            relative to `root` (text-file layout, e.g. "prompt.txt"). None: the first of caption, prompt,
            text, title (jsonl / csv) or of the caption file names.
        video_column: likewise for the video path (e.g. "file_name", or "videos.txt").

    Returns:
        One ClipRecord per row (or per sidecar video), in manifest order (sidecar: sorted by path), with
        absolute paths.

    Raises:
        NoManifestError: (a MoalignError) no layout applies: no manifest file, and no video below the folder
            or none with a caption beside it.
        MoalignError: a malformed line, a missing column (an explicit column names the
            file, the column and the columns the file has), an empty manifest, a lone caption or video text
            file, text files of different lengths, or a sidecar video without its .txt; the message names
            the file and line and the fix.
    """
    return open_manifest(root, caption_column, video_column).records


def open_manifest(
    root: str | os.PathLike,
    caption_column: str | None = None,
    video_column: str | None = None,
    *,
    missing_captions_ok: bool = False,
) -> Manifest:
    """Read a dataset like `read_manifest`, and say which layout and file were read.

    Args:
        root, caption_column, video_column: as in `read_manifest`.
        missing_captions_ok: list the clips that have no caption at all (a sidecar video without its .txt,
            a row without a caption column) in `Manifest.missing_captions`, with caption "", instead of
            raising: `moalign.data.check.check_dataset` reports them all at once.

    Returns:
        The `Manifest`: records, layout name, the file read and the split.

    Raises:
        MoalignError: as `read_manifest`.
    """
    cols = _Columns(
        _column_arg("caption_column", caption_column),
        _column_arg("video_column", video_column),
        missing_captions_ok,
    )
    root = Path(root).expanduser()
    if root.is_file():
        name = f"metadata{root.suffix.lower()}"
        if name in METADATA_FILES:
            return _manifest(METADATA_FILES[name](root.resolve(), cols), name, root.resolve())
        raise MoalignError(
            f"{root} is not a dataset folder or a .jsonl/.csv/.json manifest. Pass the folder that holds the "
            "manifest (metadata.jsonl, metadata.csv, prompts.txt + videos.txt, ...) or the videos."
        )
    if not root.is_dir():
        raise MoalignError(f"dataset folder not found: {root}. Check the --data path.")
    root = root.resolve()
    found = _manifest_in(root, cols)
    if found is not None:
        return found
    split = root / SPLIT
    if split.is_dir():
        found = _manifest_in(split, cols)
        if found is not None:
            others = sorted(
                d.name
                for d in root.iterdir()
                if d.is_dir() and d.name != SPLIT and not d.name.startswith(".")
            )
            also = f" (not read: {', '.join(o + '/' for o in others)})" if others else ""
            logger.info(
                f"[data] {root} has no manifest of its own: reading its '{SPLIT}' split, {found.path}{also}"
            )
            return replace(found, split=SPLIT)
    if cols.names_files:
        named = [c for c in (cols.caption, cols.video) if c is not None]
        raise MoalignError(
            f"{' and '.join(named)} (named by caption_column / video_column) not found in {root} or "
            f"{split}. Check the file names, or leave caption_column / video_column unset to look for "
            f"{', '.join(CAPTION_FILES)} and {', '.join(VIDEO_FILES)}."
        )
    return _read_sidecar(root, cols)


@dataclass(frozen=True)
class _Columns:
    """The explicit column (or text-file) choices and whether a missing caption is allowed."""

    caption: str | None
    video: str | None
    missing_ok: bool

    @property
    def names_files(self) -> bool:
        return any(c is not None and c.lower().endswith(".txt") for c in (self.caption, self.video))

    @property
    def given(self) -> str:
        pairs = (("caption_column", self.caption), ("video_column", self.video))
        return ", ".join(f"{k}={v!r}" for k, v in pairs if v is not None)


def _column_arg(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MoalignError(
            f"{name}={value!r} is not a column name. Pass the name of the column (or text file) that holds "
            f"it, e.g. --set data.{name}=..., or leave it unset."
        )
    return value


def _manifest(found: tuple[list[ClipRecord], list[int], list[str]], layout: str, path: Path) -> Manifest:
    records, missing, columns = found
    return Manifest(records, layout, path, None, tuple(missing), tuple(columns))


def _manifest_in(folder: Path, cols: _Columns) -> Manifest | None:
    """Layouts 1-3 in one folder; None when none of them is there."""
    if cols.names_files:
        return _named_text_files(folder, cols)
    for name, read in METADATA_FILES.items():
        if (folder / name).is_file():
            return _manifest(read(folder / name, cols), name, folder / name)
    captions = [folder / n for n in CAPTION_FILES if (folder / n).is_file()]
    videos = [folder / n for n in VIDEO_FILES if (folder / n).is_file()]
    if captions and videos:
        for found, kind in ((captions, "caption"), (videos, "video list")):
            if len(found) > 1:
                logger.warning(
                    f"[data] {folder} has several {kind} files ({', '.join(p.name for p in found)}): reading "
                    f"{found[0].name}. Name the one to read with caption_column / video_column, e.g. "
                    f"--set data.{'caption' if kind == 'caption' else 'video'}_column={found[-1].name}."
                )
        return _text_files(captions[0], videos[0], cols)
    if captions or videos:
        have = (captions or videos)[0]
        lack = VIDEO_FILES if captions else CAPTION_FILES
        raise MoalignError(
            f"{folder} has {have.name} but no {' or '.join(lack)}. Add {folder / lack[0]} (one line per clip, "
            f"aligned with {have.name}) or write a metadata.jsonl / metadata.csv instead."
        )
    return None


def _named_text_files(folder: Path, cols: _Columns) -> Manifest | None:
    """Layout 3 with the file names given as caption_column / video_column (finetrainers' convention)."""
    is_file = [c is not None and c.lower().endswith(".txt") for c in (cols.caption, cols.video)]
    if cols.caption is not None and cols.video is not None and is_file[0] != is_file[1]:
        raise MoalignError(
            f"{cols.given}: one names a text file and the other a column. Name both text files (e.g. "
            "caption_column='prompt.txt', video_column='videos.txt') or both columns of a metadata file."
        )
    named = {
        "caption": folder / cols.caption if cols.caption else None,
        "video": folder / cols.video if cols.video else None,
    }
    if not any(p is not None and p.is_file() for p in named.values()):
        return None
    defaults = {"caption": CAPTION_FILES, "video": VIDEO_FILES}
    paths = {}
    for kind, path in named.items():
        if path is None:
            path = next((folder / n for n in defaults[kind] if (folder / n).is_file()), None)
            if path is None:
                raise MoalignError(
                    f"{folder} has the file {cols.given} names but no {kind} file ({', '.join(defaults[kind])}). "
                    f"Add one, or name it with {kind}_column."
                )
        elif not path.is_file():
            raise MoalignError(
                f"{path} ({kind}_column={path.name!r}) not found. Check the name; the text files in {folder} "
                f"are: {', '.join(sorted(p.name for p in folder.glob('*.txt'))) or 'none'}."
            )
        paths[kind] = path
    return _text_files(paths["caption"], paths["video"], _Columns(None, None, cols.missing_ok))


def _text_files(captions: Path, videos: Path, cols: _Columns) -> Manifest:
    if cols.caption is not None or cols.video is not None:
        raise MoalignError(
            f"{cols.given} names a column, but {captions.parent} holds line-aligned text files "
            f"({captions.name} + {videos.name}), which have none. Leave it unset, or name the text files "
            f"(caption_column={captions.name!r}, video_column={videos.name!r})."
        )
    return Manifest(_read_txt_pair(captions, videos), f"{captions.name} + {videos.name}", captions)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_sidecar(root: Path, cols: _Columns) -> Manifest:
    """Layout 5: every video below `root` with a same-stem .txt caption beside it."""
    videos = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in VIDEO_SUFFIXES and not _hidden(p, root) and p.is_file()
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not videos:
        raise NoManifestError(
            f"no dataset manifest in {root}: looked for {LOOKED_FOR}. Add one of them (one "
            "clip per line/row with a video path and a caption), or point --data at the right folder."
        )
    if cols.caption is not None or cols.video is not None:
        raise MoalignError(
            f"{cols.given} names a column, but {root} is a folder of videos with .txt captions beside them, "
            "which has none. Leave caption_column / video_column unset, or write a metadata.jsonl / .csv."
        )
    sidecars = [v.with_suffix(".txt") for v in videos]
    missing = [i for i, c in enumerate(sidecars) if not c.is_file()]
    if missing and not cols.missing_ok:
        shown = "; ".join(str(videos[i]) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        first = videos[missing[0]]
        if len(missing) == len(videos):
            raise NoManifestError(
                f"no dataset manifest in {root}: looked for {LOOKED_FOR}. It holds {len(videos)} videos, but none "
                f"has a caption file beside it (e.g. {first.name} without {first.with_suffix('.txt').name}). Add "
                "a same-stem .txt caption next to each video, or write a metadata.jsonl / metadata.csv."
            )
        raise MoalignError(
            f"{len(missing)} of {len(videos)} videos in {root} have no caption file beside them: {shown}{more}. "
            f"Add a same-stem .txt next to each (e.g. {first.with_suffix('.txt')}), or remove those videos; "
            "`moalign check-data` lists them all."
        )
    records = []
    for i, (video, sidecar) in enumerate(zip(videos, sidecars, strict=True)):
        caption = _read_text(sidecar).strip() if sidecar.is_file() else ""
        records.append(ClipRecord(i, video, caption, None, {}, str(sidecar if sidecar.is_file() else video)))
    return Manifest(records, "sidecar .txt captions", root, None, tuple(missing))


def _read_text(path: Path, newline: str | None = None) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); newline=None turns CRLF and CR into LF, "" keeps them."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise MoalignError(f"{path} is not UTF-8 text ({err}). Re-save it as UTF-8.") from err


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _key(row: dict, explicit: str | None, aliases: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit if explicit in row else None
    return next((k for k in aliases if k in row), None)


def _no_column(
    source: str, what: str, explicit: str | None, aliases: tuple[str, ...], have: list
) -> MoalignError:
    have_s = ", ".join(map(str, have)) or "nothing"
    if explicit is not None:
        return MoalignError(
            f"{source}: no column {explicit!r} ({what}_column); the row has: {have_s}. Pass the column that "
            f"holds the {what} as {what}_column, or leave it unset to use the first of {', '.join(aliases)}."
        )
    return MoalignError(
        f"{source}: no {what} column. Accepted names: {', '.join(aliases)}; the row has: {have_s}. Rename the "
        f"column holding the {what}, or name it with {what}_column (--set data.{what}_column=NAME)."
    )


def _record(row: dict, index: int, source: str, base: Path, cols: _Columns, missing: list[int]) -> ClipRecord:
    """Turn one manifest row into a ClipRecord; errors name `source` (file:line)."""
    vkey = _key(row, cols.video, VIDEO_COLUMNS)
    if vkey is None:
        raise _no_column(source, "video", cols.video, VIDEO_COLUMNS, list(row))
    ckey = _key(row, cols.caption, CAPTION_COLUMNS)
    if ckey is None and not cols.missing_ok:
        raise _no_column(source, "caption", cols.caption, CAPTION_COLUMNS, list(row))
    video = row[vkey]
    if not isinstance(video, str) or not video.strip():
        raise MoalignError(
            f"{source}: empty or non-text video path in column '{vkey}' ({video!r}). Fix the row."
        )
    caption = row.get(ckey) if ckey is not None else None
    if isinstance(caption, list | dict):
        raise MoalignError(
            f"{source}: the caption in column '{ckey}' is a {type(caption).__name__}, not one text. Keep one "
            "caption per clip (one row per caption), or pass the column holding the text as caption_column."
        )
    caption = "" if caption is None else str(caption)  # taken whole: never split on commas
    if ckey is None:
        missing.append(index)
    flow = row.get(FLOW_COLUMN)
    if flow is not None and not isinstance(flow, str):
        raise MoalignError(f"{source}: the 'flow' column must be a path, got {flow!r}. Fix the row.")
    flow_path = _resolve(base, flow.strip()) if flow and flow.strip() else None
    extra = {k: v for k, v in row.items() if k not in (vkey, ckey, FLOW_COLUMN)}
    return ClipRecord(index, _resolve(base, video.strip()), caption, flow_path, extra, source)


def _empty(path: Path) -> MoalignError:
    return MoalignError(f"{path} lists no clips. Add one clip per line (a video path and a caption).")


def _read_jsonl(path: Path, cols: _Columns) -> tuple[list[ClipRecord], list[int], list[str]]:
    records: list[ClipRecord] = []
    missing: list[int] = []
    columns: dict[str, None] = {}  # an ordered set
    # JSON Lines ends lines with \n (a \r before it is JSON whitespace): str.splitlines would also cut at
    # U+2028, U+0085, \x1c..., which JSON strings may hold as they are
    for lineno, line in enumerate(_read_text(path, newline="").split("\n"), start=1):
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
        columns.update(dict.fromkeys(map(str, row)))
        records.append(_record(row, len(records), source, path.parent, cols, missing))
    if not records:
        raise _empty(path)
    return records, missing, list(columns)


def _read_json(path: Path, cols: _Columns) -> tuple[list[ClipRecord], list[int], list[str]]:
    """A .json manifest: one JSON array of row objects (sources name the item: ``metadata.json[3]``)."""
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise MoalignError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}). A .json manifest is one "
            'JSON array of objects, [{"video": ..., "caption": ...}, ...]; fix the file.'
        ) from err
    if not isinstance(rows, list):
        raise MoalignError(
            f"{path}: expected a JSON array of objects [{{...}}, ...], got a {type(rows).__name__}. Write the "
            "rows as one array (or one object a line in a metadata.jsonl)."
        )
    records: list[ClipRecord] = []
    missing: list[int] = []
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        source = f"{path}[{i}]"
        if not isinstance(row, dict):
            raise MoalignError(f"{source}: expected a JSON object {{...}}, got {type(row).__name__}. Fix it.")
        columns.update(dict.fromkeys(map(str, row)))
        records.append(_record(row, len(records), source, path.parent, cols, missing))
    if not records:
        raise _empty(path)
    return records, missing, list(columns)


def _csv_rows(path: Path):
    """(first line, last line, fields) of each non-blank CSV record, read by the csv module (quoted fields
    may hold commas, quotes and line breaks; LF or CRLF; a UTF-8 byte-order mark is dropped)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": the csv module's own rule
            reader = csv.reader(f)
            end = 0
            for row in reader:
                start, end = end + 1, reader.line_num
                if row:  # a blank line is a record of no fields: not a row
                    yield start, end, row
    except UnicodeDecodeError as err:
        raise MoalignError(f"{path} is not UTF-8 text ({err}). Re-save it as UTF-8.") from err
    except csv.Error as err:
        raise MoalignError(f"{path}: not readable as CSV ({err}). Fix the file.") from err


def _read_csv(path: Path, cols: _Columns) -> tuple[list[ClipRecord], list[int], list[str]]:
    rows = _csv_rows(path)
    first = next(rows, None)
    header = first[2] if first is not None else []
    if not header:
        raise _empty(path)
    checks = [(VIDEO_COLUMNS, cols.video, "video")]
    if not cols.missing_ok:
        checks.append((CAPTION_COLUMNS, cols.caption, "caption"))
    for names, explicit, what in checks:
        if explicit is not None and explicit not in header:
            raise MoalignError(
                f"{path}:1: the header has no column {explicit!r} ({what}_column); the header is: "
                f"{', '.join(header)}. Pass the column that holds the {what}, or leave {what}_column unset to "
                f"use the first of {', '.join(names)}."
            )
        if explicit is None and not any(n in header for n in names):
            raise MoalignError(
                f"{path}:1: the header has no {what} column. Accepted names: {', '.join(names)}; the header "
                f"is: {', '.join(header)}. Rename that column in the header row, or name it with {what}_column "
                f"(--set data.{what}_column=NAME)."
            )
    records: list[ClipRecord] = []
    missing: list[int] = []
    for start, end, fields in rows:
        source = f"{path}:{start}" if start == end else f"{path}:{start}-{end}"
        if len(fields) > len(header):
            raise MoalignError(
                f"{source}: the row has more fields than the header ({len(fields)} > {len(header)}). Quote "
                'fields that contain commas, e.g. "a red ball, then a blue one".'
            )
        if len(fields) < len(header):
            raise MoalignError(
                f"{source}: the row has fewer fields than the header ({len(fields)} < {len(header)}). Fix "
                "the row."
            )
        row = dict(zip(header, fields, strict=True))
        records.append(_record(row, len(records), source, path.parent, cols, missing))
    if not records:
        raise _empty(path)
    return records, missing, list(header)


def text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark dropped), as text tools count them: ends LF, CRLF or
    CR, a last line end closing the last line; never cut at other characters, as str.splitlines would at
    U+2028, U+0085, form feeds... (a prompts file read with it keeps one prompt per line).

    Raises:
        MoalignError: the file is not UTF-8.
    """
    text = _read_text(Path(path))  # newline=None: CRLF and CR are LF here
    return text.removesuffix("\n").split("\n") if text else []


def _read_txt_pair(prompts: Path, videos: Path) -> list[ClipRecord]:
    captions, paths = text_lines(prompts), text_lines(videos)
    while paths and not paths[-1].strip():  # blank lines after the last video
        paths.pop()
    while len(captions) > len(paths) and not captions[-1].strip():  # ... and after the last caption
        captions.pop()
    if len(captions) != len(paths):
        raise MoalignError(
            f"{prompts} has {len(captions)} lines but {videos} has {len(paths)}: they must be line-aligned "
            f"(line i of {prompts.name} is the caption of the video on line i of {videos.name}). Fix the files."
        )
    if not paths:
        raise _empty(videos)
    records = []
    for i, (caption, video) in enumerate(zip(captions, paths, strict=True)):
        if not video.strip():
            raise MoalignError(
                f"{videos}:{i + 1}: empty video path. Fill the line or remove it (and its caption in "
                f"{prompts.name})."
            )
        source = f"{videos}:{i + 1}"
        records.append(
            ClipRecord(i, _resolve(videos.parent, video.strip()), caption.strip(), None, {}, source)
        )
    return records


# layouts 1-2: the metadata files looked for, in order, and their readers
METADATA_FILES = {"metadata.jsonl": _read_jsonl, "metadata.csv": _read_csv, "metadata.json": _read_json}


# ------------------------------------------------------------------------------- rows a dataset reports


def empty_captions(records: list[ClipRecord], missing: tuple[int, ...] | set[int] = ()) -> list[ClipRecord]:
    """The records whose caption is empty or blank (a null caption reads as ""), in manifest order; the
    indices in `missing` (`Manifest.missing_captions`: no caption at all) are left out."""
    skip = set(missing)
    return [r for i, r in enumerate(records) if i not in skip and not r.caption.strip()]


def duplicate_rows(records: list[ClipRecord]) -> list[tuple[ClipRecord, ClipRecord]]:
    """(row, the first row it repeats) for each record with the same video and caption as an earlier one,
    in manifest order: the same training example listed again (it weighs double)."""
    first: dict[tuple[Path, str], ClipRecord] = {}
    out = []
    for r in records:
        key = (r.video, r.caption)
        if key in first:
            out.append((r, first[key]))
        else:
            first[key] = r
    return out


def where(record: ClipRecord) -> str:
    """Where a record came from, for messages: its source (file:line), else its row number."""
    return record.source or f"row {record.index}"
