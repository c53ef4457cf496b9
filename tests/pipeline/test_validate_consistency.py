"""Validate catches what later stages would reject or quietly degrade (issue: nothing lost, nothing let in).

Each test writes a small dataset, breaks it in one way, runs `python -m pipeline validate` and checks the named
problem, its severity, the record ids, the message's figures and what lands in the clean copy or the quarantine:
- duplicate_file_name      two image records naming one file (preprocess used to fail on the second)
- crowded_prompt           an image with more than 200 instances of a category (training drops that prompt)
- degenerate_polygon(_part) polygons whose points are equal or on one line
- box_polygon_mismatch     a bbox that does not describe its polygons
- category_name_mismatch   one category id, two names in two splits
- shared_image_file        the same image bytes in train and test (leakage)
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import pytest

from pipeline.validation.records import SplitRecords, annotation_table
from pipeline.validation.suites import BOX_POLYGON_MIN_IOU
from sam3.coco import ANNOTATIONS_FILE
from sam3.coco_split import CocoSplit
from sam3.config import MAX_TARGETS
from sam3.data.index import build_index
from tests.pipeline.broken_datasets import clean_split, read_json, write_split
from tests.pipeline.test_validate import E, W, assert_counts_identity, found, reasons, run_validate

pytestmark = pytest.mark.usefixtures("outside_repo")


def _annotation(ann_id: int, image_id: int, category_id: int, bbox: list, polygon: list) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": 0,
        "segmentation": [polygon],
    }


def _square(x: float, y: float, side: float) -> tuple[list, list]:
    """A square's COCO box and its polygon."""
    return [x, y, side, side], [x, y, x + side, y, x + side, y + side, x, y + side]


def test_duplicate_file_names_keep_the_first_record_and_quarantine_the_later(tmp_path):
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=3)  # ids 1..3 on img0..img2.png, annotations 101..103
    coco["images"].append({"id": 4, "file_name": "img0.png", "width": 32, "height": 24})  # [3]: images[0]'s file
    coco["images"].append({"id": 5, "file_name": "./img1.png", "width": 32, "height": 24})  # [4]: img1.png
    box, polygon = _square(2, 3, 6)
    coco["annotations"].append(_annotation(104, 4, 1, box, polygon))
    write_split(ds, "train", coco)

    code, report = run_validate(tmp_path)
    assert code == 0
    assert found(report) == [
        ("duplicate_file_name", E, "train", "images", 3, 4),
        ("duplicate_file_name", E, "train", "images", 4, 5),
    ]
    messages = [p["message"] for p in report["problems"]]
    assert messages[0].startswith("images[3] (id 4): file_name 'img0.png' is already the file of images[0];")
    assert "'./img1.png' is already the file of images[1]" in messages[1]
    assert_counts_identity(report)
    clean = read_json(tmp_path / "out" / "train" / ANNOTATIONS_FILE)
    assert [i["id"] for i in clean["images"]] == [1, 2, 3]
    quarantine = read_json(tmp_path / "out" / "_quarantine" / "train" / ANNOTATIONS_FILE)
    assert [(i["id"], reasons(i)) for i in quarantine["images"]] == [
        (4, ["duplicate_file_name"]),
        (5, ["duplicate_file_name"]),
    ]
    assert [(a["id"], reasons(a)) for a in quarantine["annotations"]] == [(104, ["image_quarantined"])]


