"""sam3.resize: fit_size, annotation scaling and the maps back to the original image, on hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam3.coco import annotation_mask, encode_mask
from sam3.errors import DataError
from sam3.resize import (
    boxes_to_original,
    fit_size,
    mask_to_original,
    resize_mask,
    scale_annotation,
    to_original_scale,
)


def test_fit_size_hand_values():
    # 600x400 into 256: scale = 256/600 = 0.4267; 400 * 0.4267 = 170.67 -> 171
    assert fit_size(600, 400, 256) == (256, 171)
    assert fit_size(400, 600, 256) == (171, 256)
    # already inside: never enlarged
    assert fit_size(200, 150, 256) == (200, 150)
    assert fit_size(256, 256, 256) == (256, 256)
    assert fit_size(1008, 1, 1008) == (1008, 1)
    # 4032x3024 phone photo into 1008: scale 0.25 exactly
    assert fit_size(4032, 3024, 1008) == (1008, 756)
    # 3000x1 into 1008: 1 * 0.336 rounds to 0, kept at least 1
    assert fit_size(3000, 1, 1008) == (1008, 1)


def test_fit_size_keeps_aspect_and_never_upscales():
    for width in range(1, 2000, 37):
        for height in range(1, 2000, 53):
            new_w, new_h = fit_size(width, height, 512)
            assert new_w <= width and new_h <= height
            assert max(new_w, new_h) == min(512, max(width, height))
            scale = min(1.0, 512 / max(width, height))
            # each side is the exact scaled side rounded to a whole pixel (or 1)
            assert abs(new_w - width * scale) <= 0.5 or new_w == 1
            assert abs(new_h - height * scale) <= 0.5 or new_h == 1


def test_fit_size_rejects_non_positive():
    with pytest.raises(ValueError):
        fit_size(0, 10, 100)
    with pytest.raises(ValueError):
        fit_size(10, 10, 0)


def test_scale_box_only_annotation():
    ann = {"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0}
    out = scale_annotation(ann, 0.5, 0.25, 100, 200)
    # [10 * 0.5, 20 * 0.25, 30 * 0.5, 40 * 0.25] = [5, 5, 15, 10]; area 15 * 10 = 150
    assert out["bbox"] == [5.0, 5.0, 15.0, 10.0]
    assert out["area"] == 150.0
    assert out["id"] == 7 and out["category_id"] == 3 and out["iscrowd"] == 0
    assert ann["bbox"] == [10, 20, 30, 40]  # input untouched


def test_scale_polygon_annotation():
    # a 100x60 rectangle at (20, 40) and a triangle, in a 200x120 image scaled by sx = 0.5, sy = 0.25
    polygons = [[20, 40, 120, 40, 120, 100, 20, 100], [150, 0, 190, 0, 170, 80]]
    ann = {"id": 1, "bbox": [20, 0, 170, 100], "segmentation": polygons}
    out = scale_annotation(ann, 0.5, 0.25, 30, 100)
    assert out["segmentation"] == [[10, 10, 60, 10, 60, 25, 10, 25], [75, 0, 95, 0, 85, 20]]
    assert out["bbox"] == [10.0, 0.0, 85.0, 25.0]
    # area is pycocotools' rasterised area of the scaled polygons, which for these lattice-aligned shapes is the
    # geometric area: the 50 x 15 rectangle (750) plus the triangle of base 20 and height 20 (200), disjoint
    assert out["area"] == 950.0
    merged = mask_utils.merge(mask_utils.frPyObjects(out["segmentation"], 30, 100))
    assert float(mask_utils.area(merged)) == 950.0


def test_scale_rle_annotation_hand_worked():
    # 40x80 mask, rows 10..29 and columns 20..59 set (20 x 40 = 800 pixels), halved to 20x40.
    # Antialiased bilinear at factor 2 gives output row i the input rows 2i-1, 2i, 2i+1, 2i+2 with weights
    # 1/8, 3/8, 3/8, 1/8. Row 5 (inputs 9..12): 0 + 3/8 + 3/8 + 1/8 = 0.875 -> in; row 4 (inputs 7..10): 1/8 -> out;
    # row 14 (inputs 27..30): 1/8 + 3/8 + 3/8 = 0.875 -> in; row 15: 1/8 -> out. Same for columns:
    # the result is exactly rows 5..14, columns 10..29, area 10 * 20 = 200.
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:30, 20:60] = True
    expected = np.zeros((20, 40), dtype=bool)
    expected[5:15, 10:30] = True
    compressed = {"id": 2, "bbox": [20, 10, 40, 20], "segmentation": encode_mask(mask), "iscrowd": 0}
    out = scale_annotation(compressed, 0.5, 0.5, 20, 40)
    assert out["segmentation"]["size"] == [20, 40]
    assert isinstance(out["segmentation"]["counts"], str)
    np.testing.assert_array_equal(annotation_mask(out["segmentation"], 20, 40), expected)
    assert out["area"] == 200.0
    assert out["bbox"] == [10.0, 5.0, 20.0, 10.0]

    # uncompressed RLE (counts as a list of run lengths, column-major) gives the same result, compressed
    counts, previous, run = [], False, 0
    for value in mask.flatten(order="F"):
        if value != previous:
            counts.append(run)
            previous, run = value, 0
        run += 1
    counts.append(run)
    uncompressed = dict(compressed, segmentation={"size": [40, 80], "counts": counts}, iscrowd=1)
    out_u = scale_annotation(uncompressed, 0.5, 0.5, 20, 40)
    assert out_u["segmentation"] == out["segmentation"]
    assert out_u["area"] == 200.0 and out_u["iscrowd"] == 1


def test_scale_annotation_rejects_malformed_segmentation():
    with pytest.raises(DataError, match="annotation 5: polygon 0"):
        scale_annotation({"id": 5, "segmentation": [[1, 2, 3, 4]]}, 0.5, 0.5, 10, 10)
    with pytest.raises(DataError, match="annotation 6: segmentation must be"):
        scale_annotation({"id": 6, "segmentation": "abc"}, 0.5, 0.5, 10, 10)
    with pytest.raises(DataError, match="annotation 8: bbox"):
        scale_annotation({"id": 8, "bbox": [1, 2, 3]}, 0.5, 0.5, 10, 10)


def test_to_original_scale():
    record = {"id": 1, "width": 256, "height": 171, "orig_width": 600, "orig_height": 400}
    sx, sy = to_original_scale(record)
    assert sx == 600 / 256 == 2.34375
    assert sy == pytest.approx(2.339181, abs=1e-6)  # 400 / 171
    assert to_original_scale({"id": 2, "width": 640, "height": 480}) == (1.0, 1.0)
    with pytest.raises(DataError, match="image 3: has orig_width but not orig_height"):
        to_original_scale({"id": 3, "width": 10, "height": 10, "orig_width": 20})


def test_boxes_to_original_numpy_and_tensor():
    # sx = 600 / 300 = 2, sy = 400 / 100 = 4
    record = {"id": 1, "width": 300, "height": 100, "orig_width": 600, "orig_height": 400}
    boxes = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 5.0, 5.0]])
    np.testing.assert_allclose(boxes_to_original(boxes, record), [[2, 8, 6, 16], [20, 40, 10, 20]])
    tensor = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float32)
    out = boxes_to_original(tensor, record)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 8.0, 6.0, 16.0]]))


def test_mask_to_original_hand_worked():
    # Upsampling the 20x40 rectangle (rows 5..14, columns 10..29) by 2: output row j samples input row
    # j/2 - 0.25. Row 10 -> 4.75: 0.25 * m[4] + 0.75 * m[5] = 0.75 -> in; row 9 -> 4.25: 0.25 -> out;
    # row 29 -> 14.25: 0.75 -> in; row 30 -> 14.75: 0.25 -> out. So it returns rows 10..29, columns 20..59:
    # the mask of test_scale_rle_annotation_hand_worked, recovered exactly.
    small = np.zeros((20, 40), dtype=bool)
    small[5:15, 10:30] = True
    record = {"id": 1, "width": 40, "height": 20, "orig_width": 80, "orig_height": 40}
    expected = np.zeros((40, 80), dtype=bool)
    expected[10:30, 20:60] = True
    np.testing.assert_array_equal(mask_to_original(small, record), expected)
    np.testing.assert_array_equal(mask_to_original(torch.from_numpy(small), record), expected)
    with pytest.raises(ValueError, match="mask shape"):
        mask_to_original(np.zeros((40, 20), dtype=bool), record)


def test_resize_mask_same_size_is_identity():
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) > 0.5
    out = resize_mask(mask, 13, 17)
    np.testing.assert_array_equal(out, mask)
    assert out is not mask
