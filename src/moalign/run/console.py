"""The one output channel: messages through the `moalign` logger, progress bars through `progress`.

Every module logs with ``logging.getLogger(__name__)`` (a child of ``moalign``). On first use the ``moalign``
logger gets one handler that writes plain lines to stdout through ``tqdm.write`` (so messages never break a
progress bar), at INFO on the main process and WARNING on the others (``RANK`` > 0 under torchrun or
``accelerate launch``): a launch of N processes prints each message once. Library users change it the usual
way (``logging.getLogger("moalign").setLevel(...)``, or their own handlers).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_ROOT = "moalign"


def is_main_process() -> bool:
    """True on the launch's rank-0 process (and in a plain single-process run)."""
    return int(os.environ.get("RANK", "0")) == 0


class _TqdmHandler(logging.Handler):
    """Writes each record as one line to the current stdout, above any active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # logging must never take a run down
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (``moalign.*``), with the package's handler installed once."""
    root = logging.getLogger(_ROOT)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
    return logging.getLogger(name)


def progress(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (same keywords), shown only when `enabled` and on the main process."""
    return tqdm(iterable, disable=not (enabled and is_main_process()), **kwargs)


def quiet_libraries() -> None:
    """`--quiet`: the Hugging Face libraries' progress bars ("Loading weights", "Loading pipeline components")
    and their warnings off too; their errors still show."""
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()
