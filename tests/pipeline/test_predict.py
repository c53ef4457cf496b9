"""pipeline.predict and sam3.overlay: predictions.json and a real overlay PNG per image; pixels drawn as computed by
hand; one-line errors for missing images and bad prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import cli, predict
from pipeline.shapes_data import build_shapes_dataset
from sam3.errors import ConfigError, DataError
from sam3.inference import Detection
from sam3.overlay import MASK_ALPHA, PALETTE, draw_detections, prompt_colour, text_colour


def parse(*argv: str) -> argparse.Namespace:
    """Arguments as `python -m pipeline predict ...` parses them."""
    return cli.build_parser().parse_args(["predict", *(str(a) for a in argv)])


@pytest.fixture(scope="module")
def shapes_image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    build_shapes_dataset(root, n=1, seed=0, n_valid=1, n_test=1)
    return next((root / "test").glob("*.png"))


# ---------------------------------------------------------------- overlay pixels


def grey_image(width: int = 200, height: int = 150, level: int = 100) -> Image.Image:
    return Image.new("RGB", (width, height), (level, level, level))


def rectangle(x0: int, y0: int, x1: int, y1: int, width: int = 200, height: int = 150) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def blend(under: int, colour: int) -> int:
    """torchvision's mask blend on uint8: (1 - alpha) * under + alpha * colour, truncated to an integer."""
    return int((1 - MASK_ALPHA) * under + MASK_ALPHA * colour)


def test_overlay_draws_mask_box_and_leaves_the_rest():
    detection = Detection(0, "cat", 0.9, (100.0, 60.0, 180.0, 140.0), rectangle(100, 60, 180, 140))
    out = np.asarray(draw_detections(grey_image(), [detection], ["cat", "dog"]))
    assert out.shape == (150, 200, 3)
    red, green, blue = PALETTE[0]  # (230, 25, 75)
    # inside the mask, away from the box outline and the label: 0.55 * 100 + 0.45 * (230, 25, 75)
    # = (55 + 103.5, 55 + 11.25, 55 + 33.75) -> (158, 66, 88)
    assert tuple(out[120, 150]) == (blend(100, red), blend(100, green), blend(100, blue)) == (158, 66, 88)
    assert tuple(out[100, 100]) == PALETTE[0]  # the box's left edge, drawn after the mask
    assert tuple(out[140, 20]) == (100, 100, 100)  # bottom-left: no detection, no legend
    # the label "cat 0.90" sits in a filled box of the prompt colour at the box's top-left, in white on it
    label = out[63:75, 103:140].reshape(-1, 3)
    assert (label == PALETTE[0]).all(axis=1).sum() > 50 and (label == (255, 255, 255)).all(axis=1).any()
    # the legend lists "cat (1)" in the emptiest corner (top-left here) on a dark background, not "dog"
    assert out[2, 2].sum() < 3 * 100


def test_overlay_puts_the_best_detection_on_top():
    low = Detection(1, "dog", 0.3, (40.0, 40.0, 120.0, 120.0), rectangle(40, 40, 120, 120))
    high = Detection(0, "cat", 0.9, (80.0, 80.0, 160.0, 140.0), rectangle(80, 80, 160, 140))
    out = np.asarray(draw_detections(grey_image(), [high, low], ["cat", "dog"], legend=False))
    # both masks cover (100, 100): the low score is blended first, the high one over it
    expected = tuple(blend(blend(100, d), c) for c, d in zip(prompt_colour(0), prompt_colour(1), strict=True))
    assert tuple(out[100, 100]) == expected


def test_text_colour_contrasts():
    assert text_colour((255, 225, 25)) == (0, 0, 0)  # yellow: black text
    assert text_colour((0, 0, 128)) == (255, 255, 255)  # navy: white text


# ---------------------------------------------------------------- the command


def test_predict_writes_predictions_and_an_overlay(shapes_image, tmp_path, capsys):
    out = tmp_path / "out"
    args = parse(
        "--model",
        "tiny",
        "--image",
        shapes_image,
        "--prompt",
        "red circle",
        "--prompt",
        "blue square",
        "--out",
        out,
        "--threshold",
        "0",
        "--max-dets",
        "5",
        "--mode",
        "segmentation",
    )
    assert predict.run(args) == 0

    document = json.loads((out / predict.PREDICTIONS_FILE).read_text())
    assert document["images"] == [{"id": 1, "file_name": str(shapes_image), "width": 224, "height": 224}]
    assert document["categories"] == [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}]
    annotations = document["annotations"]
    assert [a["id"] for a in annotations] == [1, 2, 3, 4, 5]  # 5 kept of 2 prompts x 16 queries, all scores > 0
    scores = [a["score"] for a in annotations]
    assert scores == sorted(scores, reverse=True)
    for a in annotations:
        assert a["image_id"] == 1 and a["category_id"] in (1, 2) and a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert 0 <= x <= x + w <= 224 and 0 <= y <= y + h <= 224
        assert a["segmentation"]["size"] == [224, 224]
        assert a["area"] == int(mask_utils.area(a["segmentation"]))

    overlay_path = out / f"{shapes_image.stem}_overlay.png"
    with Image.open(overlay_path) as overlay:
        assert overlay.format == "PNG" and overlay.size == (224, 224) and overlay.mode == "RGB"
        drawn = np.asarray(overlay).astype(int)
    with Image.open(shapes_image) as source:
        original = np.asarray(source.convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(axis=2) > 0
    assert 0.01 < changed.mean() < 1.0  # something drawn, and the picture still shows through
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 50  # a real picture, not a flat fill
    printed = capsys.readouterr().out
    assert f"{shapes_image}: 5 detections above 0.0 -> {overlay_path}" in printed


def test_high_threshold_keeps_nothing_but_still_writes(shapes_image, tmp_path):
    out = tmp_path / "out"
    assert (
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--out", out, "--threshold", "0.999")
        )
        == 0
    )
    assert json.loads((out / predict.PREDICTIONS_FILE).read_text())["annotations"] == []
    assert (out / f"{shapes_image.stem}_overlay.png").is_file()


def test_errors_are_one_line_user_errors(shapes_image, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match="missing.png: image file not found") as err:
        predict.run(
            parse("--model", tmp_path / "no_model", "--image", shapes_image, missing, "--prompt", "cat", "--out", out)
        )
    assert "\n" not in str(err.value)  # images are read before the (missing) model is loaded
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(DataError, match="cannot read as an image"):
        predict.run(parse("--model", "tiny", "--image", not_image, "--prompt", "cat", "--out", out))
    with pytest.raises(ConfigError, match="repeats"):
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--prompt", "Cat ", "--out", out)
        )
    other = tmp_path / "other" / shapes_image.name
    other.parent.mkdir()
    other.write_bytes(shapes_image.read_bytes())
    with pytest.raises(ConfigError, match="overwrite each other"):
        predict.run(parse("--model", "tiny", "--image", shapes_image, other, "--prompt", "cat", "--out", out))
    with pytest.raises(ConfigError, match="threshold"):
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--out", out, "--threshold", "1.5")
        )
    assert not out.exists()
