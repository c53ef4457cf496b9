"""Running a stage command from a flow: each output line logged, a clear error with the command's last lines when it
fails, and whether the failure was the user's input (a `Sam3Error` line: retrying cannot help)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages import PIPELINE

if TYPE_CHECKING:
    from logging import Logger, LoggerAdapter

    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State
    from prefect.tasks import Task

CLI_ERROR_PREFIX = "error: "  # how `pipeline.cli` prints a Sam3Error: the user's input is wrong, retrying cannot help
OUTPUT_TAIL_LINES = 20  # lines of a failed command's output kept in the error
PROGRESS_INTERVAL_S = "30"  # seconds between refreshes of a stage's tqdm bars (TQDM_MININTERVAL): each is a log line


class StageFailed(RuntimeError):
    """A stage command exited with a non-zero status; the message ends with its last lines of output."""

    def __init__(self, command: list[str], returncode: int, tail: list[str]) -> None:
        self.command, self.returncode, self.tail = command, returncode, tail
        output = "\n".join(f"    {line}" for line in tail)
        super().__init__(f"`{shlex.join(command)}` exited with {returncode}; last output:\n{output}")

    @property
    def user_error(self) -> bool:
        """True when the stage reported a Sam3Error (bad data, files or parameters): the same input fails again."""
        return any(line.startswith(CLI_ERROR_PREFIX) for line in self.tail)


def stage_environment() -> dict[str, str]:
    """This process's environment with the interpreter's folder (the venv's bin) first on PATH, so `dvc` stage
    commands (`python -m pipeline ...`) run the same Python; unbuffered output and slow progress bars for the log."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", PROGRESS_INTERVAL_S)
    return env


def run_command(command: list[str], cwd: Path, logger: Logger | LoggerAdapter) -> None:
    """Run `command` in `cwd`, each output line (stdout and stderr) logged; StageFailed on a non-zero exit."""
    logger.info("$ %s", shlex.join(command))
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # a stray non-UTF-8 byte must not fail the stage
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:  # text mode splits on "\r" too: each progress-bar refresh is one line
            line = raw.rstrip()
            if line:
                logger.info("%s", line)
                tail.append(line)
    if process.returncode != 0:
        raise StageFailed(command, process.returncode, list(tail))


def retry_unless_user_error(task_: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry I/O failures, not a stage that said the user's input is wrong."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailed) and error.user_error)


def with_interpreter(command: list[str]) -> list[str]:
    """A `pipeline.stages` command (`python -m pipeline ...`) run by this interpreter."""
    assert tuple(command[: len(PIPELINE)]) == PIPELINE
    return [sys.executable, *command[1:]]


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]
