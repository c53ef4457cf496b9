"""Symbolic links and path traversal in the validate stage: nothing from outside the dataset folder gets in.

Every dataset is built in the test with `os.symlink`: links to an image and to a secret file outside the dataset,
a link through a sub-folder that leads outside, file_names that climb out (`..`, absolute), a relative link to an
image elsewhere in the dataset, a dangling link and a link loop. The test asserts the report, that the outside
files' bytes appear nowhere under the output (quarantine included), and that the clean copy holds real files only,
which the preprocess stage then reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.preprocess import preprocess_dataset
from pipeline.validation.paths import locate, unsafe_reason
from pipeline.validation.problems import Check
from sam3.coco import ANNOTATIONS_FILE
from tests.pipeline.broken_datasets import clean_split, read_json, write_png, write_split
from tests.pipeline.test_validate import E, found, reasons, run_validate

pytestmark = pytest.mark.usefixtures("outside_repo")

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the dataset"


def all_files(folder: Path) -> list[Path]:
    """Every entry under `folder`, links included (not followed)."""
    return [Path(top) / name for top, dirs, files in os.walk(folder) for name in dirs + files]


def test_links_and_paths_out_of_the_dataset_are_quarantined_unread(tmp_path):
    ds, outside = tmp_path / "ds", tmp_path / "elsewhere"
    coco = clean_split(ds, "train", n_images=9)  # ids 1..9 = img0..img8.png, annotation 100 + id on each
    images = coco["images"]
    secret = outside / "id_ed25519"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    outside_image = write_png(outside / "photo.png", color=(1, 2, 3))
    write_png(outside / "sub" / "img.png", color=(4, 5, 6))
    train = ds / "train"
    (train / "img0.png").unlink()
    os.symlink(outside_image, train / "img0.png")  # id 1: absolute link to an image outside
    (train / "img1.png").unlink()
    os.symlink("../../elsewhere/id_ed25519", train / "img1.png")  # id 2: relative link to the secret
    write_png(ds / "shared" / "real.png", color=(7, 8, 9))
    (train / "img2.png").unlink()
    os.symlink("../shared/real.png", train / "img2.png")  # id 3: relative link inside the dataset: fine
    (train / "img3.png").unlink()
    os.symlink("nowhere.png", train / "img3.png")  # id 4: dangling
    (train / "img4.png").unlink()
    os.symlink("img4.png", train / "img4.png")  # id 5: a link to itself
    os.symlink(outside / "sub", train / "sub")  # id 6: a sub-folder link that leads outside
    images[5]["file_name"] = "sub/img.png"
    images[6]["file_name"] = "../../elsewhere/id_ed25519"  # id 7: climbs out by name
    images[7]["file_name"] = str(secret)  # id 8: absolute
    write_split(ds, "train", coco)  # id 9 (img8.png) is an ordinary file

    code, report = run_validate(tmp_path)
    assert code == 0  # the rest is usable
    assert found(report)[:7] == [
        ("link_outside_dataset", E, "train", "images", 0, 1),
        ("link_outside_dataset", E, "train", "images", 1, 2),
        ("broken_link", E, "train", "images", 3, 4),
        ("broken_link", E, "train", "images", 4, 5),
        ("link_outside_dataset", E, "train", "images", 5, 6),
        ("unsafe_file_name", E, "train", "images", 6, 7),
        ("unsafe_file_name", E, "train", "images", 7, 8),
    ]
    messages = {p["index"]: p["message"] for p in report["problems"] if p["index"] is not None}
    assert messages[1] == (
        f"images[1] (id 2): train/img1.png is a link to {secret.resolve()}, outside the dataset folder; not read. "
        "Copy the image into the dataset (links inside it are fine)"
    )
    assert "train/img3.png is a link to train/nowhere.png, which does not exist" in messages[3]
    assert "has a '..' part" in messages[6] and "is an absolute path" in messages[7]

    out = tmp_path / "out"
    assert not [path for path in all_files(out) if path.is_symlink()]  # no links in the clean copy or quarantine
    outside_bytes = {SECRET, outside_image.read_bytes(), (outside / "sub" / "img.png").read_bytes()}
    for path in all_files(out):
        if path.is_file():
            assert path.read_bytes() not in outside_bytes, path
            assert SECRET not in path.read_bytes(), path
    clean = read_json(out / "train" / ANNOTATIONS_FILE)
    assert [image["id"] for image in clean["images"]] == [3, 9]
    # the link inside the dataset became a real file with its target's bytes, under the record's file_name
    assert (out / "train" / "img2.png").read_bytes() == (ds / "shared" / "real.png").read_bytes()
    # the quarantine holds the records and their reasons; of the files only those inside the dataset (none here)
    quarantine = read_json(out / "_quarantine" / "train" / ANNOTATIONS_FILE)
    assert [(image["id"], reasons(image)) for image in quarantine["images"]] == [
        (1, ["link_outside_dataset"]),
        (2, ["link_outside_dataset"]),
        (4, ["broken_link"]),
        (5, ["broken_link"]),
        (6, ["link_outside_dataset"]),
        (7, ["unsafe_file_name"]),
        (8, ["unsafe_file_name"]),
    ]
    assert [p.name for p in (out / "_quarantine" / "train").iterdir()] == [ANNOTATIONS_FILE]

    # before: the clean copy held the relative link itself, which dangles there; now preprocess reads it
    summary = preprocess_dataset(out, tmp_path / "pre", size=16)
    assert summary["splits"]["train"]["images"] == 2 and summary["resized"] == 2
    assert (tmp_path / "pre" / "train" / "img2.png").is_file()


def test_a_link_inside_the_dataset_that_is_quarantined_places_the_real_file(tmp_path):
    """The quarantine keeps an inside file's bytes next to its record (the dataset has them anyway), as a real
    file: here a link to a file that is not an image."""
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=2)
    (ds / "notes.txt").write_text("not an image")
    (ds / "train" / "img1.png").unlink()
    os.symlink("../notes.txt", ds / "train" / "img1.png")
    write_split(ds, "train", coco)
    code, report = run_validate(tmp_path)
    assert code == 0 and found(report)[0] == ("not_an_image", E, "train", "images", 1, 2)
    placed = tmp_path / "out" / "_quarantine" / "train" / "img1.png"
    assert not placed.is_symlink() and placed.read_text() == "not an image"


@pytest.mark.parametrize("linked", ["split folder", "annotation file"])
def test_an_annotation_file_outside_the_dataset_is_refused(tmp_path, capsys, linked):
    ds, outside = tmp_path / "ds", tmp_path / "elsewhere"
    write_split(outside, "train", clean_split(outside, "train"))
    ds.mkdir()
    if linked == "split folder":
        os.symlink(outside / "train", ds / "train")
    else:
        (ds / "train").mkdir()
        os.symlink(outside / "train" / ANNOTATIONS_FILE, ds / "train" / ANNOTATIONS_FILE)
    assert run_validate(tmp_path) == (2, None)
    err = capsys.readouterr().err
    assert "outside the dataset folder; not read" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_dataset_folder_that_is_itself_a_link_is_fine(tmp_path):
    real = tmp_path / "disk" / "ds"
    write_split(real, "train", clean_split(real, "train"))
    os.symlink(real, tmp_path / "ds")
    code, report = run_validate(tmp_path)
    assert code == 0 and report["problems"] == []
    assert (tmp_path / "out" / "train" / "img0.png").is_file()


def test_locate(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(b"x")
    os.symlink("a.png", tmp_path / "train" / "b.png")
    assert locate(tmp_path, "train", "a.png").path == (tmp_path / "train" / "a.png").resolve()
    assert locate(tmp_path, "train", "b.png").path == (tmp_path / "train" / "a.png").resolve()
    # a missing plain file is the file checks' to report (file_missing)
    assert locate(tmp_path, "train", "gone.png").path == (tmp_path / "train" / "gone.png").resolve()
    os.symlink("loop", tmp_path / "train" / "loop")
    assert locate(tmp_path, "train", "loop/x.png").check == Check.BROKEN_LINK  # a looping folder on the way
    assert locate(tmp_path, "train", "x\0.png").check == Check.UNSAFE_FILE_NAME
    assert unsafe_reason("x\0.png") == "holds a NUL character, which no path can"
