"""Command-line plumbing: flags bound to config fields, shared option groups, the help formatter.

A flag declared with `bind` is a shorthand for `--set PATH=VALUE` on the command's part of the recipe; the
CLI (`moalign/cli.py`) applies the bound flags first, then `--set`, so `--set` wins.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from moalign.backbones.spec import DTYPES
from moalign.errors import MoalignError

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


def add_command(sub, name: str, fn, help: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, which `fn(args)` runs; its --help shows the defaults."""
    p = sub.add_parser(name, help=help, formatter_class=HelpFormatter, **kwargs)
    p.set_defaults(fn=fn)
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
    """`PATH=VALUE`, in `--set`'s form, for every bound flag given on the command line (see `bind`)."""
    bound = getattr(args, "bound", {})
    return [
        f"{path}={getattr(args, dest)}" for dest, path in bound.items() if getattr(args, dest) is not None
    ]


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clip sampling (overrides the preset's data config)")
    bind(g, "--num-frames", "data.num_frames", type=int, help="frames per clip window, 4k+1 (e.g. 17, 49)")
    bind(g, "--height", "data.height", type=int, help="height after resize + centre crop (divisible by 16)")
    bind(g, "--width", "data.width", type=int, help="width after resize + centre crop (divisible by 16)")
    bind(
        g, "--fps", "data.fps", type=float,
        help="sample the window at this frame rate (default: the preset's; none: the video's native rate)",
    )  # fmt: skip
    bind(
        g, "--skip-bad-videos", "data.skip_bad_videos", action="store_true",
        help="skip unreadable or too-short videos (counted in the log) instead of stopping with an error",
    )  # fmt: skip


def overridden(cfg, overrides: list[str]):
    """`cfg` with `--set KEY=VALUE` overrides applied; a bad key or value is a user error."""
    from moalign.run.serialize import apply_overrides

    try:
        return apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as err:
        raise MoalignError(f"bad configuration: {err}") from err


def add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard file")
    p.add_argument("--overwrite", action="store_true", help="delete the cache(s) first and rebuild")
    p.add_argument(
        "--device", help="device (default: this process's accelerate device, cuda:N on a GPU machine)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_latents_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="weights' dtype (caches: also the stored tensors)",
    )
    p.add_argument("--vae-tiling", action="store_true", help="VAE in spatial tiles (less memory at 480p+)")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
