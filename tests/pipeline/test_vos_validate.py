"""Tests for `python -m pipeline vos-validate` (pipeline.vos_validate and pipeline.validation.vos_*).

Every dataset is written in the test: frames are small numpy arrays saved with PIL, annotations are label maps saved
with `sam3.video.palette.write_label_map`. great-expectations makes a run take seconds, so one MOSE-style dataset
holds one video per defect and is validated once (a module fixture); the tests then read its report and output.
The stage is run as the CLI runs it: a local parser with `add_arguments`, `run`, and a Sam3Error as exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import vos_validate
from pipeline.validation.vos_files import label_objects
from pipeline.validation.vos_layout import find_layout
from pipeline.validation.vos_tables import frame_order
from sam3.errors import DataError, Sam3Error
from sam3.video.palette import write_label_map

W, H = 10, 8  # frame width, height


def write_frame(path: Path, width: int = W, height: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def label_map(*ids: int, width: int = W, height: int = H) -> np.ndarray:
    """A label map with object `ids[i]` in row block i (0: background only)."""
    labels = np.zeros((height, width), np.uint8)
    for row, object_id in enumerate(ids):
        labels[row * 2 : row * 2 + 2, 1:5] = object_id
    return labels


def write_video(split_dir: Path, video: str, frames: list[str], annotations: dict[str, np.ndarray]) -> None:
    """Frames named `frames` (file names) and annotations {frame name without suffix: label map}."""
    (split_dir / "JPEGImages" / video).mkdir(parents=True, exist_ok=True)
    for name in frames:
        write_frame(split_dir / "JPEGImages" / video / name)
    for stem, labels in annotations.items():
        write_label_map(split_dir / "Annotations" / video / f"{stem}.png", labels)


FRAMES3 = ["00000.jpg", "00001.jpg", "00002.jpg"]


def defect_dataset(root: Path) -> None:
    """MOSE-style: train holds 2 clean videos and one video per defect; valid 1 clean (sparse) and 1 bad."""
    train, valid = root / "train", root / "valid"
    write_video(train, "good", FRAMES3, {"00000": label_map(1, 2), "00002": label_map(1, 2)})
    # clean with warnings: object 3 first seen in frame 2, and DAVIS's void index 255
    write_video(train, "warned", FRAMES3, {"00000": label_map(1, 255), "00002": label_map(1, 3)})
    (train / "JPEGImages" / "good" / "notes.txt").write_text("not a frame")
    write_video(train, "unreadable", FRAMES3, {"00000": label_map(1)})
    (train / "JPEGImages" / "unreadable" / "00001.jpg").write_bytes(b"garbage, not a JPEG")
    write_video(train, "size", FRAMES3, {"00000": label_map(1, width=W - 2, height=H - 2)})
    write_video(train, "rgb", FRAMES3, {"00000": label_map(1)})
    Image.new("RGB", (W, H), (200, 0, 0)).save(train / "Annotations" / "rgb" / "00000.png")
    write_video(train, "no_object", FRAMES3, {"00000": label_map()})
    write_video(train, "no_frames", [], {})
    write_video(train, "missing_frame", FRAMES3, {"00000": label_map(1), "00003": label_map(1)})
    write_video(train, "duplicate", [*FRAMES3, "00001.png"], {"00000": label_map(1)})
    write_video(train, "order", ["1.jpg", "2.jpg", "10.jpg"], {"1": label_map(1)})
    write_video(valid, "sparse", FRAMES3, {"00000": label_map(1, 2)})  # MOSE valid: first frame only
    write_video(valid, "broken", FRAMES3, {"00000": label_map(1)})
    (valid / "JPEGImages" / "broken" / "00002.jpg").write_bytes(b"\xff\xd8\xff truncated")


# video -> the error checks that quarantine it
EXPECTED_QUARANTINE = {
    "train": {
        "duplicate": ["duplicate_frame"],
        "missing_frame": ["annotation_without_frame"],
        "no_frames": ["empty_video"],
        "no_object": ["empty_video"],
        "order": ["frames_out_of_order"],
        "rgb": ["annotation_not_palette"],
        "size": ["annotation_size_mismatch"],
        "unreadable": ["frame_unreadable"],
    },
    "valid": {"broken": ["frame_unreadable"]},
}


def stage_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vos_validate.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_stage(root: Path, dataset: Path, *extra: str) -> tuple[int, dict[str, Any] | None]:
    """Run the stage as pipeline.cli does (Sam3Error: exit 2) on `dataset`, writing root/out and root/report.json."""
    report = root / "report.json"
    args = stage_args("--in", str(dataset), "--out", str(root / "out"), "--report", str(report), *extra)
    try:
        code = vos_validate.run(args)
    except Sam3Error:
        return 2, None
    return code, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def defects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(work folder, exit code, report) of one run over `defect_dataset`, outside the repository (its params.yaml)."""
    root = tmp_path_factory.mktemp("vos")
    defect_dataset(root / "ds")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        code, report = run_stage(root, root / "ds")
    assert report is not None
    yield root, code, report


