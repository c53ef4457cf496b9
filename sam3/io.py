"""Atomic file writers: a reader (DVC hashing an output, a stage reading the last one's file, a user's editor) sees
the old file or the new one, never half of one.

    write_text(path, text)   text -> <path>.tmp in the same folder -> os.replace(<path>.tmp, path)
    write_chunks(path, chunks)   the same for text written piece by piece (never whole in memory)
    write_json(path, data)   json.dumps(data, sort_keys=True, indent=2) + "\\n" through write_text
    replace_folder(new, target)   a folder written beside `target` takes its place (old one renamed, then deleted)

The temporary file sits in the target's folder because `os.replace` is atomic only within one file system. Parent
folders are created. JSON is deterministic (sorted keys, fixed indent, newline at the end), so two runs on the same
inputs write byte-identical files and DVC hashes stay stable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JSON_INDENT = 2  # metrics, predictions, reports; COCO annotation files use 1 (sam3.coco.save_coco)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating parent folders."""
    write_chunks(path, (text,))


def write_chunks(path: str | Path, chunks: Iterable[str]) -> None:
    """Write the pieces of text `chunks` (UTF-8) one after the other to `path` atomically, creating parent folders:
    a file too large to hold as one string is never in memory whole. An error while writing (one raised by the
    iterator included) removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            for chunk in chunks:
                file.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any, indent: int = JSON_INDENT, allow_nan: bool = False) -> None:
    """Write `data` as JSON atomically and deterministically (sorted keys, `indent`, newline at the end).

    NaN / Infinity are refused (ValueError, before anything is written) unless `allow_nan`: they are not JSON, and
    most readers other than Python's reject them.
    """
    write_text(path, json.dumps(data, sort_keys=True, indent=indent, allow_nan=allow_nan) + "\n")


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` (a sibling of `target`) in place of `target`.

    A folder cannot be renamed over a non-empty one, so an existing `target` is first renamed to `<target>.old`,
    `new` renamed to `target`, and the old one deleted: a reader sees the old folder or the new one, whole, and a crash
    between the two renames leaves `<target>.old` (the previous folder, intact) and `new`, never a half-written
    `target`.
    """
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)
