"""The commands' log format, in a module of its own so that a stage (or a SLURM job) can use it without importing
the CLI dispatcher (`pipeline.cli`), which is not part of any stage's code dependencies."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool = False) -> None:
    """The commands' log format on stderr, INFO (DEBUG with -v) and up; also what a SLURM job logs with."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
