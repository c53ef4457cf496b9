"""Tests for `python -m pipeline validate` and its pipeline.validation modules.

Unit tests cover the pieces without great-expectations (RLE reading, table facts, file checks, the partition);
a few end-to-end runs through `pipeline.cli.main` each break one kind of record in several ways and assert the
exact problem list, the counts identity (valid + quarantined == input), the clean and quarantine contents and
the exit code. Every dataset is written in the test (tiny PNGs, a few records; see broken_datasets).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.validation.files import DEFAULT_MAX_PIXELS, inspect_image
from pipeline.validation.paths import unsafe_reason
from pipeline.validation.problems import Check, Problem, Severity, Table
from pipeline.validation.quarantine import partition_split
from pipeline.validation.records import (
    SplitRecords,
    annotation_table,
    category_table,
    count_non_finite,
    describe,
    image_table,
)
from pipeline.validation.rle import compressed_runs, rle_error
from pipeline.validation.suites import SuiteRunner, category_rules
from sam3.coco import ANNOTATIONS_FILE, encode_mask
from tests.pipeline.broken_datasets import (
    CATEGORIES,
    HEIGHT,
    WIDTH,
    clean_split,
    read_json,
    write_noise,
    write_png,
    write_png_header_only,
    write_split,
    write_truncated_png,
)

pytestmark = pytest.mark.usefixtures("outside_repo")  # stage flags only, not the repository's params.yaml

E, W = "error", "warning"


def run_validate(root: Path, *extra: str) -> tuple[int, dict[str, Any] | None]:
    """Run the CLI on root/ds, writing root/out and root/report.json; returns (exit code, report or None)."""
    report = root / "report.json"
    code = main(["validate", str(root / "ds"), "--out", str(root / "out"), "--report", str(report), *extra])
    return code, read_json(report) if report.exists() else None


def found(report: dict[str, Any]) -> list[tuple]:
    """The report's problems as (check, severity, split, table, index, id) in report order."""
    rows = []
    for p in report["problems"]:
        record_id = next((p[k] for k in ("image_id", "annotation_id", "category_id") if p[k] is not None), None)
        rows.append((p["check"], p["severity"], p["split"], p["table"], p["index"], record_id))
    return rows


def assert_counts_identity(report: dict[str, Any]) -> None:
    for counts in report["counts"].values():
        for table in ("images", "annotations", "categories"):
            assert counts[f"valid_{table}"] + counts[f"quarantined_{table}"] == counts[table]


def reasons(record: dict[str, Any]) -> list[str]:
    return [r["check"] for r in record["_problems"]]


# ---------------------------------------------------------------- RLE


def test_compressed_runs_read_what_pycocotools_writes():
    # 4x5 mask, ones at rows 1-2, columns 1-3. Column-major: col0 0000, col1 0110, col2 0110, col3 0110, col4 0000
    # -> runs 0:4+1=5, 1:2, 0:2, 1:2, 0:2, 1:2, 0:1+4=5 (sum 20 = 4*5)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:4] = True
    rle = encode_mask(mask)
    assert compressed_runs(rle["counts"]) == [5, 2, 2, 2, 2, 2, 5]
    assert rle_error(rle) is None


def test_compressed_runs_decode_delta_and_negative_numbers():
    # "0d0" (pycocotools' string for an all-ones 4x5 mask): '0' - '0' = 0 ends a number: run 0 (no zeros first).
    # 'd' - '0' = 52 = 0b110100: continuation bit 0x20 set, payload 0b10100 = 20; then '0' = 0 ends the number
    # without the sign bit: 20 | 0 << 5 = 20. So runs [0, 20].
    assert compressed_runs("0d0") == [0, 20]
    # From the 4th number on the value is a delta to the number two places before: "1111" -> 1, 1, 1, 1 + 1 = 2
    assert compressed_runs("1111") == [1, 1, 1, 2]
    # '?' = 15 = 0b01111: no continuation, sign bit 0x10 clear -> 15; 'O' = 31 = 0b11111: sign set -> 31 - 32 = -1
    assert compressed_runs("?") == [15]
    assert compressed_runs("O") == [-1]


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        ({"size": [4, 5], "counts": [3, 17]}, None),
        ({"size": [4, 5], "counts": "0d0"}, None),
        ({"size": [4, 5], "counts": ""}, "run lengths add up to 0 pixels but size 4x5 has 20"),
        ({"size": [4, 5], "counts": [3, 2]}, "run lengths add up to 5 pixels but size 4x5 has 20"),
        ({"size": [4, 5], "counts": [30, -10]}, "run 1 has negative length -10"),
        ({"size": [4, 5], "counts": "abc"}, "compressed counts: the string ends in the middle of a number"),
        ({"size": [4, 5], "counts": "0d0z"}, "compressed counts: character 'z' at position 3 is not"),
        ({"size": [4, 5], "counts": [3.5, 16.5]}, "counts must be a compressed RLE string or a list of integer"),
        ({"size": [4], "counts": [20]}, "size must be [height, width]"),
        ({"counts": [20]}, "size must be [height, width]"),
    ],
)
def test_rle_error(segmentation, expected):
    error = rle_error(segmentation)
    if expected is None:
        assert error is None
    else:
        assert error is not None and error.startswith(expected)


