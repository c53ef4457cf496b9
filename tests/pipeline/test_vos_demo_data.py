"""The real VOS demo dataset built from labelme's sdist: layout, masks against the polygons, provenance, determinism.

The sdist is found as the command finds it ($VOS_DEMO_SDIST_DIR, else .venv/sdists/); without it
these tests fail (not skip): `make install` downloads it, and a silently skipped real-data check would hide that.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import vos_demo_data
from sam3.errors import DataError
from sam3.video.palette import read_label_map

EXAMPLE = f"labelme-{vos_demo_data.VERSION}/{vos_demo_data.EXAMPLE_DIR}"
SOURCES = [f"000001{i:02d}" for i in range(5)]  # the example's frames 00000100 .. 00000104
FRAMES = [f"{t:05d}" for t in range(5)]
WIDTH, HEIGHT = 1000, 563


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sdist() -> Path:
    try:
        return vos_demo_data.find_sdist()
    except DataError as err:
        pytest.fail(f"labelme sdist not found; run `make install` (it downloads it): {err}")


@pytest.fixture(scope="module")
def sdist_files(sdist: Path) -> dict[str, bytes]:
    """The example's members, read independently of the builder: {path under the sdist: bytes}."""
    with tarfile.open(sdist, "r:gz") as archive:
        return {
            m.name: archive.extractfile(m).read()
            for m in archive.getmembers()
            if m.isfile() and m.name.startswith(f"labelme-{vos_demo_data.VERSION}/examples/video_annotation/")
        }


