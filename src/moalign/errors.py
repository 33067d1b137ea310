"""The one exception type for bad user input: the message names the file and says how to fix it.

The rule, everywhere in the package:

- `MoalignError` is raised only where user input enters: files (videos, flow files, weights), manifests,
  run folders, caches, launch settings (command-line options such as ``--method`` or ``--dtype``) and
  checkpoints. The CLI prints it without a traceback and exits with status 2.
- Library code raises the built-in types: ValueError for a bad value (including the ``__post_init__``
  checks of the config dataclasses), TypeError for a bad type, KeyError for a missing key. The CLI turns a
  ValueError or TypeError from building a config or applying ``--set`` overrides into the same exit 2;
  anywhere else it is a bug in the calling code and keeps its traceback.
- An entry point that hands user input to library code (e.g. `VideoEncoder.from_pretrained`) converts the
  library's ValueError into a MoalignError with the same message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class MoalignError(Exception):
    """A user-facing error: bad input, a missing file, a wrong checkpoint. The CLI prints it without a traceback."""


@contextlib.contextmanager
def loading(what: str, source: object) -> Iterator[None]:
    """Turn a failed `from_pretrained` of `what` ("the CogVideoXPipeline") from `source` (a folder or hub id) into
    one MoalignError line saying what failed and how to fix it: a missing file, a hub id that is not cached while
    offline, an invalid id, or a folder of another model family (huggingface_hub and diffusers raise OSError,
    ValueError or EnvironmentError for all of these). Their warnings while trying ("Couldn't connect to the Hub",
    deprecations) are held back: the one line says it all."""
    import logging
    import os
    import warnings

    hf_loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "huggingface_hub")]
    levels = [lg.level for lg in hf_loggers]
    try:
        for lg in hf_loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except MoalignError:
        raise
    except (OSError, ValueError) as err:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        first = text.split(". ")[0].rstrip(".")
        if len(first) > 240:
            first = first[:240].rsplit(" ", 1)[0] + " ..."
        source = str(source)
        if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
            fix = (
                "pass the folder of a downloaded diffusers pipeline (with model_index.json) or its transformer/ "
                "folder"
            )
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            fix = (
                f"there is no folder {source} here ({Path.cwd()}), so it was taken as a hub id: check the path, or "
                + (
                    "download the model first (`hf download ID --local-dir DIR`, then pass DIR): offline "
                    "(HF_HUB_OFFLINE=1) only models already in the Hub cache load"
                    if offline
                    else "check the hub id and your network (`hf download ID --local-dir DIR` to fetch it once)"
                )
            )
        raise MoalignError(f"cannot load {what} from {source}: {first}. Fix: {fix}") from err
    finally:
        for lg, level in zip(hf_loggers, levels, strict=True):
            lg.setLevel(level)


class Interrupted(Exception):
    """A run stopped by a signal (SIGTERM from a scheduler's preemption, SIGINT from Ctrl-C): the message says what
    was kept and how to continue. The CLI prints it without a traceback and exits with 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT), as a process killed by that signal would report to its shell."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def one_line(err: BaseException) -> str:
    """A library's error as one plain line for a MoalignError: ``TypeName: the line that says what failed``.

    torch's refusal of an unsafe pickle (``torch.load(weights_only=True)``) runs to six lines with terminal bold
    codes; its ``WeightsUnpickler error:`` line says what was refused, so that line is kept. Otherwise the first
    non-empty line. Terminal escape codes are removed.
    """
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    picked = next(
        (line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else ""
    )
    return f"{type(err).__name__}: {picked}" if picked else type(err).__name__