def test_prompts_over_the_instance_limit_are_warned_with_what_training_does(tmp_path):
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=2)  # image 1: annotation 101 (cat); image 2: 102 (dog)
    extra = []
    for k in range(MAX_TARGETS):  # image 1 gets 200 more cats (201 in all); image 2 exactly 200 dogs
        extra.append(_annotation(1000 + k, 1, 1, [2, 3, 10, 8], [2, 3, 12, 3, 12, 11, 2, 11]))
        if k < MAX_TARGETS - 1:
            extra.append(_annotation(2000 + k, 2, 2, [2, 3, 10, 8], [2, 3, 12, 3, 12, 11, 2, 11]))
    crowd = _annotation(3000, 2, 2, [2, 3, 10, 8], [2, 3, 12, 3, 12, 11, 2, 11])
    crowd["iscrowd"] = 1  # a crowd region is never a target: image 2 stays at 200 dogs
    coco["annotations"] += [*extra, crowd]
    write_split(ds, "train", coco)

    code, report = run_validate(tmp_path)
    assert code == 0 and report["ok"]  # a warning only: nothing is quarantined
    assert found(report) == [("crowded_prompt", W, "train", "images", 0, 1)]
    message = report["problems"][0]["message"]
    assert message.startswith(f"images[0] (id 1): holds {MAX_TARGETS + 1} instances of category 1 'cat', over the ")
    assert "training drops this prompt on this image" in message
    assert report["counts"]["train"]["valid_annotations"] == len(coco["annotations"])

    # what the warning says is what training does: the data index drops exactly that (image, prompt) query
    split = CocoSplit.load(tmp_path / "out" / "train" / ANNOTATIONS_FILE)
    _, records, stats = build_index(split, {}, MAX_TARGETS, with_masks=False)
    assert stats["queries_over_max_targets_dropped"] == 1
    assert 1 not in records[0].positives and 1 in records[0].without_query
    assert len(records[1].positives[2].targets) == MAX_TARGETS


def test_degenerate_polygons_and_boxes_that_disagree_with_them(tmp_path):
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=1)  # annotation 101 on image 1: box [2, 3, 10, 8] and its polygon
    box, polygon = _square(4, 4, 10)
    coco["annotations"] += [
        _annotation(102, 1, 1, [4, 4, 1, 1], [5, 5, 5, 5, 5, 5]),  # every point equal
        _annotation(103, 1, 1, [0, 0, 8, 8], [0, 0, 4, 4, 8, 8, 2, 2]),  # on one line
        {**_annotation(104, 1, 1, box, polygon), "segmentation": [polygon, [1, 1, 1, 1, 1, 1]]},  # one flat part
        _annotation(105, 1, 1, [20, 14, 8, 8], polygon),  # the box is elsewhere: IoU 0
        _annotation(106, 1, 1, [3, 3, 12, 12], polygon),  # off by a pixel each side: IoU 100/144 = 0.69, fine
        _annotation(107, 1, 1, [4, 4, 10, 25], polygon),  # IoU 100/250 = 0.4 < 0.5; the box leaves the image
    ]
    write_split(ds, "train", coco)

    code, report = run_validate(tmp_path)
    assert code == 0
    assert found(report) == [
        ("degenerate_polygon", E, "train", "annotations", 1, 102),
        ("degenerate_polygon", E, "train", "annotations", 2, 103),
        ("degenerate_polygon_part", W, "train", "annotations", 3, 104),
        ("box_polygon_mismatch", E, "train", "annotations", 4, 105),
        ("box_outside_image", E, "train", "annotations", 6, 107),
        ("box_polygon_mismatch", E, "train", "annotations", 6, 107),
        ("empty_category", W, None, "categories", None, 2),  # one image: no dog
    ]
    by_id = {p["annotation_id"]: p["message"] for p in report["problems"] if "polygon" in p["check"]}
    assert "its polygons have no area (0 square pixels" in by_id[102]
    assert "1 of its polygons have no area" in by_id[104]
    assert f"by IoU 0.00 (< {BOX_POLYGON_MIN_IOU:g})" in by_id[105]
    assert "by IoU 0.40" in by_id[107]
    clean = read_json(tmp_path / "out" / "train" / ANNOTATIONS_FILE)
    assert [a["id"] for a in clean["annotations"]] == [101, 104, 106]
    quarantine = read_json(tmp_path / "out" / "_quarantine" / "train" / ANNOTATIONS_FILE)
    assert [a["id"] for a in quarantine["annotations"]] == [102, 103, 105, 107]


