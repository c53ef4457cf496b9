"""A photo with an EXIF orientation tag is read upright on every path that reads images or checks their size.

The file: a portrait picture U (20 x 40, red top half, blue bottom half) stored as landscape pixels (40 x 20) with
EXIF Orientation 6 ("turn 90 degrees clockwise to display"), as a phone camera writes it. Its COCO record says
20 x 40, the upright size an annotation tool shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from pipeline.cli import main
from pipeline.negatives import load_val_image
from pipeline.predict import read_image as predict_read_image
from pipeline.preprocess import preprocess_dataset
from pipeline.validation.files import inspect_image
from pipeline.validation.problems import Check
from sam3.coco import load_coco, save_coco, split_annotation_path
from sam3.data import CocoPromptDataset
from sam3.errors import DataError
from sam3.images import exif_orientation, read_image, upright_size

WIDTH, HEIGHT = 20, 40  # upright
RED, BLUE = (220, 30, 30), (30, 30, 220)
MAX_PIXELS = 10**6


def upright_picture() -> Image.Image:
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[: HEIGHT // 2] = RED
    pixels[HEIGHT // 2 :] = BLUE
    return Image.fromarray(pixels)


def write_rotated_jpeg(path: Path) -> Path:
    """The upright picture turned 90 degrees anticlockwise (stored 40 x 20) with Orientation 6, which undoes it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    upright_picture().transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def assert_upright(rgb: np.ndarray) -> None:
    """[H, W, 3] uint8 (any size): red at the top, blue at the bottom, as the picture is seen."""
    height = rgb.shape[0]
    top, bottom = rgb[height // 8].mean(axis=0), rgb[height - 1 - height // 8].mean(axis=0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """One-image train split: the rotated JPEG, its record at the upright size, one box on the red half."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    write_rotated_jpeg(root / "train" / "photo.jpg")
    save_coco(
        split_annotation_path(root, "train"),
        {
            "images": [{"id": 1, "file_name": "photo.jpg", "width": WIDTH, "height": HEIGHT}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, WIDTH, HEIGHT / 2], "area": 400, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "red"}],
        },
    )
    return root


def test_the_file_is_stored_sideways(dataset):
    with Image.open(dataset / "train" / "photo.jpg") as raw:
        assert raw.size == (HEIGHT, WIDTH) and exif_orientation(raw) == 6
        assert upright_size(raw) == (WIDTH, HEIGHT)


def test_library_reader_and_predict_read_it_upright(dataset):
    path = dataset / "train" / "photo.jpg"
    for image in (read_image(path), predict_read_image(path)):
        assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
        assert_upright(np.asarray(image))


def test_training_dataset_reads_it_upright_and_its_size_check_agrees(dataset):
    sample = CocoPromptDataset(dataset, "train", image_size=32, train=False)[0]  # the size check passes
    assert_upright(((sample.image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    coco = load_coco(split_annotation_path(dataset, "train"))
    coco["images"][0].update(width=HEIGHT, height=WIDTH)  # the stored (sideways) size is now a mismatch
    save_coco(split_annotation_path(dataset, "train"), coco)
    with pytest.raises(DataError, match=r"image id 1 is 20x40 pixels but .* says 40x20"):
        CocoPromptDataset(dataset, "train", image_size=32, train=False)[0]


def test_negatives_mining_reads_it_upright(dataset):
    image = load_val_image(dataset / "train" / "photo.jpg", 1, 32)  # float [3, S, S] in [-1, 1]
    assert image.shape == (3, 32, 32)
    assert_upright(((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


def test_validation_compares_the_upright_size_and_names_the_orientation(dataset):
    path = dataset / "train" / "photo.jpg"
    assert inspect_image(path, WIDTH, HEIGHT, MAX_PIXELS) is None  # stored 40x20, upright 20x40 as the record says
    # the record has the stored (sideways) size: the reason says the EXIF orientation explains it
    check, reason = inspect_image(path, HEIGHT, WIDTH, MAX_PIXELS)
    assert check == Check.IMAGE_SIZE_MISMATCH
    assert reason == (
        "is 20x40 but the annotation file says width 40, height 20 (its EXIF Orientation 6 turns the stored 40x20 "
        "pixels by 90 degrees, as viewers and annotation tools show it; the record has the stored, sideways size: "
        "the tool that wrote it ignored the orientation, but sizes and boxes must be of the upright picture); fix "
        "the record or re-export the image"
    )
    # neither size: the orientation is still named, as the reason the image is 20x40
    check, reason = inspect_image(path, 30, 30, MAX_PIXELS)
    assert reason == (
        "is 20x40 but the annotation file says width 30, height 30 (its EXIF Orientation 6 turns the stored 40x20 "
        "pixels by 90 degrees); fix the record or re-export the image"
    )


def test_validation_report_names_the_orientation(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stage's built-in defaults, not the repository's params.yaml
    coco = load_coco(split_annotation_path(dataset, "train"))
    coco["images"][0].update(width=HEIGHT, height=WIDTH)  # the stored size, as a tool that ignores EXIF writes it
    save_coco(split_annotation_path(dataset, "train"), coco)
    report_path = tmp_path / "report.json"
    assert main(["validate", str(dataset), "--out", str(tmp_path / "out"), "--report", str(report_path)]) == 1
    problem = load_coco(report_path)["problems"][0]
    assert (problem["check"], problem["file"]) == ("image_size_mismatch", "train/photo.jpg")
    assert "its EXIF Orientation 6 turns the stored 40x20 pixels by 90 degrees" in problem["message"]
    assert "the record has the stored, sideways size" in problem["message"]


def test_preprocess_checks_the_upright_size_and_writes_upright(dataset, tmp_path):
    # fits: copied byte for byte, orientation tag included, so it still reads upright
    copied = tmp_path / "copied"
    preprocess_dataset(dataset, copied, size=64)
    assert (copied / "train" / "photo.jpg").read_bytes() == (dataset / "train" / "photo.jpg").read_bytes()
    # shrunk to fit 16 x 16: (20, 40) -> (8, 16), written upright and without the tag (not turned twice)
    shrunk = tmp_path / "shrunk"
    preprocess_dataset(dataset, shrunk, size=16)
    with Image.open(shrunk / "train" / "photo.jpg") as image:
        assert image.size == (8, 16) and exif_orientation(image) == 1
        assert_upright(np.asarray(image.convert("RGB")))
    record = load_coco(split_annotation_path(shrunk, "train"))["images"][0]
    assert (record["width"], record["height"], record["orig_width"], record["orig_height"]) == (8, 16, 20, 40)
    CocoPromptDataset(shrunk, "train", image_size=32, train=False)[0]  # and the training reader agrees

    coco = load_coco(split_annotation_path(dataset, "train"))
    coco["images"][0].update(width=HEIGHT, height=WIDTH)
    save_coco(split_annotation_path(dataset, "train"), coco)
    with pytest.raises(DataError, match=r"photo.jpg is 20x40 pixels but the record says 40x20"):
        preprocess_dataset(dataset, tmp_path / "refused", size=16)