# ---------------------------------------------------------------- records


def test_describe_and_count_non_finite():
    assert describe(3) == "int" and describe(True) == "bool" and describe(None) == "null"
    assert describe("a") == "str" and describe(2.5) == "float" and describe({"a": 1}) == "object"
    assert describe([1, 2.5, 3, 4]) == "list of 4 numbers"
    assert describe([]) == "empty list"
    assert describe([[1, 2], [3.0]]) == "list of number lists"
    assert describe([1, "2"]) == "list of int, str"
    assert describe([True, 1]) == "list of bool, int"  # true is not a number
    nan, inf = float("nan"), float("inf")
    assert count_non_finite({"bbox": [nan, 1, inf, -inf], "area": 2.0, "s": [[1, nan]], "n": "NaN"}) == 4


def split_of(coco: dict[str, Any], split: str = "train") -> SplitRecords:
    return SplitRecords(split=split, file=f"{split}/{ANNOTATIONS_FILE}", data=coco)


def test_annotation_table_facts():
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}, {"id": 1, "width": 8, "height": 8}],
        "categories": [],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [28, 1, 10, 3]},  # x + w - W = 38 - 32 = 6
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [-1.5, 2, 4, 4]},  # -x = 1.5
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 2, 0, 4]},  # no area: overhang not applicable
            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [2, 2, 4, 4]},  # unknown image: no size
            {"id": 5, "image_id": 1, "bbox": [2, 2, 4, float("nan")], "segmentation": [[1, 2, 3, 4, 5, 6], [1, 2, 3]]},
            {"id": 6, "image_id": 1, "bbox": "x", "segmentation": {"size": [24, 32], "counts": [768]}},
            "not an object",
        ],
    }
    table, problems = annotation_table(split_of(coco))
    frame = table.frame
    assert list(frame.index) == [0, 1, 2, 3, 4, 5]  # positions in the JSON list; item 6 is not a row
    assert [(p.check, p.index) for p in problems] == [(Check.WRONG_TYPE, 6)]
    assert frame.loc[0, "box_overhang"] == 6.0 and frame.loc[0, "box_min_side"] == 3.0
    assert frame.loc[1, "box_overhang"] == 1.5
    assert frame.loc[2, "box_min_side"] == 0.0 and math.isnan(frame.loc[2, "box_overhang"])
    assert math.isnan(frame.loc[3, "box_overhang"]) and frame.loc[3, "image_hw"] is None
    # the first image with id 1 owns it: its 32x24, not the later duplicate's 8x8
    assert frame.loc[0, "image_hw"] == "24, 32"
    assert math.isnan(frame.loc[4, "box_min_side"]) and frame.loc[4, "non_finite"] == 1
    assert frame.loc[4, "polygon_min_coords"] == 3 and frame.loc[4, "polygon_odd_count"] == 1
    assert frame.loc[4, "category_id_type"] is None and frame.loc[5, "bbox_type"] == "str"
    assert frame.loc[5, "rle_error"] is None and frame.loc[5, "rle_hw"] == "24, 32"
    assert frame.loc[0, "id"] == 1 and frame.loc[0, "id_int"] == 1.0


def test_image_and_category_tables_keep_raw_values_and_typed_ints():
    coco = {
        "images": [{"id": "7", "file_name": "a.png", "width": 32.0, "height": 24}, {"id": 2, "width": None}],
        "annotations": [],
        "categories": [{"id": 1, "name": "  cat "}, {"id": True, "name": 5}],
    }
    images, _ = image_table(split_of(coco))
    assert images.frame.loc[0, "id"] == "7" and math.isnan(images.frame.loc[0, "id_int"])
    assert images.frame.loc[0, "width_type"] == "float" and math.isnan(images.frame.loc[0, "width_int"])
    assert images.frame.loc[1, "width_type"] == "null" and images.frame.loc[1, "file_name_type"] is None
    categories, _ = category_table(split_of(coco))
    assert categories.frame.loc[0, "name_key"] == "cat"
    assert categories.frame.loc[1, "id_type"] == "bool" and categories.frame.loc[1, "name_key"] is None


