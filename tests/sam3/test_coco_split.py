"""sam3.coco_split: one split's annotation file indexed and checked; sam3.io: the atomic writers."""

import json

import pytest

from sam3.coco import save_coco, split_annotation_path
from sam3.coco_split import CocoSplit
from sam3.errors import DataError
from sam3.io import write_json, write_text


def coco(**overrides):
    data = {
        "images": [
            {"id": 7, "file_name": "b.png", "width": 4, "height": 3},
            {"id": 2, "file_name": "a.png", "width": 4, "height": 3},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 5},
        ],
        "categories": [{"id": 5, "name": "dog"}, {"id": 1, "name": "cat"}],
    }
    return {**data, **overrides}


def test_indexes(tmp_path):
    save_coco(split_annotation_path(tmp_path, "valid"), coco())
    split = CocoSplit.read(tmp_path, "valid")
    assert split.annotation_file == tmp_path / "valid" / "_annotations.coco.json"
    assert split.categories == {1: "cat", 5: "dog"} and list(split.categories) == [1, 5]  # sorted by id
    assert list(split.images) == [7, 2]  # file order
    assert [a["id"] for a in split.annotations[7]] == [1, 2, 3] and split.annotations[2] == []
    assert split.present_categories(7) == [1, 5] and split.present_categories(2) == []  # crowd counts
    assert split.image_path(2) == tmp_path / "valid" / "a.png"
    assert split.data == coco()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"annotations": None}, "'annotations' must be a list"),
        ({"categories": []}, "no categories"),
        ({"categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]}, "needs a unique integer id"),
        ({"categories": [{"id": 1, "name": " "}]}, "needs a unique integer id and a non-empty name"),
        ({"images": [{"id": 7}, {"id": 7}]}, "missing or duplicate integer id"),
        ({"images": [{"id": "7"}]}, "missing or duplicate integer id"),
        ({"annotations": [{"id": 4, "image_id": 8, "category_id": 1}]}, "annotation 4 refers to image id 8"),
        ({"annotations": [{"id": 4, "image_id": 7, "category_id": 9}]}, "has category id 9, which is not in"),
    ],
)
def test_inconsistent_files_are_refused(tmp_path, change, message):
    path = tmp_path / "x.json"
    save_coco(path, coco(**change))
    with pytest.raises(DataError, match=message):
        CocoSplit.load(path)


def test_missing_split_or_file(tmp_path):
    save_coco(split_annotation_path(tmp_path, "train"), coco())
    with pytest.raises(DataError, match="split 'valid' not found; this dataset has train"):
        CocoSplit.read(tmp_path, "valid")
    with pytest.raises(DataError, match="few.json: annotation file not found in split 'train'"):
        CocoSplit.read(tmp_path, "train", "few.json")
    save_coco(tmp_path / "train" / "few.json", coco(images=[{"id": 7}], annotations=[]))
    with pytest.raises(DataError, match="image id 7 has no file_name"):
        CocoSplit.read(tmp_path, "train", "few.json").image_path(7)


def test_writers_are_atomic_and_deterministic(tmp_path):
    path = tmp_path / "deep" / "m.json"
    write_json(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):  # refused before anything is written: the old file stays whole
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5]}
    write_text(tmp_path / "r.md", "# x\n")
    assert (tmp_path / "r.md").read_text() == "# x\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "m.json", "r.md"]  # no temporary file left
