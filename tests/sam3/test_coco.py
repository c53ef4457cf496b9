"""COCO file helpers: strict parsing with file:line:column, deterministic writing, mask round trips."""

import numpy as np
import pytest

from sam3.coco import annotation_mask, encode_mask, load_coco, present_splits, save_coco
from sam3.errors import DataError


def test_invalid_json_names_file_line_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [\n    {"id": 1,,}\n  ]\n}\n')
    with pytest.raises(DataError) as err:
        load_coco(path)
    # line 3 is `    {"id": 1,,}`: 4 spaces, then `{` at column 5, the second comma at column 14
    assert str(err.value).startswith(f"{path}:3:14: invalid JSON")


def test_top_level_must_be_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="top level must be a JSON object"):
        load_coco(path)


def test_save_is_deterministic_and_round_trips(tmp_path):
    data = {"images": [{"id": 1, "width": 4, "height": 3, "file_name": "a.png"}], "annotations": [], "b": 1}
    save_coco(tmp_path / "x.json", data)
    first = (tmp_path / "x.json").read_bytes()
    save_coco(tmp_path / "x.json", dict(reversed(list(data.items()))))
    assert (tmp_path / "x.json").read_bytes() == first
    assert load_coco(tmp_path / "x.json") == data


def test_save_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        save_coco(tmp_path / "x.json", {"area": float("nan")})


def test_polygon_and_rle_decode_to_the_same_square():
    # a 2x2 square covering pixels (1..2, 1..2) of a 4x5 image, as a polygon and as RLE
    expected = np.zeros((4, 5), dtype=bool)
    expected[1:3, 1:3] = True
    rle = encode_mask(expected)
    assert isinstance(rle["counts"], str) and rle["size"] == [4, 5]
    assert np.array_equal(annotation_mask(rle, 4, 5), expected)
    polygon = [[1, 1, 3, 1, 3, 3, 1, 3]]
    assert annotation_mask(polygon, 4, 5).sum() == 4
    uncompressed = {"size": [4, 5], "counts": [5, 2, 2, 2, 9]}  # column-major runs
    assert np.array_equal(annotation_mask(uncompressed, 4, 5), expected)


def test_present_splits(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        present_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="no split found"):
        present_splits(tmp_path)
    save_coco(tmp_path / "valid" / "_annotations.coco.json", {})
    save_coco(tmp_path / "train" / "_annotations.coco.json", {})
    assert present_splits(tmp_path) == ["train", "valid"]
