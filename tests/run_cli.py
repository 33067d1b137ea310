"""Run `moalign` as the tests launch it, optionally SIGKILLed at a chosen point (as a cluster's OOM killer or a
pre-empted job would):

    python tests/run_cli.py [--kill MODULE.ATTR N | --signal MODULE.ATTR N SIGNAME] moalign ARGUMENTS...

With --signal, the N-th call of MODULE.ATTR first sends SIGNAME (SIGTERM, SIGINT) to this process, as a scheduler's
preemption or a Ctrl-C would, then runs; with $SIGNAL_RANK set, only the process of that rank ($RANK) does. With
--kill, the N-th call of MODULE.ATTR (a function looked up through its module at call time) kills the process
before it runs: no exception handler, no `finally`, no atexit. For a cache writer it first leaves a half-written
temporary file beside the shard it was about to write, which is what a kill in the middle of a write leaves.

Under a DeepSpeed launch on CPU, DeepSpeed's shared-memory all-reduce is not built: its first use compiles a C++
module (30 s to 2 minutes, once per machine and environment), and the gloo all-reduce it replaces gives the same results.
"""

import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = "usage: run_cli.py [--kill MODULE.ATTR N | --signal MODULE.ATTR N SIGNAME] moalign ARGUMENTS..."


def die_at_call(target: str, count: int, die: Callable[[tuple], None]) -> Callable[[], None]:
    """Make the `count`-th call of TARGET ("MODULE.ATTR", looked up through its module at call time) run
    `die(args)` before it runs; returns what puts the real TARGET back. (tests/conftest.py's
    `interrupted_at_call` uses it in process.)"""
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = 0

    def dying(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == count:
            die(args)
        return real(*args, **kwargs)

    setattr(module, attr, dying)
    return lambda: setattr(module, attr, real)


def sigkill(args: tuple) -> None:
    """SIGKILL this process; when a path is among the call's arguments (a write was under way), first leave its
    temporary half written."""
    path = next((a for a in args if isinstance(a, str | Path)), None)
    if path is not None:
        Path(path).with_name(f".{Path(path).name}.killed.tmp").write_bytes(b"\x00" * 100)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def send_signal(name: str) -> Callable[[tuple], None]:
    """What `die_at_call` runs for --signal: this process sends itself the signal (Python runs its handler at
    once, before the call goes on)."""

    def send(args: tuple) -> None:
        if os.environ.get("SIGNAL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
            os.kill(os.getpid(), getattr(signal, name))

    return send


def main() -> None:
    args = sys.argv[1:]
    if "moalign" not in args:  # (a plain "--" would be taken by `accelerate launch`)
        raise SystemExit(USAGE)
    sep = args.index("moalign")
    options, argv = args[:sep], args[sep + 1 :]
    if options[:1] == ["--kill"] and len(options) == 3:
        die_at_call(options[1], int(options[2]), sigkill)
    elif options[:1] == ["--signal"] and len(options) == 4:
        die_at_call(options[1], int(options[2]), send_signal(options[3]))
    elif options:
        raise SystemExit(USAGE)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # the module itself: the attribute `deepspeed.comm.torch` is the torch package, imported in deepspeed.comm
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from moalign.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
