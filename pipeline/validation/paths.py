"""Where an image record's file really is: a real file inside the dataset folder, or a named reason why not.

Validation reads image files, and the output places them in the clean copy and the quarantine, only through
`locate`, so that nothing outside the dataset folder is ever opened, read or copied:

- unsafe_file_name: the file_name itself leaves its split folder (absolute, a `..` part) or cannot be a path (NUL);
- link_outside_dataset: a symbolic link on the way (the file, a sub-folder, the split folder) leads outside the
  dataset folder. Its target is not opened, read or copied: it may be any file of the machine (a key, a password
  file), and the quarantine is tracked by DVC, which can push it;
- broken_link: a link that leads inside the dataset to nothing (a missing target, or links that loop).
A link that leads to a file inside the dataset is fine: `locate` returns the real file, which the clean copy holds
under the record's file_name (a real file, so the copy has no links that could dangle once moved).

The dataset folder itself may be a link (data/raw/x -> /mnt/disk/x): "inside" is measured from its real path.
A hard link cannot be told from a file (it is one); only symbolic links are followed and checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.validation.problems import Check


def unsafe_reason(file_name: str) -> str | None:
    """Why `file_name` would point outside its split folder (absolute path or a `..` part) or is no path, or None."""
    if "\0" in file_name:
        return "holds a NUL character, which no path can"
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file_name).drive:
        return "is an absolute path"
    if ".." in posix.parts:
        return "has a '..' part"
    return None


@dataclass(frozen=True)
class Located:
    """The outcome of `locate`: `path` (the real file to read, links resolved; it may not exist, which the file
    checks report) or `check` and `reason` (then `path` is None and nothing may be read)."""

    path: Path | None
    check: Check | None = None
    reason: str | None = None


def _shown(real: str, root: str) -> str:
    """`real` relative to the dataset folder when inside it (as problems name files), else as is."""
    return Path(real).relative_to(root).as_posix() if _inside(real, root) else real


def _inside(real: str, root: str) -> bool:
    return real == root or Path(real).is_relative_to(root)


def _looping_link_on_the_way(lexical: str, root: str) -> bool:
    """Whether a link that `realpath` could not follow (it loops) lies between `root` and `lexical`: realpath then
    returns the path unchanged, as for a path without links."""
    if os.path.exists(lexical):
        return False
    path, top = Path(lexical), Path(root)
    return any(os.path.islink(part) for part in [path, *path.parents] if part != top and part.is_relative_to(top))


def locate(dataset_dir: Path, folder: str, file_name: str) -> Located:
    """The file of an image record named `file_name` in the split folder `folder` of `dataset_dir`.

    Reads no file: it only follows the links on the way (`os.path.realpath`) and looks at where they lead.
    """
    unsafe = unsafe_reason(file_name)
    if unsafe is not None:
        return Located(None, Check.UNSAFE_FILE_NAME, f"file_name {file_name!r} {unsafe}")
    root = os.path.realpath(dataset_dir)
    # normpath: "a//b" and "./a" name the same file as "a/b" and "a"; with no ".." part it cannot climb out
    lexical = os.path.normpath(os.path.join(root, folder, file_name))
    real = os.path.realpath(lexical)  # follows every link on the way; a loop or a missing target is left unresolved
    if real == lexical and not _looping_link_on_the_way(lexical, root):
        return Located(Path(real))  # no link on the way
    if not _inside(real, root):
        return Located(
            None,
            Check.LINK_OUTSIDE_DATASET,
            f"is a link to {real}, outside the dataset folder; not read. Copy the image into the dataset (links "
            "inside it are fine)",
        )
    if not os.path.exists(real):
        return Located(
            None,
            Check.BROKEN_LINK,
            f"is a link to {_shown(real, root)}, which does not exist (or the links loop); point it at the image "
            "or replace it with the image",
        )
    return Located(Path(real))
