"""`python -m pipeline vos-demo-data`: a tiny REAL video object segmentation (VOS) dataset from labelme's sdist.

No VOS dataset site is reachable offline, but labelme's source distribution on PyPI (labelme-6.3.1.tar.gz, GPL-3.0)
ships a short annotated video: `examples/video_annotation/data_annotated/00000100..00000104.{jpg,json}`, five
1000x563 frames of real footage with labelme polygons labelled `car` and `track`. The archive is read in place with
`tarfile` (nothing is extracted to disk); only regular files directly inside that folder are read, plus the
example's `labels.txt` for the object ids, and a link or device there is refused.

Object identity across frames is the label: the car is object 1 and the track object 2, the order of
`labels.txt` after its `__ignore__` and `_background_` lines. Each frame's polygons are rasterised with PIL
ImageDraw (fill and outline, as labelme's own `labelme2voc` does, so the masks equal the ones labelme ships in
`data_dataset_voc/`), in the JSON's order: a later polygon is drawn over an earlier one where they overlap (the
track is the union of its polygons; the car, listed last, lies on top of it).

Output is the MOSE layout with one video, `labelme_car`: ROOT/{train,valid}/JPEGImages/labelme_car/00000.jpg ..
00004.jpg (frames renamed in order, the JPEG bytes copied from the sdist unchanged, not re-encoded) and
Annotations/labelme_car/00000.png .. (indexed PNGs, `sam3.video.palette`: 0 background, k object k). The video is
for evaluating a tracker on real footage, so `valid/` is the split that matters; the same video is also written to
`train/` only so the layout is complete for the commands that expect both splits (it is no training set).
ROOT/meta.json records the source (sdist file name and sha256, labelme version, example path, licence), the object
ids and per frame its source file and each object's area in pixels.

Without `--sdist` the archive is looked up in `$VOS_DEMO_SDIST_DIR` (default: the repository's `.venv/sdists/`,
where `make install` downloads it). Deterministic: the same sdist gives byte-identical files (fixed order, no dates
or paths in meta.json, PNGs without timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sam3.errors import DataError

log = logging.getLogger(__name__)

GENERATOR = "vos-demo-data"
DEFAULT_OUT = "data/raw/vos_demo"
SPLITS = ("train", "valid")
META_FILE = "meta.json"
VIDEO = "labelme_car"
FRAME_DIGITS = 5

PACKAGE = "labelme"
VERSION = "6.3.1"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_DIR_ENV = "VOS_DEMO_SDIST_DIR"
# Relative to the repository, not the working directory: `make install` downloads into the project's venv.
DEFAULT_SDIST_DIR = Path(__file__).resolve().parents[1] / ".venv" / "sdists"
PIP_COMMAND = f"pip download {PACKAGE}=={VERSION} --no-deps --no-binary :all: -d .venv/sdists"
EXAMPLE_DIR = "examples/video_annotation/data_annotated"  # inside the sdist's top folder labelme-<version>/
LABELS_FILE = "examples/video_annotation/labels.txt"
NOT_OBJECTS = ("__ignore__", "_background_")  # labelme's reserved label names: no object id
LICENCE = "GPL-3.0-only (labelme's licence; the example ships in its source distribution)"


@dataclass(frozen=True)
class Frame:
    """One annotated frame of the example: its file names, JPEG bytes and labelme JSON."""

    jpg_name: str
    json_name: str
    jpeg: bytes
    annotation: dict[str, Any]


def find_sdist(sdist: str | Path | None = None) -> Path:
    """The labelme sdist: `sdist` when given, else SDIST_NAME in $VOS_DEMO_SDIST_DIR (default DEFAULT_SDIST_DIR).

    DataError when it is missing; without `sdist` the message gives the pip command that downloads it.
    """
    if sdist is not None:
        path = Path(sdist)
        if not path.is_file():
            raise DataError(f"{path}: --sdist file not found; download it with: {PIP_COMMAND}")
        return path
    folder = Path(os.environ.get(SDIST_DIR_ENV) or DEFAULT_SDIST_DIR)
    path = folder / SDIST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: the labelme source distribution is not there (looked in ${SDIST_DIR_ENV} or its default "
            f"{DEFAULT_SDIST_DIR}); run `make install`, or download it with: {PIP_COMMAND} (or pass --sdist FILE)"
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def example_members(archive: tarfile.TarFile, sdist: Path) -> tuple[str, dict[str, tarfile.TarInfo], tarfile.TarInfo]:
    """(top folder, {file name: member} of the example folder, labels.txt member), checked.

    Only members directly inside EXAMPLE_DIR and the one LABELS_FILE are taken; a link, device or sub-folder
    there is refused (DataError) rather than followed. Directory entries carry no bytes and are passed over.
    """
    members = archive.getmembers()
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    if len(tops) != 1:
        raise DataError(f"{sdist}: not a source distribution (expected one top folder, found {sorted(tops)[:5]})")
    top = tops.pop()
    example = PurePosixPath(top, EXAMPLE_DIR)
    labels_name = str(PurePosixPath(top, LABELS_FILE))
    files: dict[str, tarfile.TarInfo] = {}
    labels: tarfile.TarInfo | None = None
    for member in members:
        name = PurePosixPath(member.name)
        if name == PurePosixPath(labels_name):
            labels = member
        elif example not in name.parents:
            continue  # outside the example: never read
        elif member.isdir():
            continue
        elif name.parent != example or ".." in name.parts:
            raise DataError(f"{sdist}: {member.name}: unexpected entry in {EXAMPLE_DIR}, refused (only its files)")
        else:
            files[name.name] = member
        if not member.isfile():
            raise DataError(f"{sdist}: {member.name} is not a regular file (link or device), refused")
    if labels is None:
        raise DataError(f"{sdist}: {labels_name} missing; is it the labelme sdist? {PIP_COMMAND}")
    if not files:
        raise DataError(f"{sdist}: no files in {top}/{EXAMPLE_DIR}; is it the labelme sdist? {PIP_COMMAND}")
    return top, files, labels


def read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = archive.extractfile(member)
    if stream is None:  # only for non-regular members, which example_members refused
        raise DataError(f"{member.name}: cannot be read from the archive")
    return stream.read()


def object_ids(text: str, where: str) -> dict[str, int]:
    """{label: id} from labels.txt: 1, 2, ... in file order, labelme's reserved names skipped."""
    names = [line.strip() for line in text.splitlines() if line.strip() and line.strip() not in NOT_OBJECTS]
    if not names or len(set(names)) != len(names):
        raise DataError(f"{where}: expected distinct object labels after {', '.join(NOT_OBJECTS)}, got {names}")
    return {name: k for k, name in enumerate(names, start=1)}


