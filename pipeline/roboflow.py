"""`python -m pipeline fetch roboflow`: a Roboflow project version, or an export already downloaded, as a dataset.

    python -m pipeline fetch roboflow --workspace W --project P --version V [--out data/raw/P]
    python -m pipeline fetch roboflow --from-zip export.zip [--out data/raw/<zip name>]

The download goes through the `roboflow` package (`pip install roboflow`; the key in ROBOFLOW_API_KEY) in COCO
format. Offline, without the package or without a key, the command says which and exits 2; `--from-zip` needs none
of them. A zip is unpacked member by member: absolute paths, `..` and links are refused before anything is written
(a zip may otherwise write outside the folder), one wrapping top folder is removed, and the result must be the
Roboflow COCO layout ({train,valid,test}/_annotations.coco.json with the images beside). It is unpacked next to
`--out` and renamed into place, so `--out` is complete or absent. An existing non-empty `--out` is refused.

Roboflow's exports list a placeholder category named after the project; the validate stage sets it aside
(`pipeline.validation.placeholder`), so nothing is removed here: the folder is the export as Roboflow made it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from sam3.coco import ANNOTATIONS_FILE, SPLITS, present_splits, split_annotation_path
from sam3.errors import ConfigError, DataError

PACKAGE = "roboflow"
API_KEY_VARIABLE = "ROBOFLOW_API_KEY"
EXPORT_FORMAT = "coco"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose another path or remove it")


def _layout_problem(folder: Path) -> str | None:
    """Why `folder` is not a Roboflow COCO export (None when it is): it needs at least the train split's file."""
    if not split_annotation_path(folder, "train").is_file():
        found = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        return (
            f"no train/{ANNOTATIONS_FILE} (found: {', '.join(found) or 'nothing'}); export the version in 'COCO' format"
        )
    return None


def _finish(staging: Path, out: Path, source: str) -> Path:
    problem = _layout_problem(staging)
    if problem is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{source}: not a Roboflow COCO export: {problem}")
    if out.exists():
        out.rmdir()  # empty (checked before)
    os.replace(staging, out)
    print(f"{source} -> {out} (splits: {', '.join(present_splits(out))})")
    print(
        f"next: dvc add {out}; in params.yaml set dataset.name: {out.name} and dataset.raw: {out}; then dvc repro "
        "(validate sets Roboflow's placeholder category aside)"
    )
    return out


def _member_path(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    """The member's path inside the archive; DataError for one that would land outside the folder or is a link."""
    name = PurePosixPath(info.filename)
    if name.is_absolute() or ".." in name.parts or "\\" in info.filename or ":" in info.filename:
        raise DataError(f"{archive}: member {info.filename!r} would be written outside the folder; nothing unpacked")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{archive}: member {info.filename!r} is a symbolic link; nothing unpacked")
    return name


def _strip_wrapper(names: list[PurePosixPath]) -> int:
    """1 when every member sits in one top folder that is not a split (a zip of the export's folder), else 0."""
    tops = {name.parts[0] for name in names if name.parts}
    nested = all(len(name.parts) > 1 for name in names)
    return 1 if len(tops) == 1 and nested and next(iter(tops)) not in SPLITS else 0


def from_zip(archive: Path, out: Path | None = None) -> Path:
    """Unpack a Roboflow COCO export zip into `out` (default data/raw/<zip name>); returns `out`."""
    archive = Path(archive)
    if not archive.is_file():
        raise ConfigError(f"--from-zip {archive}: file not found")
    out = Path(out) if out is not None else Path("data/raw") / archive.stem
    _check_out(out)
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive}: not a zip file ({err})") from None
    with bundle:
        members = [(info, _member_path(info, archive)) for info in bundle.infolist()]  # every check before writing
        skip = _strip_wrapper([name for _, name in members])
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_name(f".{out.name}.unpacking")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for info, name in members:
                relative = PurePosixPath(*name.parts[skip:])
                if info.is_dir() or not relative.parts:
                    continue
                target = staging.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        except (zipfile.BadZipFile, OSError) as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"{archive}: cannot be unpacked ({type(err).__name__}: {err})") from None
    return _finish(staging, out, str(archive))


def download(workspace: str, project: str, version: int, out: Path | None = None) -> Path:
    """Download the COCO export of workspace/project/version with the `roboflow` package into `out` (default
    data/raw/<project>); ConfigError without the package or the key, DataError when Roboflow or the network fails."""
    out = Path(out) if out is not None else Path("data/raw") / project
    _check_out(out)
    what = f"{workspace}/{project}/{version}"
    if importlib.util.find_spec(PACKAGE) is None:
        raise ConfigError(
            f"cannot download {what}: the {PACKAGE!r} package is not installed (pip install {PACKAGE}); or download "
            "the export as a zip from app.roboflow.com and use --from-zip FILE"
        )
    api_key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not api_key:
        raise ConfigError(
            f"cannot download {what}: {API_KEY_VARIABLE} is not set (export {API_KEY_VARIABLE}=<your Roboflow API "
            "key>, from the workspace's settings); or use --from-zip FILE"
        )
    from roboflow import Roboflow  # imports requests, OpenCV...: only here

    staging = out.with_name(f".{out.name}.downloading")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        client = Roboflow(api_key=api_key)
        client.workspace(workspace).project(project).version(version).download(
            EXPORT_FORMAT, location=str(staging), overwrite=True
        )
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # requests' errors are OSErrors; Roboflow's API
        shutil.rmtree(staging, ignore_errors=True)  # errors are RuntimeErrors with the server's message
        raise DataError(
            f"download of {what} failed ({type(err).__name__}: {err}); check the network, the names and "
            f"{API_KEY_VARIABLE}, or use --from-zip FILE"
        ) from None
    return _finish(staging, out, f"roboflow {what}")
