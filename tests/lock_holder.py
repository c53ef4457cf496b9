"""A real second process holding a folder's run lock (`sam3.run_lock`), for the lock tests of the library and the
CLI: it takes the lock, prints "ready", and sleeps until the test kills it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from sam3.run_lock import run_lock
with run_lock(sys.argv[1], "training run"):
    print("ready", flush=True)
    time.sleep(600)
"""


def start_holder(folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A `python -c` process holding `folder`'s lock, returned once it said so."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)},
    )
    line = proc.stdout.readline()  # "ready", or "" once the process ended without taking the lock
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the lock holder did not start: {line!r} {proc.communicate()[1]}")
    return proc


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """`folder` locked by another live process for the body; that process is SIGKILLed afterwards."""
    proc = start_holder(folder)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()
