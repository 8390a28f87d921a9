"""`python tests/pause_harness.py ARGS...` is `ddpmkit ARGS...`, made to stop for ever at a chosen point, so that a
test can SIGKILL the real process exactly there (inside a checkpoint write, inside the final save).

PAUSE_AT="MODULE.FUNCTION:TEXT" wraps that function: the first call whose arguments mention TEXT creates the file
PAUSED (its content: the process id) and sleeps instead of running. Nothing of this is in ddpmkit itself.
"""
import importlib
import os
import sys
import time
from pathlib import Path


def pause_at(spec: str, marker: str) -> None:
    target, _, needle = spec.partition(":")
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def paused(*args, **kwargs):
        if needle in " ".join(map(str, [*args, *kwargs.values()])):
            Path(marker).write_text(str(os.getpid()))
            while True:
                time.sleep(60)
        return original(*args, **kwargs)

    setattr(module, name, paused)


if __name__ == "__main__":
    if os.environ.get("PAUSE_AT"):
        pause_at(os.environ["PAUSE_AT"], os.environ["PAUSED"])
    from ddpmkit.cli import main

    raise SystemExit(main(sys.argv[1:]))
