"""Run `moalign` and SIGKILL it at a chosen point, as a cluster's OOM killer or a pre-empted job would.

    python tests/killer.py MODULE.ATTR N -- moalign-arguments...

The N-th call of MODULE.ATTR (a function looked up through its module at call time) kills the process
before it runs: no exception handler, no `finally`, no atexit. For a cache writer it first leaves a half-written
temporary file beside the shard it was about to write, which is what a kill in the middle of a write leaves.
"""

import importlib
import os
import signal
import sys
from pathlib import Path


def main() -> None:
    target, count, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: killer.py MODULE.ATTR N -- ARGS"
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(count):
            path = next((a for a in args if isinstance(a, str | Path)), None)
            if path is not None:  # a write was under way: leave its temporary half written
                Path(path).with_name(f".{Path(path).name}.killed.tmp").write_bytes(b"\x00" * 100)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, attr, dying)
    from moalign.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