def test_defects_are_quarantined_with_their_reasons(defects: tuple[Path, int, dict[str, Any]]) -> None:
    root, code, report = defects
    assert code == 0  # errors were quarantined and every split keeps a clean video
    assert report["quarantined"] == EXPECTED_QUARANTINE
    assert report["ok"] is False and report["usable"] is True and report["unusable_reasons"] == []
    assert report["layout"] == "mose" and report["strict"] is False
    for split, videos in EXPECTED_QUARANTINE.items():
        for video, checks in videos.items():
            reasons = json.loads((root / "out" / "_quarantine" / split / video / "reasons.json").read_text())
            assert reasons["video"] == video
            assert {p["check"] for p in reasons["problems"] if p["severity"] == "error"} == set(checks)
    bad = root / "out" / "_quarantine" / "train" / "unreadable"
    assert sorted(p.name for p in (bad / "JPEGImages").iterdir()) == FRAMES3  # moved whole, the bad frame too
    assert (bad / "Annotations" / "00000.png").is_file()


def test_messages_name_the_file_and_the_defect(defects: tuple[Path, int, dict[str, Any]]) -> None:
    _, _, report = defects
    messages = {(p["video"], p["check"]): p["message"] for p in report["problems"]}
    assert "train/JPEGImages/unreadable/00001.jpg" in messages[("unreadable", "frame_unreadable")]
    assert "'RGB'" in messages[("rgb", "annotation_not_palette")]
    assert "8x6" in messages[("size", "annotation_size_mismatch")]
    assert "00003" in messages[("missing_frame", "annotation_without_frame")]
    assert "00001.jpg, 00001.png" in messages[("duplicate", "duplicate_frame")]
    assert "1, 10, 2" in messages[("order", "frames_out_of_order")]
    empty = " | ".join(p["message"] for p in report["problems"] if p["video"] == "no_frames")
    assert "no frame image" in empty and "no annotation PNG" in empty


def test_counts_add_up(defects: tuple[Path, int, dict[str, Any]]) -> None:
    _, _, report = defects
    train, valid = report["counts"]["train"], report["counts"]["valid"]
    assert (train["videos"], train["videos_clean"], train["videos_quarantined"]) == (10, 2, 8)
    assert (valid["videos"], valid["videos_clean"], valid["videos_quarantined"]) == (2, 1, 1)
    for counts in report["counts"].values():
        assert counts["videos_clean"] + counts["videos_quarantined"] == counts["videos"]
    assert train["quarantined_by_reason"]["empty_video"] == 2
    assert report["quarantined_by_reason"]["frame_unreadable"] == 2  # one per split
    assert (train["frames_clean"], train["annotations_clean"], train["objects_clean"]) == (6, 4, 5)
    assert (valid["frames"], valid["annotations"]) == (6, 2)


def test_clean_videos_are_copied_and_warnings_kept(defects: tuple[Path, int, dict[str, Any]]) -> None:
    root, _, report = defects
    out, ds = root / "out", root / "ds"
    assert sorted(p.name for p in (out / "train" / "JPEGImages").iterdir()) == ["good", "warned"]
    assert sorted(p.name for p in (out / "valid" / "Annotations").iterdir()) == ["sparse"]
    assert sorted(p.name for p in (out / "train" / "JPEGImages" / "good").iterdir()) == FRAMES3  # no notes.txt
    frame = out / "train" / "JPEGImages" / "good" / "00000.jpg"
    assert frame.read_bytes() == (ds / "train" / "JPEGImages" / "good" / "00000.jpg").read_bytes()
    assert os.stat(frame).st_ino == os.stat(ds / "train" / "JPEGImages" / "good" / "00000.jpg").st_ino  # linked
    warnings = {(p["video"], p["check"]) for p in report["problems"] if p["severity"] == "warning"}
    assert warnings == {
        ("good", "unexpected_file"),
        ("warned", "void_label"),
        ("warned", "object_not_in_first_frame"),
    }