def test_suite_maps_failures_back_to_list_positions():
    # item 1 is not an object, so the table skips position 1: failures must still name positions 2 and 4
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}, "x", {"id": 1, "name": "dog"}, {"id": 2, "name": ""}, {"id": 3}],
    }
    table, problems = category_table(split_of(coco))
    problems += SuiteRunner().check(table, category_rules())
    assert sorted((p.index, p.check, p.record_id) for p in problems) == [
        (1, Check.WRONG_TYPE, None),
        (2, Check.DUPLICATE_ID, 1),  # the first record (position 0) keeps id 1
        (3, Check.EMPTY_NAME, 2),
        (4, Check.MISSING_KEY, 3),
    ]


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("img.png", None),
        ("sub/img.png", None),
        ("..hidden.png", None),  # a name starting with dots is not a parent reference
        ("/etc/passwd", "is an absolute path"),
        ("C:\\images\\a.png", "is an absolute path"),
        ("../other/a.png", "has a '..' part"),
        ("sub/../../a.png", "has a '..' part"),
        ("sub\\..\\..\\a.png", "has a '..' part"),
    ],
)
def test_unsafe_reason(name, expected):
    assert unsafe_reason(name) == expected


def test_inspect_image(tmp_path):
    assert inspect_image(write_png(tmp_path / "ok.png"), WIDTH, HEIGHT, DEFAULT_MAX_PIXELS) is None
    assert inspect_image(tmp_path / "none.png", WIDTH, HEIGHT, DEFAULT_MAX_PIXELS)[0] == Check.FILE_MISSING
    (tmp_path / "folder.png").mkdir()
    assert inspect_image(tmp_path / "folder.png", 1, 1, DEFAULT_MAX_PIXELS)[0] == Check.FILE_MISSING
    (tmp_path / "text.png").write_text("not an image")
    assert inspect_image(tmp_path / "text.png", 1, 1, DEFAULT_MAX_PIXELS)[0] == Check.NOT_AN_IMAGE
    check, reason = inspect_image(write_png(tmp_path / "small.png", 16, 16), WIDTH, HEIGHT, DEFAULT_MAX_PIXELS)
    assert check == Check.IMAGE_SIZE_MISMATCH and reason.startswith("is 16x16 but the annotation file says width 32")
    # sizes are not compared when the record has none
    assert inspect_image(tmp_path / "small.png", None, None, DEFAULT_MAX_PIXELS) is None
    assert inspect_image(write_truncated_png(tmp_path / "cut.png"), WIDTH, HEIGHT, DEFAULT_MAX_PIXELS)[0] == (
        Check.TRUNCATED_IMAGE
    )
    # JPEG's verify() checks nothing; only the full load finds the missing data
    jpeg = write_noise(tmp_path / "cut.jpg", 64, 64, "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) * 6 // 10])
    assert inspect_image(jpeg, 64, 64, DEFAULT_MAX_PIXELS)[0] == Check.TRUNCATED_IMAGE
    # 32 x 24 = 768 pixels: over a limit of 767, not over 768
    assert inspect_image(tmp_path / "ok.png", WIDTH, HEIGHT, 767)[0] == Check.IMAGE_TOO_LARGE
    assert inspect_image(tmp_path / "ok.png", WIDTH, HEIGHT, 768) is None


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    bomb = write_png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    check, reason = inspect_image(bomb, 20_000, 20_000, DEFAULT_MAX_PIXELS)
    assert check == Check.IMAGE_TOO_LARGE
    assert reason.startswith("is 20000x20000 = 400,000,000 pixels, over the limit of 100,000,000")
    # Allowed through, the same file fails only when decoded: so the limit was applied before any decoding.
    assert inspect_image(bomb, 20_000, 20_000, 10**9)[0] == Check.TRUNCATED_IMAGE


# ---------------------------------------------------------------- partition


def test_partition_takes_annotations_with_bad_images_and_categories_only():
    coco = {
        "images": [{"id": 1}, {"id": 2}, {"id": 2}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1},  # bad itself: goes alone
            {"id": 11, "image_id": 1, "category_id": 1},  # image 1 is fine: stays
            {"id": 12, "image_id": 2, "category_id": 1},  # image 2's owner is images[1], which is bad: goes
            {"id": 13, "image_id": 1, "category_id": 2},  # category 2 is quarantined: goes
            7,
        ],
    }
    split = split_of(coco)

    def problem(check: Check, table: Table, index: int, severity: Severity = Severity.ERROR) -> Problem:
        return Problem(check, severity, "m", split="train", table=table, index=index)

    problems = [
        problem(Check.NON_FINITE, Table.ANNOTATIONS, 0),
        problem(Check.FILE_MISSING, Table.IMAGES, 1),
        problem(Check.DUPLICATE_ID, Table.IMAGES, 2),
        problem(Check.DUPLICATE_CATEGORY_NAME, Table.CATEGORIES, 1),
        problem(Check.WRONG_TYPE, Table.ANNOTATIONS, 4),
        problem(Check.EMPTY_CATEGORY, Table.CATEGORIES, 0, Severity.WARNING),  # a warning keeps its record
        Problem(Check.FILE_MISSING, Severity.ERROR, "other split", split="valid", table=Table.IMAGES, index=0),
    ]
    outcome = partition_split(split, problems)
    assert outcome.valid[Table.IMAGES] == [{"id": 1}]
    assert [q["id"] for q in outcome.quarantined[Table.IMAGES]] == [2, 2]
    assert [a["id"] for a in outcome.valid[Table.ANNOTATIONS]] == [11]
    quarantined = outcome.quarantined[Table.ANNOTATIONS]
    assert [(q.get("id"), reasons(q)) for q in quarantined] == [
        (10, ["non_finite"]),
        (12, ["image_quarantined"]),
        (13, ["category_quarantined"]),
        (None, ["wrong_type"]),
    ]
    assert quarantined[3]["_record"] == 7
    assert quarantined[1]["_problems"][0]["message"] == (
        "annotations[2] (id 12): quarantined with its image images[1] (id 2) (file_missing)"
    )
    assert outcome.valid[Table.CATEGORIES] == [{"id": 1, "name": "cat"}]
    assert [(p.check, p.index) for p in outcome.consequences] == [
        (Check.IMAGE_QUARANTINED, 2),
        (Check.CATEGORY_QUARANTINED, 3),
    ]
    for table in Table:  # nothing lost
        assert len(outcome.valid[table]) + len(outcome.quarantined[table]) == len(coco[str(table)])


