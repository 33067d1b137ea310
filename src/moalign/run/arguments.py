"""Command-line plumbing: flags bound to config fields, shared option groups, the help formatter.

A flag declared with `bind` is a shorthand for `--set PATH=VALUE` on the command's part of the recipe; the
CLI (`moalign/cli.py`) applies the bound flags first, then `--set`, so `--set` wins.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from moalign.errors import MoalignError
from moalign.run.choices import DTYPES, MIXED_PRECISION, REPORT_TO

RESUMABLE = "cache folder (resumable: re-run the same command after a stop)"


def command_line() -> str:
    return "moalign " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default and the help does not name one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        return text if "default" in text else f"{text} (default: %(default)s)".strip()


def add_version(p: argparse.ArgumentParser) -> None:
    """`--version`: prints "moalign X.Y.Z" and exits (on the top-level parser and every subcommand's)."""
    from moalign import __version__

    p.add_argument("--version", action="version", version=f"moalign {__version__}")


def add_command(sub, name: str, fn, help: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, which `fn(args)` runs; its --help shows the defaults."""
    p = sub.add_parser(name, help=help, formatter_class=HelpFormatter, **kwargs)
    p.set_defaults(fn=fn)
    add_version(p)
    # also after the subcommand (`moalign evaluate ... --debug`); SUPPRESS keeps the top-level flag's value
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show full tracebacks for input errors too",
    )
    return p


def bind(p, flag: str, path: str, **kwargs) -> None:
    """Add `flag` to a parser or argument group as a shorthand for `--set PATH=VALUE`.

    `path` is a field of the command's part of the recipe (e.g. "align.lam" of stage2). Not given, the
    preset's value stands; given, `flag_overrides` turns it into the override `PATH=VALUE`.
    """
    text = kwargs.pop("help", "")
    if "default" not in text:
        text = f"{text} (default: the preset's)".strip()
    action = p.add_argument(flag, default=None, help=text, **kwargs)
    p.set_defaults(bound={**(p.get_default("bound") or {}), action.dest: path})  # groups share the defaults


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`PATH=VALUE`, in `--set`'s form, for every bound flag given on the command line (see `bind`); a list (a
    repeatable flag, or a `comma_list` one) as a list literal, so no string in it is split on commas."""
    bound = getattr(args, "bound", {})
    out = []
    for dest, path in bound.items():
        value = getattr(args, dest)
        if value is not None:
            out.append(f"{path}={value!r}" if isinstance(value, list) else f"{path}={value}")
    return out


def comma_list(text: str) -> list[str]:
    """The `type` of a flag taking comma-separated names (`--arms none,moalign`): names never hold commas."""
    return [v.strip() for v in text.split(",") if v.strip()]


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clip sampling (overrides the preset's data config)")
    bind(g, "--num-frames", "data.num_frames", type=int, help="frames per clip window, 4k+1 (e.g. 17, 49)")
    bind(g, "--height", "data.height", type=int, help="height after resize + centre crop (divisible by 16)")
    bind(g, "--width", "data.width", type=int, help="width after resize + centre crop (divisible by 16)")
    bind(
        g, "--fps", "data.fps", type=float,
        help="sample the window at this frame rate (default: the preset's; the video's native rate: --set data.fps=None)",
    )  # fmt: skip
    bind(
        g, "--skip-bad-videos", "data.skip_bad_videos", action="store_true",
        help="skip unreadable or too-short videos (counted in the log) instead of stopping with an error",
    )  # fmt: skip
    add_column_options(g)


def add_column_options(g) -> None:
    """--caption-column and --video-column (the manifest's columns, `moalign/data/manifest.py`)."""
    bind(g, "--caption-column", "data.caption_column",
         help="the manifest's caption column (or the captions .txt file), e.g. prompt (default: the first of "
         "caption, prompt, text, title)")  # fmt: skip
    bind(g, "--video-column", "data.video_column",
         help="the manifest's video column (or the videos .txt file), e.g. file_name (default: the first of video, "
         "video_path, path, file_name, file)")  # fmt: skip


def add_training_options(p: argparse.ArgumentParser, stage: str) -> None:
    """The knobs people tune every day, as flags (each a shorthand for its `--set`)."""
    g = p.add_argument_group(
        f"training (overrides the preset's {stage} config; `moalign config --part {stage}`)"
    )
    bind(g, "--lr", "lr", type=float, help="peak learning rate (warm-up, then cosine to 10%%)")
    bind(g, "--batch-size", "batch_size", type=int, help="global batch per optimizer step (all processes)")
    bind(g, "--mixed-precision", "mixed_precision", choices=list(MIXED_PRECISION), help="autocast dtype")
    bind(g, "--checkpoint-every", "checkpoint_every", type=int, help="steps between checkpoint-N folders")
    bind(g, "--seed", "seed", type=int, help="seed of the batches, noise and initialisation")
    bind(
        g, "--report-to", "report_to", choices=list(REPORT_TO),
        help="trackers beside RUN/log.jsonl (wandb: pip install wandb)",
    )  # fmt: skip
    if stage == "stage2":
        bind(
            g, "--gradient-accumulation-steps", "gradient_accumulation_steps", type=int,
            help="micro-batches per process and step (same result, less memory)",
        )  # fmt: skip
        bind(g, "--gradient-checkpointing", "gradient_checkpointing", action="store_const", const="true",
             help="recompute activations in the backward pass (less memory, ~30%% slower)")  # fmt: skip
        bind(
            g, "--validation-prompt", "validation_prompts", action="append", metavar="PROMPT",
            help="a validation prompt, commas and all (repeatable; one video each)",
        )  # fmt: skip
        bind(
            g,
            "--validate-every",
            "validate_every",
            type=int,
            help="steps between validation videos (0: never)",
        )


def overridden(cfg, overrides: list[str]):
    """`cfg` with `--set KEY=VALUE` overrides applied; a bad key or value is a user error."""
    from moalign.run.serialize import apply_overrides

    try:
        return apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as err:
        raise MoalignError(f"bad configuration: {err}") from err


def read_config_file(path: str, cfg, part: str) -> tuple[object, set[str]]:
    """`cfg` (the preset's part `part`, or the whole recipe for part "recipe") with the fields a `--config` file
    sets, and the names of those fields.

    The file is YAML (.yaml/.yml) or JSON and holds the keys `moalign config [--part PART]` prints, all or some
    (the rest keep the preset's values); a run's config.json (its "config" entry) and a whole-recipe file (its
    PART entry) are taken too, so a run can be repeated or extended from its folder.

    Raises:
        MoalignError: the file is missing, unreadable, not a mapping, or has unknown keys (the closest valid
            names are given).
    """
    import json
    from pathlib import Path

    from moalign.run.serialize import from_dict, to_dict

    file = Path(path)
    if not file.is_file():
        raise MoalignError(
            f"--config {path}: no such file. Pass a YAML or JSON file (e.g. a run's config.json)"
        )
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml / json / decoding errors: all a bad file
        raise MoalignError(
            f"--config {path}: not readable as {file.suffix or 'JSON'} ({err}). Fix the file."
        ) from err
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "command" in data:
        data = _run_config_part(path, data, part)  # a run folder's config.json
    names = set(to_dict(cfg))
    if isinstance(data, dict) and part in data and part not in names and isinstance(data[part], dict):
        data = data[part]  # a whole recipe (`moalign config` output) given to one stage
    if not isinstance(data, dict):
        raise MoalignError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")

    def merge(base: dict, new: dict) -> dict:
        out = dict(base)
        for k, v in new.items():
            out[k] = merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) else v
        return out

    try:
        return from_dict(type(cfg), merge(to_dict(cfg), data)), set(data)
    except (ValueError, TypeError) as err:
        raise MoalignError(f"--config {path}: {err}") from err


# the recipe part a run's config.json holds, by the command that made the run
RUN_PARTS = {"stage1": "stage1", "stage2": "stage2", "pretrain-encoder": "pretrain", "synth": "synth"}


def _run_config_part(path: str, record: dict, part: str) -> dict:
    """The fields of a run's config.json for `part`: its own stage's (for the whole recipe, under that stage)."""
    words = str(record.get("command", "")).split()
    stage = next((w for w in words[1:] if w in RUN_PARTS), None)
    if stage is None:  # a run of a command we do not know: take it as it stands
        return record["config"]
    own = RUN_PARTS[stage]
    if part == "recipe":
        return {own: record["config"]}
    if part != own:
        raise MoalignError(
            f"--config {path} is a `moalign {stage}` run's config ({own} fields); this command takes {part} fields "
            f"(`moalign config --part {part}` prints them)"
            + ("; `generate --model RUN` already makes the run's clip size" if part == "generate" else "")
        )
    return record["config"]


def add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard file")
    p.add_argument("--overwrite", action="store_true", help="delete the cache(s) first and rebuild")
    p.add_argument(
        "--device", help="device (default: this process's accelerate device, cuda:N on a GPU machine)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_latents_options(p: argparse.ArgumentParser, auto: bool = False) -> None:
    """--dtype and --vae-tiling; `auto`: --dtype also takes "auto" (bfloat16 on CUDA, float32 on CPU), its default."""
    p.add_argument(
        "--dtype",
        default="auto" if auto else "float32",
        choices=(["auto"] if auto else []) + list(DTYPES),
        help="weights' dtype"
        + (": auto is bfloat16 on CUDA, float32 on CPU" if auto else " (caches: also the stored tensors)"),
    )
    p.add_argument("--vae-tiling", action="store_true", help="VAE in spatial tiles (less memory at 480p+)")


def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu" (asked when a command runs, so --help never imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
