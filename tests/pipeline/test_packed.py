"""The packed reader and writer of validation (pipeline.validation.packed) against json and save_coco.

read_packed must give the records load_coco gives (and its errors); write_packed must write the bytes save_coco
writes. Both are checked on files the test writes, with the awkward parts of real exports: NaN, non-ASCII text,
items that are not objects, a repeated key, annotations before images, empty lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.validation.packed import PackedRecords, read_packed, write_packed
from sam3.coco import load_coco, save_coco
from sam3.errors import DataError

AWKWARD = (
    '{"annotations" : [ {"id": 1, "bbox": [1.5, 2, 3e2, 4], "segmentation": [[1.25, 2, 3, 4, 5, 6]]},\n'
    '  5, "text", null, [1, [2]], {"id": 2, "area": NaN, "note": "caf\\u00e9 \u732b \U0001f431", "id": 3},'
    ' {"nested": {"a": [{}, []], "b": -0.0, "c": 1e-7}} ],\n'
    ' "images": [{"id": 1, "file_name": "\u732b.png"}], "info": {"year": 2026}, "categories": [],'
    ' "info": {"year": 2027}, "licenses": [] }\n'
)


def test_read_packed_gives_what_json_gives(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(AWKWARD, encoding="utf-8")
    packed, plain = read_packed(path), load_coco(path)
    assert isinstance(packed["annotations"], PackedRecords)
    assert len(packed["annotations"]) == 7
    assert json.dumps(list(packed["annotations"])) == json.dumps(plain["annotations"])  # NaN, -0.0, order kept
    assert packed["annotations"][5]["id"] == 3  # a repeated key: the last value, as json keeps it
    assert {k: v for k, v in packed.items() if k != "annotations"} == {
        k: v for k, v in plain.items() if k != "annotations"
    }
    assert packed["info"] == {"year": 2027}
    subset = packed["annotations"].subset([6, 0])
    assert [record["id"] if isinstance(record, dict) and "id" in record else None for record in subset] == [None, 1]
    assert packed["annotations"][1:3] == [5, "text"]


def test_empty_and_missing_annotations(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"images": [], "annotations": [ ], "categories": []}')
    assert read_packed(path) == {"images": [], "annotations": PackedRecords([]), "categories": []}
    path.write_text("{ }")
    assert read_packed(path) == {}
    path.write_text('{"annotations": {"not": "a list"}}')  # left to the caller's checks, as load_coco does
    assert read_packed(path) == {"annotations": {"not": "a list"}}


@pytest.mark.parametrize(
    "text",
    [
        '{"images": [], "annotations": [1, 2,], "categories": []}',  # trailing comma
        '{"images": [], "annotations": [1 2], "categories": []}',
        '{"images": []} {"extra": 1}',  # trailing data
        "[]",
        "\ufeff{}",  # byte-order mark
        "",
        '{"images": [], "annotations": [',  # cut off
    ],
)
def test_errors_are_load_cocos(tmp_path, text):
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as expected:
        load_coco(path)
    with pytest.raises(DataError) as actual:
        read_packed(path)
    assert str(actual.value) == str(expected.value)


def test_invalid_utf8_and_missing_file_are_load_cocos(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'{"images": ["\xff"]}')
    for target in (path, tmp_path / "missing.json"):
        with pytest.raises(DataError) as expected:
            load_coco(target)
        with pytest.raises(DataError) as actual:
            read_packed(target)
        assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("allow_nan", [False, True])
def test_write_packed_writes_save_cocos_bytes(tmp_path, allow_nan):
    source = tmp_path / "a.json"
    source.write_text(AWKWARD.replace("NaN", "1.0" if not allow_nan else "NaN"), encoding="utf-8")
    data = read_packed(source)
    write_packed(tmp_path / "packed.json", data, allow_nan=allow_nan)
    save_coco(tmp_path / "saved.json", load_coco(source), allow_nan=allow_nan)
    assert (tmp_path / "packed.json").read_bytes() == (tmp_path / "saved.json").read_bytes()
    for extra in ({}, {"annotations": PackedRecords([])}, {"a": PackedRecords([b"1"]), "b": [PackedRecords]}):
        if "b" in extra:
            continue
        write_packed(tmp_path / "x.json", extra)
        save_coco(tmp_path / "y.json", {k: list(v) if isinstance(v, PackedRecords) else v for k, v in extra.items()})
        assert (tmp_path / "x.json").read_bytes() == (tmp_path / "y.json").read_bytes()


def test_write_packed_refuses_nan_and_leaves_nothing(tmp_path):
    data = {"annotations": PackedRecords([b'{"area": NaN}'])}
    with pytest.raises(ValueError):
        write_packed(tmp_path / "out.json", data)
    assert list(Path(tmp_path).iterdir()) == []