# ---------------------------------------------------------------- end to end


def test_clean_dataset_passes_and_is_copied_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.validate")
    ds = tmp_path / "ds"
    inputs = {split: clean_split(ds, split, n_images=2) for split in ("train", "valid", "test")}
    # legal: an image without annotations (a negative) and keys validate does not know (preprocess adds these)
    write_png(ds / "train" / "empty.png")
    inputs["train"]["images"].append(
        {"id": 3, "file_name": "empty.png", "width": WIDTH, "height": HEIGHT, "orig_width": 64, "orig_height": 48}
    )
    for split, coco in inputs.items():
        write_split(ds, split, coco)
    code, report = run_validate(tmp_path)
    assert code == 0
    assert report["ok"] is True and report["usable"] is True and report["problems"] == []
    assert report["counts"]["train"] == {
        "images": 3,
        "annotations": 2,
        "categories": 2,
        "valid_images": 3,
        "valid_annotations": 2,
        "valid_categories": 2,
        "quarantined_images": 0,
        "quarantined_annotations": 0,
        "quarantined_categories": 0,
    }
    out = tmp_path / "out"
    for split, coco in inputs.items():
        assert read_json(out / split / ANNOTATIONS_FILE) == coco  # info, licenses and every record kept as is
        for image in coco["images"]:
            source, copy = ds / split / image["file_name"], out / split / image["file_name"]
            assert os.stat(source).st_ino == os.stat(copy).st_ino  # hard link: same filesystem
    assert list((out / "_quarantine").iterdir()) == []
    assert "train: 3/3 images, 2/2 annotations, 2/2 categories kept" in caplog.text
    assert "no problems found" in caplog.text

    # a second run replaces its own earlier output and writes the same bytes
    first = (tmp_path / "report.json").read_bytes(), (out / "train" / ANNOTATIONS_FILE).read_bytes()
    assert run_validate(tmp_path)[0] == 0
    assert ((tmp_path / "report.json").read_bytes(), (out / "train" / ANNOTATIONS_FILE).read_bytes()) == first