def read_example(sdist: Path) -> tuple[str, dict[str, int], list[Frame]]:
    """(labelme version, {label: id}, frames in name order) read from the sdist without extracting it."""
    try:
        archive = tarfile.open(sdist, mode="r:gz")
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{sdist}: cannot open as a .tar.gz ({err}); download it again: {PIP_COMMAND}") from err
    with archive:
        try:
            top, files, labels_member = example_members(archive, sdist)
            ids = object_ids(read_member(archive, labels_member).decode("utf-8"), f"{sdist}: {labels_member.name}")
            frames = []
            for jpg_name in sorted(n for n in files if n.endswith(".jpg")):
                json_name = jpg_name.removesuffix(".jpg") + ".json"
                if json_name not in files:
                    raise DataError(f"{sdist}: {top}/{EXAMPLE_DIR}/{jpg_name} has no {json_name} annotation")
                try:
                    annotation = json.loads(read_member(archive, files[json_name]))
                except ValueError as err:
                    raise DataError(f"{sdist}: {top}/{EXAMPLE_DIR}/{json_name}: not JSON ({err})") from err
                frames.append(Frame(jpg_name, json_name, read_member(archive, files[jpg_name]), annotation))
        except (OSError, tarfile.TarError, EOFError) as err:  # a truncated or corrupt archive
            raise DataError(f"{sdist}: corrupt archive ({err}); download it again: {PIP_COMMAND}") from err
    if not frames:
        raise DataError(f"{sdist}: no .jpg frames in {top}/{EXAMPLE_DIR}")
    package, _, version = top.rpartition("-")
    if package != PACKAGE:
        raise DataError(f"{sdist}: top folder {top!r} is not {PACKAGE}-<version>; {PIP_COMMAND}")
    return version, ids, frames


