"""Test helpers for the Prefect tests: a throw-away copy of this repository with tiny parameters, and shapes datasets.

The copy holds the code and the DVC/Make files but no data, runs, caches or git history, so a flow or `dvc repro`
run in it never touches the real repository's data. It gets a fresh `git init` (DVC needs a git repository; the
real repository's files are not committed yet, so it cannot be cloned).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.shapes_data import build_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 112  # preprocess and model input: 8 x 8 patches of the tiny model
# Left out of the copy: at the top, environments, data and outputs, history, the Prefect state of a running server;
# inside .dvc, its cache and lock files; anywhere, Python and tool caches.
TOP_IGNORED = {".venv", ".git", ".prefect", "data", "runs", "reports", "models", "dvc.lock", "bench", "build"}
DVC_IGNORED = {"cache", "tmp"}
EVERYWHERE_IGNORED = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
# Tiny settings over params.yaml: a few optimiser steps of the tiny model at IMAGE_SIZE, on one process.
TINY = {
    "preprocess": {"size": IMAGE_SIZE, "workers": 1},
    "model": {"source": "tiny", "image_size": IMAGE_SIZE},
    "train": {
        "max_steps": 2,
        "batch_size": 2,
        "checkpoint_every": 100,
        "log_every": 1,
        "amp_dtype": "none",
        "val_every_epochs": 0,
    },  # fmt: skip
    "launcher": {"kind": "local", "nodes": 1, "gpus_per_node": 1},
    # the video stages: 2 steps of the tiny tracker on 3-frame clips, one strip
    "vos": {"train": {"max_steps": 2, "log_every": 1}, "clip": {"num_frames": 3}, "evaluate": {"strips": 1}},
}


def tiny_params(source: Path = REPO / "params.yaml") -> dict:
    """params.yaml with the TINY values set (every other key as it is)."""
    params = yaml.safe_load(source.read_text(encoding="utf-8"))
    _merge(params, TINY)
    return params


def _merge(target: dict, values: dict) -> None:
    """Set `values` in `target`, nested mappings key by key (the other keys of a section stay)."""
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


def write_params(path: Path) -> Path:
    path.write_text(yaml.safe_dump(tiny_params(), sort_keys=False), encoding="utf-8")
    return path


def copy_repo(target: Path) -> Path:
    """A copy of the repository's code and pipeline files at `target` (see the module docstring), tiny params."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        left_out = set(EVERYWHERE_IGNORED(folder, names))
        if Path(folder) == REPO:
            left_out |= TOP_IGNORED & set(names)
        elif Path(folder) == REPO / ".dvc":
            left_out |= DVC_IGNORED & set(names)
        return left_out

    shutil.copytree(REPO, target, ignore=ignore)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    write_params(target / "params.yaml")
    return target


def shapes_datasets(root: Path, names: list[str]) -> list[Path]:
    """One small shapes dataset per name under `root` (4 train, 2 valid, 2 test images of IMAGE_SIZE), seeded by
    its position so that they differ."""
    folders = []
    for seed, name in enumerate(names):
        build_shapes_dataset(root / name, n=4, seed=seed, image_size=IMAGE_SIZE, n_valid=2, n_test=2)
        folders.append(root / name)
    return folders