@pytest.mark.usefixtures("outside_repo")
def test_clean_davis_dataset_exits_0_even_strict(tmp_path: Path) -> None:
    ds = tmp_path / "davis"
    write_video(ds, "bear", FRAMES3, {"00000": label_map(1)})
    write_video(ds, "bad", FRAMES3, {})  # no annotation: quarantined (then --strict fails)
    (ds / "ImageSets" / "2017").mkdir(parents=True)
    (ds / "ImageSets" / "2017" / "train.txt").write_text("bear\nbad\ngone\n")
    code, report = run_stage(tmp_path, ds)
    assert code == 0 and report["layout"] == "davis" and report["quarantined"] == {"all": {"bad": ["empty_video"]}}
    assert report["image_sets"] == {
        "ImageSets/2017/train.txt": {"listed": 3, "clean": 1, "quarantined": 1, "missing": 1}
    }
    assert (tmp_path / "out" / "ImageSets" / "2017" / "train.txt").read_text() == "bear\n"
    assert (tmp_path / "out" / "Annotations" / "bear" / "00000.png").is_file()
    assert (tmp_path / "out" / "_quarantine" / "all" / "bad" / "reasons.json").is_file()
    assert run_stage(tmp_path, ds, "--strict")[0] == 1
    (ds / "ImageSets" / "2017" / "train.txt").write_text("bear\n")
    for path in (ds / "JPEGImages" / "bad").iterdir():
        path.unlink()
    (ds / "JPEGImages" / "bad").rmdir()
    code, report = run_stage(tmp_path, ds, "--strict")
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert report["counts"]["all"]["videos"] == report["counts"]["all"]["videos_clean"] == 1


@pytest.mark.usefixtures("outside_repo")
def test_nothing_usable_exits_1(tmp_path: Path) -> None:
    write_video(tmp_path / "ds" / "train", "only", FRAMES3, {"00000": label_map()})
    code, report = run_stage(tmp_path, tmp_path / "ds")
    assert code == 1 and report["usable"] is False
    assert report["unusable_reasons"] == ["split train has no clean video (1 of 1 quarantined)"]


@pytest.mark.usefixtures("outside_repo")
def test_missing_or_non_vos_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        find_layout(tmp_path / "nope")
    (tmp_path / "coco" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="not a VOS dataset"):
        find_layout(tmp_path / "coco")
    write_frame(tmp_path / "davis" / "JPEGImages" / "480p" / "bear" / "00000.jpg")
    with pytest.raises(DataError, match="resolution folder"):
        find_layout(tmp_path / "davis")
    assert run_stage(tmp_path, tmp_path / "nope") == (2, None)
    assert not (tmp_path / "out").exists()  # nothing written


def test_frame_order_and_label_objects() -> None:
    assert frame_order(["00000", "00001", "00010"])[0] == 0
    assert frame_order(["1", "2", "10"]) == (2, ["1", "10", "2"], ["1", "2", "10"])
    assert frame_order(["a", "b10", "b2"])[0] == 0  # not numbers: name order is the order
    objects = label_objects(label_map(3, 7))
    assert [(o.object_id, o.area, o.x, o.y, o.width, o.height) for o in objects] == [
        (3, 8, 1, 0, 4, 2),
        (7, 8, 1, 2, 4, 2),
    ]


@pytest.mark.parametrize("layout", ["mose", "davis"])
def test_our_generated_datasets_are_clean_and_their_meta_json_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    from pipeline.vos_shapes import build_vos_shapes

    build_vos_shapes(tmp_path / "ds", train_videos=2, valid_videos=1, frames=3, size=32, seed=0, layout=layout)
    monkeypatch.chdir(tmp_path)
    code, report = run_stage(tmp_path, tmp_path / "ds")
    assert code == 0 and report is not None
    assert report["problems"] == []  # meta.json at the root is the generator's description, known
    assert not (tmp_path / "out" / "meta.json").exists()  # and not copied: its counts describe the raw data
