"""Run `moalign` as the tests launch it, optionally SIGKILLed at a chosen point (as a cluster's OOM killer or a
pre-empted job would):

    python tests/run_cli.py [--kill MODULE.ATTR N] moalign ARGUMENTS...

With --kill, the N-th call of MODULE.ATTR (a function looked up through its module at call time) kills the process
before it runs: no exception handler, no `finally`, no atexit. For a cache writer it first leaves a half-written
temporary file beside the shard it was about to write, which is what a kill in the middle of a write leaves.

Under a DeepSpeed launch on CPU, DeepSpeed's shared-memory all-reduce is not built: its first use compiles a C++
module (30 s to 2 minutes, once per machine and environment), and the gloo all-reduce it replaces gives the same results.
"""

import importlib
import os
import signal
import sys
from pathlib import Path


def kill_at(target: str, count: int) -> None:
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            path = next((a for a in args if isinstance(a, str | Path)), None)
            if path is not None:  # a write was under way: leave its temporary half written
                Path(path).with_name(f".{Path(path).name}.killed.tmp").write_bytes(b"\x00" * 100)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, attr, dying)


def main() -> None:
    args = sys.argv[1:]
    if "moalign" not in args:  # (a plain "--" would be taken by `accelerate launch`)
        raise SystemExit("usage: run_cli.py [--kill MODULE.ATTR N] moalign ARGUMENTS...")
    sep = args.index("moalign")
    options, argv = args[:sep], args[sep + 1 :]
    if options[:1] == ["--kill"] and len(options) == 3:
        kill_at(options[1], int(options[2]))
    elif options:
        raise SystemExit("usage: run_cli.py [--kill MODULE.ATTR N] moalign ARGUMENTS...")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # the module itself: the attribute `deepspeed.comm.torch` is the torch package, imported in deepspeed.comm
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from moalign.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
