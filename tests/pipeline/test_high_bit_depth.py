"""16-bit greyscale images are mapped to 8 bits as round(v / 257) on every path that reads them (sam3.images).

Pillow's own `convert("RGB")` clips 16-bit values at 255, so before this a 16-bit PNG trained as an all-white
picture. The files are written in the test: PNG ("I;16"), big-endian TIFF ("I;16B"), 16-bit PGM (which Pillow
opens as "I"), a float TIFF ("F", refused) and 32-bit integers beyond 16 bits (refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.predict import read_image as predict_read_image
from pipeline.preprocess import preprocess_dataset
from pipeline.validation.files import inspect_image
from pipeline.validation.problems import Check
from sam3.coco import load_coco, save_coco, split_annotation_path
from sam3.data import CocoPromptDataset
from sam3.errors import DataError
from sam3.images import UnsupportedPixels, read_image, read_record_image, to_8bit

# 16-bit values and their 8-bit values, by hand: round(v / 257); 257 * 128 = 32896, 128.5 * 257 = 33024.5
VALUES_16 = [0, 128, 129, 257, 32896, 33024, 33025, 65535]
VALUES_8 = [0, 0, 1, 1, 128, 128, 129, 255]
MAX_PIXELS = 10**6


def gradient_16(width: int, height: int) -> np.ndarray:
    """uint16 [height, width]: 0 in the first column to 65535 in the last, the same on every row."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


def write_pgm_16(path: Path, values: np.ndarray) -> Path:
    """A binary 16-bit PGM (big-endian samples, maxval 65535)."""
    height, width = values.shape
    path.write_bytes(f"P5\n{width} {height}\n65535\n".encode() + values.astype(">u2").tobytes())
    return path


@pytest.mark.parametrize("kind", ["png I;16", "tiff I;16B", "pgm I"])
def test_read_image_maps_16_bits_to_8_by_dividing_by_257(tmp_path, kind):
    values = np.array([VALUES_16], dtype=np.uint16)
    if kind == "png I;16":
        path = tmp_path / "a.png"
        Image.fromarray(values).save(path)
    elif kind == "tiff I;16B":
        path = tmp_path / "a.tif"
        Image.fromarray(values.astype(">u2")).save(path)
    else:
        path = write_pgm_16(tmp_path / "a.pgm", values)
    with Image.open(path) as raw:
        assert raw.mode == kind.split()[1]  # the mode Pillow opens it in
    for image in (read_image(path), predict_read_image(path), read_record_image(path, 1)):
        rgb = np.asarray(image)
        assert image.mode == "RGB" and rgb.dtype == np.uint8
        assert rgb[0, :, 0].tolist() == VALUES_8 and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.asarray(read_image(path, mode="L"))[0].tolist() == VALUES_8
    assert inspect_image(path, len(VALUES_16), 1, MAX_PIXELS) is None  # validation accepts it


def test_8_bit_modes_are_left_alone():
    rgb = Image.new("RGB", (2, 2), (10, 20, 30))
    assert to_8bit(rgb) is rgb


def test_pixels_without_an_8_bit_mapping_are_refused_with_the_reason(tmp_path):
    floats = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(floats)
    wide = tmp_path / "i.tif"
    Image.fromarray(np.array([[0, 70000, 1]], dtype=np.int32)).save(wide)
    with pytest.raises(UnsupportedPixels, match="32-bit float pixels"):
        read_image(floats)
    with pytest.raises(UnsupportedPixels, match="from 0 to 70000, outside the 16-bit range"):
        read_image(wide)
    with pytest.raises(DataError, match="cannot decode image id 3 .*32-bit float pixels"):
        read_record_image(floats, 3)
    # validation quarantines them with that reason (they decode: not "truncated")
    check, reason = inspect_image(floats, 3, 1, MAX_PIXELS)
    assert check == Check.UNSUPPORTED_PIXELS and reason.startswith("has 32-bit float pixels")
    assert inspect_image(wide, 3, 1, MAX_PIXELS)[0] == Check.UNSUPPORTED_PIXELS


@pytest.fixture
def dataset(tmp_path) -> Path:
    """One-image train split: a 64 x 16 16-bit PNG gradient, one box on its bright right half."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    Image.fromarray(gradient_16(64, 16)).save(root / "train" / "ramp.png")
    save_coco(
        split_annotation_path(root, "train"),
        {
            "images": [{"id": 1, "file_name": "ramp.png", "width": 64, "height": 16}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [32, 0, 32, 16], "area": 512, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "bright"}],
        },
    )
    return root


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """A dataset sample's float [3, H, W] image in [-1, 1] as uint8 [H, W] (channel 0)."""
    return ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_a_training_sample_of_a_16_bit_png_keeps_its_gradient(dataset):
    sample = as_uint8(CocoPromptDataset(dataset, "train", image_size=64, train=False)[0].image)
    # the 64 x 16 picture is scaled to 64 wide and padded below; its top row runs from black to white
    row = sample[0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and (np.diff(row) >= 0).all()
    assert 100 < row[28:36].mean() < 155  # mid grey in the middle, not white (before: 255 from column 1 on)


def test_preprocess_keeps_a_16_bit_gradient_when_resizing_and_copying(dataset, tmp_path):
    expected = np.asarray(read_image(dataset / "train" / "ramp.png"))[..., 0].astype(int)
    assert expected[0].tolist() == [(int(v) + 128) // 257 for v in gradient_16(64, 1)[0]]
    # copied (fits): byte for byte, still 16-bit; the readers map it
    preprocess_dataset(dataset, tmp_path / "copied", size=64)
    copied = tmp_path / "copied" / "train" / "ramp.png"
    assert copied.read_bytes() == (dataset / "train" / "ramp.png").read_bytes()
    assert (np.asarray(read_image(copied))[..., 0] == expected).all()
    # resized to 32 x 8: mapped to 8 bits first, by the readers' rule, then shrunk; not clipped to white
    preprocess_dataset(dataset, tmp_path / "shrunk", size=32)
    shrunk = tmp_path / "shrunk" / "train" / "ramp.png"
    with Image.open(shrunk) as image:
        assert image.size == (32, 8) and image.mode == "L"
    row = np.asarray(read_image(shrunk))[0, :, 0].astype(int)
    reference = np.asarray(Image.fromarray(expected.astype(np.uint8)).resize((32, 8), Image.Resampling.LANCZOS))
    assert np.abs(row - reference[0]).max() <= 1 and row[0] <= 4 and row[-1] >= 251 and (np.diff(row) >= 0).all()
    record = load_coco(split_annotation_path(tmp_path / "shrunk", "train"))["images"][0]
    assert (record["width"], record["height"]) == (32, 8)