def test_image_checks(tmp_path):
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=8)  # images ids 1..8 = img0..img7.png, annotation 101..108 on each
    images = coco["images"]
    images[1]["width"] = 0  # id 2
    images[2]["file_name"] = "../img0.png"  # id 3: escapes the split folder (the file exists there)
    images[3]["file_name"] = "gone.png"  # id 4
    (ds / "train" / "img4.png").write_text("not an image")  # id 5
    write_truncated_png(ds / "train" / "img5.png")  # id 6
    write_png(ds / "train" / "img6.png", 16, 16)  # id 7: JSON says 32x24
    images.append({"id": 8, "file_name": "img7.png", "width": WIDTH, "height": HEIGHT})  # [8] duplicate id
    images.append({"id": "9", "width": WIDTH, "height": HEIGHT})  # [9] no file_name, id a string
    images.append(5)  # [10] not an object
    write_png_header_only(ds / "train" / "bomb.png", 20_000, 20_000)
    images.append({"id": 12, "file_name": "bomb.png", "width": 20_000, "height": 20_000})  # [11]
    write_png(ds / "img0.png")  # what ../img0.png points at
    write_split(ds, "train", coco)

    code, report = run_validate(tmp_path)
    assert code == 0  # errors were quarantined and the rest is usable
    assert found(report) == [
        ("non_positive_size", E, "train", "images", 1, 2),
        ("unsafe_file_name", E, "train", "images", 2, 3),
        ("file_missing", E, "train", "images", 3, 4),
        ("not_an_image", E, "train", "images", 4, 5),
        ("truncated_image", E, "train", "images", 5, 6),
        ("image_size_mismatch", E, "train", "images", 6, 7),
        ("duplicate_file_name", E, "train", "images", 8, 8),  # it also names img7.png, images[7]'s file
        ("duplicate_id", E, "train", "images", 8, 8),
        ("missing_key", E, "train", "images", 9, "9"),
        ("wrong_type", E, "train", "images", 9, "9"),
        ("wrong_type", E, "train", "images", 10, None),
        ("image_too_large", E, "train", "images", 11, 12),
    ]
    messages = {(p["check"], p["index"]): p for p in report["problems"]}
    assert messages[("missing_key", 9)]["message"] == (
        "images[9] (id '9'): required key 'file_name' is missing; add it (a string: the image path inside the "
        "split folder)"
    )
    assert messages[("wrong_type", 9)]["message"] == "images[9] (id '9'): id must be an integer, got str '9'"
    assert messages[("file_missing", 3)]["file"] == "train/gone.png"
    assert messages[("non_positive_size", 1)]["file"] == f"train/{ANNOTATIONS_FILE}"
    assert messages[("duplicate_id", 8)]["message"].startswith(
        "images[8] (id 8): id 8 is already used by images[7]; the first record keeps it"
    )
    assert report["counts"]["train"] == {
        "images": 12,
        "annotations": 8,
        "categories": 2,
        "valid_images": 2,  # ids 1 and 8 (the first record with id 8)
        "valid_annotations": 2,  # 101 on image 1 and 108 on image 8 (owned by the valid first record)
        "valid_categories": 2,
        "quarantined_images": 10,
        "quarantined_annotations": 6,  # 102..107 went with their images
        "quarantined_categories": 0,
    }
    out = tmp_path / "out"
    clean = read_json(out / "train" / ANNOTATIONS_FILE)
    assert [i["id"] for i in clean["images"]] == [1, 8]
    assert [a["id"] for a in clean["annotations"]] == [101, 108]
    assert sorted(p.name for p in (out / "train").iterdir()) == [ANNOTATIONS_FILE, "img0.png", "img7.png"]
    quarantine = read_json(out / "_quarantine" / "train" / ANNOTATIONS_FILE)
    assert [reasons(i) for i in quarantine["images"]] == [
        ["non_positive_size"],
        ["unsafe_file_name"],
        ["file_missing"],
        ["not_an_image"],
        ["truncated_image"],
        ["image_size_mismatch"],
        ["duplicate_file_name", "duplicate_id"],
        ["missing_key", "wrong_type"],
        ["wrong_type"],
        ["image_too_large"],
    ]
    assert [(a["id"], reasons(a)) for a in quarantine["annotations"]] == [
        (i, ["image_quarantined"]) for i in range(102, 108)
    ]
    assert quarantine["categories"] == [] and quarantine["info"] == coco["info"]
    # files that exist under a safe name are placed next to the quarantine (not ../img0.png, gone.png)
    placed = sorted(p.name for p in (out / "_quarantine" / "train").iterdir())
    assert placed == [ANNOTATIONS_FILE, "bomb.png", "img1.png", "img4.png", "img5.png", "img6.png", "img7.png"]

    assert run_validate(tmp_path, "--strict")[0] == 1


