"""A Roboflow export as a user gets it: `fetch roboflow --from-zip`, then validate sets the placeholder aside.

The test builds the export the way Roboflow writes it (a zip holding one folder with README files and
{train,valid,test}/_annotations.coco.json; category 0 named after the project, used by no annotation and the
supercategory of every class), unpacks it with the CLI, validates it, and checks that the placeholder is reported
and never becomes a prompt: not in the clean categories, not among the training index's prompts.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main
from sam3.coco import ANNOTATIONS_FILE, SPLITS
from sam3.coco_split import CocoSplit
from sam3.config import MAX_TARGETS
from sam3.data.index import build_index
from tests.pipeline.broken_datasets import write_png
from tests.pipeline.test_validate import W, found, read_json, run_validate

pytestmark = pytest.mark.usefixtures("outside_repo")

PLACEHOLDER = {"id": 0, "name": "coins", "supercategory": "none"}


def roboflow_export(folder: Path, classes: list[dict]) -> Path:
    """Write a Roboflow-style COCO export under `folder`: per split 2 images, one annotation of each class on each."""
    folder.mkdir(parents=True)
    (folder / "README.roboflow.txt").write_text("exported from roboflow.com\n")
    for s, split in enumerate(SPLITS):
        images, annotations = [], []
        for i in range(2):
            name = f"{split}_{i}_jpg.rf.{s}{i}abc.png"
            write_png(folder / split / name, color=(30 + 60 * s, 50 + 90 * i, 120))
            images.append({"id": i, "license": 1, "file_name": name, "height": 24, "width": 32})
            for c in classes:
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": i,
                        "category_id": c["id"],
                        "bbox": [2 + 10 * (c["id"] - 1), 3, 8, 8],
                        "area": 64,
                        "segmentation": [],
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": "Exported from roboflow.com"},
            "licenses": [{"id": 1, "name": "CC BY 4.0"}],
            "categories": [PLACEHOLDER, *classes],
            "images": images,
            "annotations": annotations,
        }
        (folder / split / ANNOTATIONS_FILE).write_text(json.dumps(coco))
    return folder


def zip_folder(folder: Path, archive: Path, wrapper: str = "coins.v2i.coco") -> Path:
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, f"{wrapper}/{path.relative_to(folder).as_posix()}")
    return archive


CLASSES = [{"id": 1, "name": "dime", "supercategory": "coins"}, {"id": 2, "name": "penny", "supercategory": "coins"}]


def test_an_export_zip_is_unpacked_and_its_placeholder_set_aside_never_prompted(tmp_path, capsys, caplog):
    archive = zip_folder(roboflow_export(tmp_path / "export", CLASSES), tmp_path / "coins.zip")
    ds = tmp_path / "ds"
    assert main(["fetch", "roboflow", "--from-zip", str(archive), "--out", str(ds)]) == 0
    assert sorted(p.name for p in ds.iterdir()) == ["README.roboflow.txt", "test", "train", "valid"]  # wrapper gone
    printed = capsys.readouterr().out
    assert f"next: dvc add {ds}" in printed
    assert not list(tmp_path.glob(".ds.*"))  # the staging folder was renamed into place

    with caplog.at_level("INFO"):
        code, report = run_validate(tmp_path)
    assert code == 0 and report["ok"]  # set aside by design: not an error
    assert found(report) == [
        ("roboflow_placeholder", "set_aside", split, "categories", 0, 0) for split in ("train", "valid", "test")
    ]
    assert "category 0 'coins' is Roboflow's placeholder" in caplog.text
    assert "roboflow_placeholder: 3 records set aside" in caplog.text  # one per split
    for split in SPLITS:
        clean = read_json(tmp_path / "out" / split / ANNOTATIONS_FILE)
        assert [c["name"] for c in clean["categories"]] == ["dime", "penny"]
        quarantine = read_json(tmp_path / "out" / "_quarantine" / split / ANNOTATIONS_FILE)
        assert [(c["id"], c["_problems"][0]["check"]) for c in quarantine["categories"]] == [
            (0, "roboflow_placeholder")
        ]

    # never a prompt: the training index over the clean copy prompts with the two classes only
    categories, records, _ = build_index(
        CocoSplit.load(tmp_path / "out" / "train" / ANNOTATIONS_FILE), {}, MAX_TARGETS, with_masks=False
    )
    assert categories == {1: "dime", 2: "penny"}
    for record in records:
        assert set(record.positives) == {1, 2} and not record.without_query


def test_a_placeholder_named_like_a_class_does_not_push_the_class_out(tmp_path):
    """The project is called "coins" and so is a class: the placeholder shares its name; the class stays."""
    classes = [
        {"id": 1, "name": "coins", "supercategory": "coins"},
        {"id": 2, "name": "penny", "supercategory": "coins"},
    ]
    roboflow_export(tmp_path / "ds", classes)
    code, report = run_validate(tmp_path)
    assert code == 0
    assert {(p["check"], p["category_id"]) for p in report["problems"]} == {("roboflow_placeholder", 0)}
    clean = read_json(tmp_path / "out" / "train" / ANNOTATIONS_FILE)
    assert [(c["id"], c["name"]) for c in clean["categories"]] == [(1, "coins"), (2, "penny")]


def test_an_unused_category_that_is_not_a_placeholder_stays_a_warning(tmp_path):
    classes = [*CLASSES]
    roboflow_export(tmp_path / "ds", classes)
    for split in SPLITS:  # a plain dataset: category 0 is a real class (used), and class 3 is unused
        path = tmp_path / "ds" / split / ANNOTATIONS_FILE
        coco = json.loads(path.read_text())
        coco["categories"] = [
            {"id": 0, "name": "nickel", "supercategory": "coins"},
            *classes,
            {"id": 3, "name": "quarter", "supercategory": "coins"},
        ]
        coco["annotations"].append({**coco["annotations"][0], "id": 99, "category_id": 0, "bbox": [20, 12, 6, 6]})
        path.write_text(json.dumps(coco))
    code, report = run_validate(tmp_path)
    assert code == 0
    assert found(report) == [("empty_category", W, None, "categories", None, 3)]


def test_a_zip_that_writes_outside_its_folder_is_refused_whole(tmp_path, capsys):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train/_annotations.coco.json", "{}")
        bundle.writestr("../escaped.txt", "gotcha")
    assert main(["fetch", "roboflow", "--from-zip", str(archive), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "member '../escaped.txt' would be written outside the folder; nothing unpacked" in err
    assert "Traceback" not in err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "ds").exists()


def test_a_zip_without_the_coco_layout_is_refused(tmp_path, capsys):
    archive = tmp_path / "yolo.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train/labels/a.txt", "0 0.5 0.5 0.1 0.1")
    assert main(["fetch", "roboflow", "--from-zip", str(archive), "--out", str(tmp_path / "ds")]) == 2
    assert "not a Roboflow COCO export: no train/_annotations.coco.json" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_download_says_what_is_missing_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    argv = ["fetch", "roboflow", "--workspace", "acme", "--project", "coins", "--version", "2"]
    assert main([*argv, "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "cannot download acme/coins/2" in err
    assert "pip install roboflow" in err or "ROBOFLOW_API_KEY is not set" in err
    assert main(["fetch", "roboflow", "--workspace", "acme"]) == 2
    assert "--project, --version (missing)" in capsys.readouterr().err


def test_the_suites_still_need_a_root(capsys):
    assert main(["fetch", "odinw13"]) == 2
    assert "fetch odinw13 needs --root DIR" in capsys.readouterr().err
