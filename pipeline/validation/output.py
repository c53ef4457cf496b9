"""Write the clean dataset and the quarantine.

    CLEAN_DIR/<split>/_annotations.coco.json              the input's top-level object (info, licenses, ... kept) with
                                                          the valid images, annotations and categories (written as
                                                          save_coco writes, record by record: packed.write_packed)
    CLEAN_DIR/train/fewshot_train_shot<k>_seed<s>.json    the same for each few-shot file of the train split
    CLEAN_DIR/<split>/<file_name>                         valid images, hard-linked (copied across filesystems)
    CLEAN_DIR/_quarantine/<split>/_annotations.coco.json  the quarantined records, each with `_problems` (a few-shot
                                                          file's under its own name)
    CLEAN_DIR/_quarantine/<split>/<file_name>             the quarantined images' files that exist inside the dataset

Image files are found through `paths.locate`, as validation found them: a symbolic link inside the dataset is
replaced by its target's file (the copies hold no links, which would dangle once the folder moves), and nothing
outside the dataset folder is ever placed, in the clean copy or the quarantine: a record whose link leads out
(`link_outside_dataset`) is quarantined as a record with its reason, never with the bytes of its target.

`_quarantine/` is always created (empty when nothing was quarantined): it marks the folder as validate output,
the only kind of non-empty folder a later run will replace.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.validation.packed import write_packed
from pipeline.validation.paths import locate
from pipeline.validation.problems import Table
from pipeline.validation.quarantine import SplitOutcome
from sam3.errors import ConfigError

QUARANTINE_DIR = "_quarantine"

log = logging.getLogger(__name__)


def prepare_out_dir(out_dir: Path, dataset_dir: Path) -> None:
    """Make `out_dir` an empty folder holding `_quarantine/`, replacing an earlier validate output.

    Raises ConfigError when `out_dir` is, contains or lies inside the dataset, or is a non-empty folder that is
    not validate output (we never delete what we did not write).
    """
    out, source = out_dir.resolve(), dataset_dir.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise ConfigError(f"--out {out_dir} overlaps the dataset {dataset_dir}; write the clean copy somewhere else")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir} exists and is not a folder; choose another path")
        if any(out_dir.iterdir()) and not (out_dir / QUARANTINE_DIR).is_dir():
            raise ConfigError(
                f"--out {out_dir} is not empty and is not an earlier validate output (it has no {QUARANTINE_DIR}/); "
                "choose another path or empty it"
            )
        shutil.rmtree(out_dir)
    (out_dir / QUARANTINE_DIR).mkdir(parents=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the real file `source` (no symbolic link: `paths.locate` resolved it) to `target` (no extra disk
    space), or copy its bytes where a hard link is not possible; `target` is a real file either way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return  # two records share one file
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def _copy_images(images: Sequence[Any], dataset_dir: Path, folder: str, target_dir: Path) -> int:
    """Place the files of `images` (those whose file_name `paths.locate` finds as a file inside the dataset) under
    `target_dir`, each under its record's file_name; returns how many."""
    placed = 0
    for image in images:
        record = image.get("_record", image) if isinstance(image, dict) else image
        file_name = record.get("file_name") if isinstance(record, dict) else None
        if not isinstance(file_name, str):
            continue
        source = locate(dataset_dir, folder, file_name).path  # None: unsafe name or a link leading out / nowhere
        if source is not None and source.is_file() and not source.is_symlink():
            link_or_copy(source, target_dir / file_name)
            placed += 1
    return placed


def _with_records(data: dict[str, Any], records: dict[Table, Sequence[Any]]) -> dict[str, Any]:
    return {**data, **{str(table): records[table] for table in Table}}


def write_outcome(outcome: SplitOutcome, dataset_dir: Path, out_dir: Path) -> None:
    """Write one annotation file's clean copy and images, and its quarantine when it has one, under the same
    split folder and file name (a few-shot file of train/ goes to CLEAN_DIR/train/ and _quarantine/train/)."""
    folder, name = outcome.records.folder, outcome.records.name
    write_packed(out_dir / folder / name, _with_records(outcome.records.data, outcome.valid))
    _copy_images(outcome.valid[Table.IMAGES], dataset_dir, folder, out_dir / folder)
    if not any(outcome.quarantined.values()):
        return
    quarantine_dir = out_dir / QUARANTINE_DIR / folder
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    data = _with_records(outcome.records.data, outcome.quarantined)
    # allow_nan: quarantined records may hold the NaN/Infinity they were rejected for; they are written back as
    # found (Python's json, and so load_coco, reads them)
    write_packed(quarantine_dir / name, data, allow_nan=True)
    placed = _copy_images(outcome.quarantined[Table.IMAGES], dataset_dir, folder, quarantine_dir)
    log.debug("%s: %d quarantined image files placed in %s", outcome.split, placed, quarantine_dir)