def test_annotation_checks(tmp_path):
    ds = tmp_path / "ds"
    coco = clean_split(ds, "train", n_images=2)  # images 1, 2 (32 x 24); annotations 101, 102
    nan, inf = float("nan"), float("inf")

    def ann(i: int, **fields: Any) -> dict[str, Any]:
        return {"id": i, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], **fields}

    ones = np.ones((HEIGHT, WIDTH), dtype=bool)
    coco["annotations"] += [
        ann(101),  # [2] duplicate id
        {"id": 203, "image_id": 1, "category_id": 1},  # [3] no bbox
        ann(204, bbox="2,3,10,8"),  # [4]
        ann(205, bbox=[2, 3, 10]),  # [5]
        ann(206, image_id=99),  # [6]
        ann(207, category_id=9),  # [7]
        ann(208, bbox=[1, 1, 0, 5]),  # [8]
        ann(209, bbox=[25, 2, 8, 4]),  # [9] 25 + 8 - 32 = 1 px out: within the 1 px tolerance, valid
        ann(210, bbox=[25, 2, 9, 4]),  # [10] 25 + 9 - 32 = 2 px out
        ann(211, bbox=[-2, 2, 4, 4]),  # [11] -x = 2 px out
        ann(212, bbox=[1, 1, inf, 2]),  # [12]
        ann(213, area=nan),  # [13]
        ann(214, segmentation=[[1, 2, nan, 4, 5, 6]]),  # [14]
        ann(215, segmentation=[[1, 2, 3, 4, 5, 6, 7]]),  # [15] odd
        ann(216, segmentation=[[1, 2, 3, 4, 5, 6], [1, 2, 3, 4]]),  # [16] 4 < 6
        ann(217, segmentation={"size": [HEIGHT, WIDTH], "counts": "abc"}),  # [17]
        ann(218, segmentation=encode_mask(ones), bbox=[0.0, 0.0, 32.0, 24.0]),  # [18] string counts, float bbox: valid
        ann(219, segmentation=encode_mask(np.ones((10, 10), dtype=bool))),  # [19]
        ann(220, segmentation={"size": [HEIGHT, WIDTH], "counts": [0, HEIGHT * WIDTH]}, iscrowd=1),  # [20] valid
        ann(221, segmentation="polygon"),  # [21]
        ann(222, image_id=True),  # [22]
        "annotation",  # [23]
        ann(224, score=0.5, attributes={"occluded": False}, bbox=[1.5, 2.25, 3.0, 4.0]),  # [24] extra keys: valid
    ]
    write_split(ds, "train", coco)

    code, report = run_validate(tmp_path)
    assert code == 0
    a = "annotations"
    assert found(report) == [
        ("duplicate_id", E, "train", a, 2, 101),
        ("missing_key", E, "train", a, 3, 203),
        ("wrong_type", E, "train", a, 4, 204),
        ("wrong_type", E, "train", a, 5, 205),
        ("unknown_image", E, "train", a, 6, 206),
        ("unknown_category", E, "train", a, 7, 207),
        ("box_not_positive", E, "train", a, 8, 208),
        ("box_outside_image", E, "train", a, 10, 210),
        ("box_outside_image", E, "train", a, 11, 211),
        ("non_finite", E, "train", a, 12, 212),
        ("non_finite", E, "train", a, 13, 213),
        ("non_finite", E, "train", a, 14, 214),
        ("bad_polygon", E, "train", a, 15, 215),
        ("bad_polygon", E, "train", a, 16, 216),
        ("bad_rle", E, "train", a, 17, 217),
        ("rle_size_mismatch", E, "train", a, 19, 219),
        ("wrong_type", E, "train", a, 21, 221),
        ("wrong_type", E, "train", a, 22, 222),
        ("wrong_type", E, "train", a, 23, None),
    ]
    messages = {p["index"]: p["message"] for p in report["problems"]}
    assert (
        messages[5] == "annotations[5] (id 205): bbox must be [x, y, width, height] (4 numbers), got list of 3 numbers"
    )
    assert messages[10] == (
        "annotations[10] (id 210): bbox [25, 2, 9, 4] reaches 2 px outside its image (height, width = 24, 32; "
        "tolerance 1 px)"
    )
    assert messages[15].startswith("annotations[15] (id 215): 1 polygon(s) with an odd number of coordinates")
    assert messages[16].startswith("annotations[16] (id 216): a polygon has 4 coordinates")
    assert messages[19].startswith("annotations[19] (id 219): RLE size is [10, 10] but its image is [24, 32]")
    c = report["counts"]["train"]
    assert (c["annotations"], c["valid_annotations"], c["quarantined_annotations"]) == (25, 6, 19)
    assert (c["valid_images"], c["quarantined_images"]) == (2, 0)  # bad annotations never take their image
    out = tmp_path / "out"
    clean = read_json(out / "train" / ANNOTATIONS_FILE)
    assert [x["id"] for x in clean["annotations"]] == [101, 102, 209, 218, 220, 224]
    assert clean["annotations"][5] == coco["annotations"][24]  # extra keys kept
    quarantine = (out / "_quarantine" / "train" / ANNOTATIONS_FILE).read_text()
    assert "NaN" in quarantine and "Infinity" in quarantine  # rejected as found, non-finite numbers included
    rejected = json.loads(quarantine)["annotations"]
    assert [x.get("id", x.get("_record")) for x in rejected] == [
        101, 203, 204, 205, 206, 207, 208, 210, 211, 212, 213, 214, 215, 216, 217, 219, 221, 222, "annotation"
    ]  # fmt: skip
    assert rejected[0]["bbox"] == [2, 3, 10, 8] and reasons(rejected[0]) == ["duplicate_id"]
    assert rejected[-1] == {"_record": "annotation", "_problems": rejected[-1]["_problems"]}
    assert json.loads(quarantine)["images"] == [] and len(list((out / "_quarantine" / "train").iterdir())) == 1