def test_polygon_facts_by_hand():
    """Areas by the shoelace formula and IoUs worked out by hand."""
    triangle = [0, 0, 4, 0, 0, 3]  # right triangle, legs 4 and 3: area 6
    square = [10, 10, 12, 10, 12, 12, 10, 12]  # 2 x 2: area 4
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 3], "segmentation": [triangle]},
            # bounds of both parts: [0, 0, 12, 12]; box [0, 0, 6, 12]: IoU 72 / 144 = 0.5
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 6, 12], "segmentation": [triangle, square]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 3], "segmentation": [[0, 0, 4, 0, 0]]},
        ],
    }
    frame = annotation_table(SplitRecords("train", f"train/{ANNOTATIONS_FILE}", coco))[0].frame
    assert frame.loc[0, "polygon_area"] == 6.0 and frame.loc[0, "box_polygon_iou"] == 1.0
    assert frame.loc[0, "polygon_flat_parts"] == 0
    assert frame.loc[1, "polygon_area"] == 10.0 and frame.loc[1, "box_polygon_iou"] == 0.5
    assert frame.loc[2, ["polygon_area", "polygon_flat_parts", "box_polygon_iou"]].isna().all()  # odd count


def test_category_names_that_differ_across_splits_are_warned(tmp_path):
    ds = tmp_path / "ds"
    train = clean_split(ds, "train", n_images=2)  # categories 1 cat, 2 dog
    valid = clean_split(ds, "valid", n_images=2, first_id=10)
    test = clean_split(ds, "test", n_images=2, first_id=20)
    valid["categories"][0]["name"] = " cat "  # the same prompt once stripped: fine
    test["categories"][1]["name"] = "puppy"
    for split, coco in (("train", train), ("valid", valid), ("test", test)):
        write_split(ds, split, coco)

    code, report = run_validate(tmp_path)
    assert code == 0
    assert found(report) == [("category_name_mismatch", W, "test", "categories", 1, 2)]
    assert report["problems"][0]["message"] == (
        "categories[1] (id 2): name 'puppy' differs from 'dog', the name of category id 2 in train; training "
        "prompts with the train split's name and evaluation with this split's: give the id one name in every split"
    )


def test_image_files_shared_between_splits_are_warned_with_the_count(tmp_path, caplog):
    ds = tmp_path / "ds"
    train = clean_split(ds, "train", n_images=3)
    test = clean_split(ds, "test", n_images=3, first_id=20)
    shutil.copyfile(ds / "train" / "img0.png", ds / "test" / "img1.png")  # test image 21 is train image 1
    shutil.copyfile(ds / "train" / "img2.png", ds / "test" / "img2.png")  # test image 22 is train image 3
    write_split(ds, "train", train)
    write_split(ds, "test", test)

    with caplog.at_level(logging.INFO):
        code, report = run_validate(tmp_path)
    assert code == 0
    assert found(report) == [
        ("shared_image_file", W, "test", "images", 1, 21),
        ("shared_image_file", W, "test", "images", 2, 22),
    ]
    assert report["problems"][0]["message"].startswith(
        "images[1] (id 21): test/img1.png has the same bytes as train/img0.png (image id 1 of train): "
    )
    assert "test: 2 image file(s) are also in train (shared_image_file)" in caplog.text
    assert "shared_image_file: 2 warnings" in caplog.text  # the summary's count
    assert report["counts"]["test"]["valid_images"] == 3  # warned, not removed


def test_fewshot_files_share_train_images_by_design_and_are_not_warned(tmp_path):
    ds = tmp_path / "ds"
    write_split(ds, "train", clean_split(ds, "train", n_images=2))
    shutil.copyfile(ds / "train" / ANNOTATIONS_FILE, ds / "train" / "fewshot_train_shot1_seed3.json")
    code, report = run_validate(tmp_path)
    assert code == 0 and report["problems"] == []