def rasterise(frame: Frame, ids: dict[str, int], size: tuple[int, int], where: str) -> np.ndarray:
    """The (H, W) uint8 label map of a frame: each polygon filled (and outlined) with its label's id, in JSON
    order, so a later polygon covers an earlier one where they overlap."""
    from PIL import Image, ImageDraw

    width, height = size
    declared = (frame.annotation.get("imageWidth"), frame.annotation.get("imageHeight"))
    if declared != (width, height):
        raise DataError(f"{where}: imageWidth x imageHeight {declared} differ from the JPEG's {width} x {height}")
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for index, shape in enumerate(frame.annotation.get("shapes", [])):
        label, kind, points = shape.get("label"), shape.get("shape_type", "polygon"), shape.get("points") or []
        if label not in ids:
            raise DataError(f"{where}: shapes[{index}] label {label!r} is not in labels.txt ({', '.join(ids)})")
        if kind != "polygon" or len(points) < 3:
            raise DataError(f"{where}: shapes[{index}] is a {kind} of {len(points)} points; only polygons are read")
        xy = [(float(x), float(y)) for x, y in points]
        draw.polygon(xy, fill=ids[label], outline=ids[label])
    return np.array(image, dtype=np.uint8)


def jpeg_size(jpeg: bytes, where: str) -> tuple[int, int]:
    """(width, height) of JPEG bytes; DataError if they are no JPEG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if image.format != "JPEG":
                raise DataError(f"{where}: a {image.format} file, not a JPEG")
            return image.size
    except OSError as err:
        raise DataError(f"{where}: cannot read the JPEG ({err})") from err


def clear_output(out: Path) -> None:
    """Remove a previous build in `out` (it has our meta.json); DataError if `out` holds anything else: we never
    delete files this command did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{GENERATOR}: --out {out} is a file, not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    try:
        ours = json.loads((out / META_FILE).read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DataError(
            f"{GENERATOR}: --out {out} is not empty and was not written by {GENERATOR} (no {META_FILE} of ours); "
            "give an empty or new folder"
        )
    for entry in entries:
        if entry.name in (*SPLITS, META_FILE):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def build_vos_demo(out: str | Path, sdist: str | Path | None = None) -> dict[str, Any]:
    """Build the dataset under `out` from the labelme sdist (module docstring; `sdist` None: find_sdist's lookup).

    Returns {"out", "video", "frames", "objects" ({id: label}), "areas" ([{id: pixels}] per frame), "sdist",
    "sha256", "version"}. DataError when the sdist is missing or not the expected archive.
    """
    from sam3.video.palette import write_label_map

    sdist = find_sdist(sdist)
    version, ids, frames = read_example(sdist)
    out = Path(out)
    clear_output(out)
    example = f"{PACKAGE}-{version}/{EXAMPLE_DIR}"
    frames_meta = []
    for t, frame in enumerate(frames):
        where = f"{sdist}: {example}/{frame.json_name}"
        size = jpeg_size(frame.jpeg, f"{sdist}: {example}/{frame.jpg_name}")
        labels = rasterise(frame, ids, size, where)
        counts = np.bincount(labels.ravel(), minlength=max(ids.values()) + 1)
        stem = f"{t:0{FRAME_DIGITS}d}"
        for split in SPLITS:
            root = out / split
            (root / "JPEGImages" / VIDEO).mkdir(parents=True, exist_ok=True)
            (root / "JPEGImages" / VIDEO / f"{stem}.jpg").write_bytes(frame.jpeg)  # unchanged: no re-encoding
            write_label_map(root / "Annotations" / VIDEO / f"{stem}.png", labels)
        frames_meta.append(
            {
                "frame": stem,
                "source": frame.jpg_name,
                "size": list(size),
                "areas": {str(k): int(counts[k]) for k in ids.values()},
            }
        )
    sha256 = sha256_of(sdist)
    meta = {
        "generator": GENERATOR,
        "source": {
            "sdist": sdist.name,
            "sha256": sha256,
            "package": PACKAGE,
            "version": version,
            "example": example,
            "licence": LICENCE,
        },
        "splits": {split: [VIDEO] for split in SPLITS},
        "note": "one video of real footage, for evaluation (valid); train holds the same video for a complete layout",
        "objects": {str(k): label for label, k in ids.items()},
        "frames": frames_meta,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "wrote %s: video %s, %d frames, objects %s, from %s (sha256 %s)",
        out,
        VIDEO,
        len(frames),
        meta["objects"],
        sdist.name,
        sha256[:12],
    )
    return {
        "out": str(out),
        "video": VIDEO,
        "frames": len(frames),
        "objects": meta["objects"],
        "areas": [f["areas"] for f in frames_meta],
        "sdist": str(sdist),
        "sha256": sha256,
        "version": version,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"dataset root (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--sdist",
        type=Path,
        default=None,
        help=f"the {SDIST_NAME} file (default: ${SDIST_DIR_ENV} or .venv/sdists/, where `make install` puts it)",
    )


def run(args: argparse.Namespace) -> int:
    build_vos_demo(args.out, args.sdist)
    return 0
