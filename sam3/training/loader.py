"""How many data-loader processes a training process starts (train.num_workers).

A number is taken as given. `auto` works it out from the machine:

    CPU device   0          the step's kernels already use every core; a worker would take cores from it
    CUDA device  min(AUTO_WORKERS_CAP, cores // processes on this node - 1)   (at least 0)

The cores are those this process may run on (`os.sched_getaffinity`: a container's or a Slurm job's share, not the
host's), split between the node's training processes (LOCAL_WORLD_SIZE, set by torchrun; else 1), one left to the
training process itself. The cap: past about 8 workers a 1008 px JPEG loader keeps an H100 fed and more only cost
memory (each worker holds a copy of the dataset's index).
"""

from __future__ import annotations

import os

import torch

AUTO_WORKERS_CAP = 8


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """The loader workers of one training process for train.num_workers = `setting` (module docstring)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(0, min(AUTO_WORKERS_CAP, usable_cores() // processes_on_node() - 1))


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes_on_node() -> int:
    """The training processes sharing this machine (torchrun's LOCAL_WORLD_SIZE), at least 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