@pytest.fixture(scope="module")
def built(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vos_demo")
    return out, vos_demo_data.build_vos_demo(out, sdist)


def shoelace(points: list[list[float]]) -> float:
    x, y = np.array(points, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_layout_frames_and_sizes(built: tuple[Path, dict]) -> None:
    root, summary = built
    assert sorted(p.name for p in root.iterdir()) == ["meta.json", "train", "valid"]
    for split in ("train", "valid"):
        frames = sorted((root / split / "JPEGImages" / "labelme_car").iterdir())
        labels = sorted((root / split / "Annotations" / "labelme_car").iterdir())
        assert [p.name for p in frames] == [f"{n}.jpg" for n in FRAMES]
        assert [p.name for p in labels] == [f"{n}.png" for n in FRAMES]
        for frame, label in zip(frames, labels, strict=True):  # vos-validate's check: frame and mask sizes agree
            with Image.open(frame) as image, Image.open(label) as mask:
                assert image.size == mask.size == (WIDTH, HEIGHT)
                assert (image.format, mask.format, mask.mode) == ("JPEG", "PNG", "P")
    assert summary["frames"] == 5 and summary["video"] == "labelme_car"
    assert summary["objects"] == {"1": "car", "2": "track"}
    assert all_files(root / "train") == all_files(root / "valid")  # train repeats valid's one video


def test_label_maps_ids_and_car_area(built: tuple[Path, dict], sdist_files: dict[str, bytes]) -> None:
    root, summary = built
    for t, (frame, source) in enumerate(zip(FRAMES, SOURCES, strict=True)):
        labels = read_label_map(root / "valid" / "Annotations" / "labelme_car" / f"{frame}.png")
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        annotation = json.loads(sdist_files[f"{EXAMPLE}/{source}.json"])
        car = [s["points"] for s in annotation["shapes"] if s["label"] == "car"]
        assert len(car) == 1  # one car: identity is the label
        area, expected = int((labels == 1).sum()), shoelace(car[0])
        assert area > 0
        assert abs(area - expected) <= max(0.02 * expected, 300), (frame, area, expected)
        assert summary["areas"][t] == {"1": area, "2": int((labels == 2).sum())}


def test_masks_equal_labelmes_own_conversion(built: tuple[Path, dict], sdist_files: dict[str, bytes]) -> None:
    """labelme ships its labelme2voc output of the same example (class ids _background_, car, track: ours)."""
    root, _ = built
    voc = f"labelme-{vos_demo_data.VERSION}/examples/video_annotation/data_dataset_voc/SegmentationClass"
    for frame, source in zip(FRAMES, SOURCES, strict=True):
        labels = read_label_map(root / "valid" / "Annotations" / "labelme_car" / f"{frame}.png")
        reference = np.load(io.BytesIO(sdist_files[f"{voc}/{source}.npy"]))
        assert (labels != reference).mean() < 0.001  # equal with our Pillow; a little slack for its rounding


def test_jpeg_bytes_copied_unchanged(built: tuple[Path, dict], sdist_files: dict[str, bytes]) -> None:
    root, _ = built
    for frame, source in zip(FRAMES, SOURCES, strict=True):
        copied = (root / "valid" / "JPEGImages" / "labelme_car" / f"{frame}.jpg").read_bytes()
        assert copied == sdist_files[f"{EXAMPLE}/{source}.jpg"]


def test_meta_provenance(built: tuple[Path, dict], sdist: Path) -> None:
    root, _ = built
    meta = json.loads((root / "meta.json").read_text())
    assert meta["generator"] == "vos-demo-data"
    source = meta["source"]
    assert source["sdist"] == sdist.name
    assert source["sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert (source["package"], source["version"], source["example"]) == ("labelme", "6.3.1", EXAMPLE)
    assert [f["frame"] for f in meta["frames"]] == FRAMES
    assert [f["source"] for f in meta["frames"]] == [f"{s}.jpg" for s in SOURCES]
    assert all(f["areas"]["1"] > 0 and f["areas"]["2"] > 0 for f in meta["frames"])


def test_two_builds_byte_identical(built: tuple[Path, dict], sdist: Path, tmp_path: Path) -> None:
    root, _ = built
    vos_demo_data.build_vos_demo(tmp_path / "again", sdist)
    assert all_files(tmp_path / "again") == all_files(root)
    vos_demo_data.build_vos_demo(tmp_path / "again", sdist)  # a rebuild over its own output is allowed
    assert all_files(tmp_path / "again") == all_files(root)


def test_perfect_prediction_scores_one(built: tuple[Path, dict]) -> None:
    from sam3.video.metrics import evaluate_folders

    annotations = built[0] / "valid" / "Annotations"
    scores = evaluate_folders(annotations, annotations, progress=False)
    assert scores["num_videos"] == 1 and scores["num_objects"] == 2
    assert scores["J&F"] == pytest.approx(1.0)


def test_missing_sdist_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOS_DEMO_SDIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError) as err:
        vos_demo_data.build_vos_demo(tmp_path / "out")
    assert "pip download labelme==6.3.1 --no-deps --no-binary :all: -d .venv/sdists" in str(err.value)
    with pytest.raises(DataError, match="pip download labelme==6.3.1"):
        vos_demo_data.build_vos_demo(tmp_path / "out", tmp_path / "nowhere.tar.gz")
    assert not (tmp_path / "out").exists()


def test_env_dir_is_searched(sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / sdist.name).symlink_to(sdist)
    monkeypatch.setenv("VOS_DEMO_SDIST_DIR", str(tmp_path))
    assert vos_demo_data.find_sdist() == tmp_path / "labelme-6.3.1.tar.gz"


def test_links_in_the_example_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "labelme-6.3.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        labels = tarfile.TarInfo("labelme-6.3.1/examples/video_annotation/labels.txt")
        data = b"__ignore__\n_background_\ncar\n"
        labels.size = len(data)
        tar.addfile(labels, io.BytesIO(data))
        link = tarfile.TarInfo(f"labelme-6.3.1/{vos_demo_data.EXAMPLE_DIR}/00000100.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="not a regular file"):
        vos_demo_data.build_vos_demo(tmp_path / "out", archive)


def test_refuses_foreign_output_folder(sdist: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        vos_demo_data.build_vos_demo(tmp_path, sdist)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_command(sdist: Path, tmp_path: Path, outside_repo: None) -> None:
    parser = argparse.ArgumentParser()
    vos_demo_data.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "cli"), "--sdist", str(sdist)])
    assert vos_demo_data.run(args) == 0
    assert (tmp_path / "cli" / "valid" / "Annotations" / "labelme_car" / "00004.png").is_file()