def test_category_checks_across_splits(tmp_path):
    ds = tmp_path / "ds"
    train = clean_split(ds, "train", n_images=2)  # annotations 101 (cat), 102 (dog)
    train["categories"] += [
        {"id": 3, "name": " cat"},  # [2] same prompt as "cat" once stripped
        {"id": 2, "name": "bird"},  # [3] duplicate id: "dog" keeps 2
        {"id": 4, "name": "  "},  # [4]
        {"id": 5},  # [5]
        {"name": "fish"},  # [6]
        {"id": 6, "name": "eel"},  # [7] valid, but no annotation anywhere
        {"id": 7, "name": 7},  # [8]
        {"id": 8, "name": ""},  # [9] a second blank name is not a duplicate of [4]
    ]
    train["annotations"] += [
        {"id": 103, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},  # goes with category 3
        {"id": 104, "image_id": 2, "category_id": 2, "bbox": [1, 1, 2, 2]},  # category 2 is dog's: stays
    ]
    write_split(ds, "train", train)
    valid = clean_split(ds, "valid", n_images=1, first_id=50)
    write_split(ds, "valid", valid)

    code, report = run_validate(tmp_path)
    assert code == 0
    c = "categories"
    assert found(report) == [
        ("duplicate_category_name", E, "train", c, 2, 3),
        ("duplicate_id", E, "train", c, 3, 2),
        ("empty_name", E, "train", c, 4, 4),
        ("missing_key", E, "train", c, 5, 5),
        ("missing_key", E, "train", c, 6, None),
        ("wrong_type", E, "train", c, 8, 7),
        ("empty_name", E, "train", c, 9, 8),
        ("empty_category", W, None, c, None, 6),
    ]
    warning = report["problems"][-1]
    assert warning["message"].startswith("category 6 'eel' has no valid annotation in any split")
    assert report["ok"] is False  # errors, though exit 0
    assert_counts_identity(report)
    assert report["counts"]["train"]["valid_categories"] == 3  # cat, dog, eel
    out = tmp_path / "out"
    clean = read_json(out / "train" / ANNOTATIONS_FILE)
    assert clean["categories"] == [*CATEGORIES, {"id": 6, "name": "eel"}]
    assert [x["id"] for x in clean["annotations"]] == [101, 102, 104]
    quarantine = read_json(out / "_quarantine" / "train" / ANNOTATIONS_FILE)
    assert [(x["id"], reasons(x)) for x in quarantine["annotations"]] == [(103, ["category_quarantined"])]
    assert [x.get("id") for x in quarantine["categories"]] == [3, 2, 4, 5, None, 7, 8]
    assert not (out / "_quarantine" / "valid").exists()  # nothing quarantined there
    assert read_json(out / "valid" / ANNOTATIONS_FILE) == valid


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda ds: None, "dataset folder does not exist"),
        (lambda ds: ds.mkdir(), "no split found"),
        (
            lambda ds: write_text(ds, '{\n "images": [],\n "annotations": [}\n'),
            "_annotations.coco.json:3:18: invalid JSON",
        ),
        (lambda ds: write_text(ds, "[]"), "top level must be a JSON object"),
        (lambda ds: write_text(ds, '{"annotations": [], "categories": []}'), "top-level 'images' must be a list"),
        (lambda ds: write_text(ds, '{"images": {}, "annotations": [], "categories": []}'), "found object"),
    ],
)
def test_unreadable_dataset_exits_2_with_one_line(tmp_path, capsys, setup, expected):
    setup(tmp_path / "ds")
    code, report = run_validate(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and report is None and not (tmp_path / "out").exists()
    error_lines = [line for line in err if line.startswith("error: ")]
    assert len(error_lines) == 1 and expected in error_lines[0]
    assert "Traceback" not in "\n".join(err)


def write_text(ds: Path, text: str) -> None:
    (ds / "train").mkdir(parents=True)
    (ds / "train" / ANNOTATIONS_FILE).write_text(text)


def test_unusable_clean_dataset_exits_1(tmp_path, caplog):
    ds = tmp_path / "ds"
    write_split(ds, "train", clean_split(ds, "train", n_images=2))
    valid = clean_split(ds, "valid", n_images=1)
    write_split(ds, "valid", valid)
    # 32 x 24 = 768 pixels per image: a limit of 700 quarantines every image, so no split keeps one
    code, report = run_validate(tmp_path, "--max-pixels", "700")
    assert code == 1
    assert [p[0] for p in found(report)] == ["image_too_large"] * 3 + ["empty_category"] * 2
    assert report["usable"] is False and report["ok"] is False
    assert report["unusable_reasons"] == [
        "split train has no valid image (2 quarantined)",
        "split valid has no valid image (1 quarantined)",
        "no valid annotation in any split (3 quarantined)",
    ]
    assert "exit 1: split train has no valid image" in caplog.text
    assert_counts_identity(report)


def test_out_folder_that_is_not_validate_output_is_refused(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_split(ds, "train", clean_split(ds, "train"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert run_validate(tmp_path) == (2, None)
    assert "is not empty and is not an earlier validate output" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    code = main(["validate", str(ds), "--out", str(ds / "clean"), "--report", str(tmp_path / "r.json")])
    assert code == 2 and "overlaps the dataset" in capsys.readouterr().err
    assert run_validate(tmp_path, "--max-pixels", "0")[0] == 2


# ---------------------------------------------------------------- few-shot files of the train split


def test_fewshot_files_are_checked_against_train_carried_and_missing_seeds_drawn(tmp_path, caplog):
    """train: ids 1..4 = img0..img3.png, annotation 100 + id on each, category 1 (cat) on ids 1 and 3, 2 (dog) on
    ids 2 and 4. The dataset ships fewshot_train_shot1_seed3.json with image 1 (fine), image 2 named img0.png (the
    train split's image 2 is img1.png) and image 7 (no such train image); seed 30's file is absent and is drawn:
    default_rng(30).permutation(4) + 1 = [1, 2, 4, 3]; k = 1: image 1 takes cat (101), image 2 dog (102), done."""
    caplog.set_level(logging.INFO, logger="pipeline.validate")
    ds = tmp_path / "ds"
    train = clean_split(ds, "train", n_images=4)
    for split in ("train", "valid", "test"):
        write_split(ds, split, train if split == "train" else clean_split(ds, split))
    fewshot = {
        **train,
        "images": [
            train["images"][0],
            {"id": 2, "file_name": "img0.png", "width": WIDTH, "height": HEIGHT},
            {"id": 7, "file_name": "img3.png", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": [train["annotations"][0], train["annotations"][1], {**train["annotations"][3], "id": 999}],
    }
    fewshot["annotations"][2]["image_id"] = 7
    (ds / "train" / "fewshot_train_shot1_seed3.json").write_text(json.dumps(fewshot), encoding="utf-8")

    code, report = run_validate(tmp_path, "--fewshot-seeds", "3", "30", "--fewshot-k", "1")
    assert code == 0  # the bad records are quarantined; every file keeps something
    label = "train/fewshot_train_shot1_seed3.json"
    assert [f for f in found(report) if f[2] == label] == [
        ("duplicate_file_name", E, label, "images", 1, 2),  # img0.png is images[0]'s file too
        ("not_in_train", E, label, "images", 1, 2),
        ("not_in_train", E, label, "images", 2, 7),
    ]
    messages = [p["message"] for p in report["problems"] if p["split"] == label]
    assert "file_name 'img0.png' differs from 'img1.png', the train split's image id 2" in messages[1]
    assert "image id 7 is not a valid image of the train split (train/_annotations.coco.json)" in messages[2]
    assert report["counts"][label] == {
        "images": 3,
        "annotations": 3,
        "categories": 2,
        "valid_images": 1,
        "valid_annotations": 1,
        "valid_categories": 2,
        "quarantined_images": 2,
        "quarantined_annotations": 2,  # 102 and 999 go with their images
        "quarantined_categories": 0,
    }
    assert report["counts"]["train"]["valid_images"] == 4  # the split itself is untouched
    drawn = "train/fewshot_train_shot1_seed30.json"
    assert report["fewshot"] == {
        label: {"source": "dataset", "images": 1, "annotations": 1},
        drawn: {"source": "generated", "images": 2, "annotations": 2, "below_k": {}},
    }

    out = tmp_path / "out"
    carried = read_json(out / label)
    assert carried["images"] == [train["images"][0]] and carried["annotations"] == [train["annotations"][0]]
    assert carried["info"] == train["info"]  # top-level keys kept
    quarantined = read_json(out / "_quarantine" / label)
    assert [(i["id"], [p["check"] for p in i["_problems"]]) for i in quarantined["images"]] == [
        (2, ["duplicate_file_name", "not_in_train"]),
        (7, ["not_in_train"]),
    ]
    assert [a["id"] for a in quarantined["annotations"]] == [102, 999]
    generated = read_json(out / drawn)
    assert [i["id"] for i in generated["images"]] == [1, 2]
    assert [a["id"] for a in generated["annotations"]] == [101, 102]
    assert generated["info"]["fewshot"] == {"k": 1, "seed": 30, "rule": generated["info"]["fewshot"]["rule"]}
    assert f"{drawn}: not in the dataset; generated from the clean train split" in caplog.text


def test_fewshot_files_need_a_train_split_and_a_file_without_valid_image_is_unusable(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_split(ds, "valid", clean_split(ds, "valid"))
    assert run_validate(tmp_path, "--fewshot-seeds", "3") == (2, None)
    assert (
        "train/_annotations.coco.json: not found, but --fewshot-seeds need the train split" in capsys.readouterr().err
    )

    train = clean_split(ds, "train", n_images=2)
    write_split(ds, "train", train)
    only_bad = {**train, "images": [{"id": 9, "file_name": "img0.png", "width": WIDTH, "height": HEIGHT}]}
    (ds / "train" / "fewshot_train_shot10_seed3.json").write_text(json.dumps(only_bad), encoding="utf-8")
    code, report = run_validate(tmp_path)  # no --fewshot-seeds: the file is still checked and carried
    assert code == 1
    assert report["unusable_reasons"] == ["train/fewshot_train_shot10_seed3.json has no valid image (1 quarantined)"]
    assert report["fewshot"] == {
        "train/fewshot_train_shot10_seed3.json": {"source": "dataset", "images": 0, "annotations": 0}
    }
