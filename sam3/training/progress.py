"""Live progress of the optimiser steps, shown by rank 0 only.

On a terminal (stderr is a TTY): a tqdm bar whose postfix holds the step's loss and the images/s. Elsewhere (DVC,
a Prefect task, CI, a SLURM log, where a bar's carriage-return redraws are noise or arrive only at the end): a plain
log line every train.log_every steps and at the last step, e.g.

    train step 120/400 (30%): loss 1.234, lr 8.00e-05, 12.3 images/s, ETA 0:05:12

with lr the largest group's rate (the DETR parts' under the recipe) and

    ETA = (T - s) * elapsed / n

T the run's steps, s the step just done, n the steps this process has run in `elapsed` seconds since it started
training (steps replayed after a rollback count: they took time too). Start-up and the first step (data workers,
compilation) make the first estimates high; they settle as n grows.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)


def eta_seconds(total: int, step: int, elapsed: float, steps_run: int) -> float | None:
    """Seconds left: the steps left times the mean seconds per step so far; None before the first step."""
    if steps_run <= 0:
        return None
    return max(0, total - step) * elapsed / steps_run


def format_duration(seconds: float | None) -> str:
    """H:MM:SS (hours unbounded), or '?' when unknown."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(step: int, total: int, loss: float, lr: float, images_per_s: float, eta: float | None) -> str:
    """The plain progress line of a run whose output is not a terminal (module docstring)."""
    percent = 100 * step // total if total else 100
    return (
        f"train step {step}/{total} ({percent}%): loss {loss:.4g}, lr {lr:.2e}, {images_per_s:.1f} images/s, "
        f"ETA {format_duration(eta)}"
    )


class Progress:
    """The bar on a terminal, the plain lines elsewhere (module docstring); `step` after each optimiser step."""

    def __init__(self, total: int, done: int, every: int, is_main: bool, stream: TextIO | None = None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.every, self.enabled = total, every, is_main
        self.interactive = is_main and stream.isatty()
        self.bar = tqdm(total=total, initial=done, desc="train", unit="step", file=stream, disable=not self.interactive)
        self.started, self.steps_run = time.perf_counter(), 0

    def step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Step `step` is done with this loss (averaged over ranks), at this lr and images/s."""
        self.steps_run += 1
        if self.interactive:
            self.bar.set_postfix_str(f"loss {loss:.4g}, {images_per_s:.1f} images/s", refresh=False)
            self.bar.update(1)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            eta = eta_seconds(self.total, step, time.perf_counter() - self.started, self.steps_run)
            logger.info("%s", progress_line(step, self.total, loss, lr, images_per_s, eta))

    def back_to(self, step: int) -> None:
        """After a rollback: the bar goes back with the run."""
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
