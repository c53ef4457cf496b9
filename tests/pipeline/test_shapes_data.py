"""The generated shapes dataset: exact visible masks, colours that match the names, determinism per seed, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import shapes_data
from pipeline.cli import main
from sam3.coco import ANNOTATIONS_FILE, SPLITS, annotation_mask, load_coco
from sam3.errors import ConfigError


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes_data.build_shapes_dataset(out, n=12, seed=3)
    return out


def test_categories_counts_and_layout(shapes_dir: Path) -> None:
    expected_names = [f"{c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]
    # n = 12: valid and test default to max(4, 12 // 5) = 4
    for split, count in zip(SPLITS, (12, 4, 4), strict=True):
        coco = load_coco(shapes_dir / split / ANNOTATIONS_FILE)
        assert [c["name"] for c in coco["categories"]] == expected_names
        assert [c["id"] for c in coco["categories"]] == list(range(1, 10))
        assert len(coco["images"]) == count
        on_disk = {p.name for p in (shapes_dir / split).iterdir()}
        assert on_disk == {ANNOTATIONS_FILE} | {i["file_name"] for i in coco["images"]}
        per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=count + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 4


def test_visible_masks_are_exact_and_match_the_pixels(shapes_dir: Path) -> None:
    channel = {"red": 0, "green": 1, "blue": 2}
    for split in SPLITS:
        coco = load_coco(shapes_dir / split / ANNOTATIONS_FILE)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        for record in coco["images"]:
            with Image.open(shapes_dir / split / record["file_name"]) as image:
                rgb = np.asarray(image.convert("RGB")).astype(int)
            assert rgb.shape == (224, 224, 3)
            taken = np.zeros((224, 224), dtype=bool)
            for ann in (a for a in coco["annotations"] if a["image_id"] == record["id"]):
                mask = annotation_mask(ann["segmentation"], record["height"], record["width"])
                assert mask.any()
                assert int(mask.sum()) == ann["area"]
                ys, xs = np.nonzero(mask)
                box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert np.allclose(box, ann["bbox"], atol=1)
                # visible masks never share a pixel: what a shape on top covers is cut from the ones below
                assert not (taken & mask).any()
                taken |= mask
                # every visible pixel has the named colour. Worst case with jitter +-25 is green (40, 170, 60):
                # lead >= 170 - 25 = 145, others <= 60 + 25 = 85, a margin of 60 (red 130, blue 90)
                pixels = rgb[mask]
                lead = channel[names[ann["category_id"]].split(" ")[0]]
                others = [c for c in range(3) if c != lead]
                assert (pixels[:, lead] - pixels[:, others].max(axis=1) > 50).all()


def test_same_seed_is_byte_identical_and_other_seed_differs(shapes_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    other = tmp_path / "other"
    shapes_data.build_shapes_dataset(again, n=12, seed=3)
    shapes_data.build_shapes_dataset(other, n=12, seed=4)
    first, second, third = all_files(shapes_dir), all_files(again), all_files(other)
    assert first.keys() == second.keys() == third.keys()
    assert [k for k in first if first[k] != second[k]] == []
    assert all(first[k] != third[k] for k in first if k.endswith(".png"))


def test_splits_differ_and_train_prefix_does_not_depend_on_n(shapes_dir: Path, tmp_path: Path) -> None:
    shapes_data.build_shapes_dataset(tmp_path, n=2, seed=3, n_valid=1, n_test=1)
    big, small = all_files(shapes_dir), all_files(tmp_path)
    for name in ("000000.png", "000001.png"):
        assert small[f"train/{name}"] == big[f"train/{name}"]
    assert big["train/000000.png"] != big["valid/000000.png"] != big["test/000000.png"]


def test_cli_counts_and_defaults(tmp_path: Path) -> None:
    args = ["shapes-data", "--out", str(tmp_path), "--n", "6", "--seed", "1", "--n-valid", "2", "--n-test", "3"]
    assert main(args + ["--image-size", "64"]) == 0
    for split, count in zip(SPLITS, (6, 2, 3), strict=True):
        coco = load_coco(tmp_path / split / ANNOTATIONS_FILE)
        assert len(coco["images"]) == count
        assert {(i["width"], i["height"]) for i in coco["images"]} == {(64, 64)}
    assert shapes_data.default_holdout(10) == 4 and shapes_data.default_holdout(30) == 6
    assert main(["shapes-data", "--out", str(tmp_path / "bad"), "--n", "0"]) == 2


def test_shape_mask_areas_by_hand() -> None:
    circle = shapes_data.shape_mask("circle", (50.0, 50.0), 20.0, 0.0, 100)
    # diameter 20: pi * 10^2 = 314.2 (pixel centres within radius 10; the lattice count is 316)
    assert abs(int(circle.sum()) - math.pi * 100) < 0.01 * math.pi * 100
    square = shapes_data.shape_mask("square", (50.0, 50.0), 20.0, math.pi / 4, 100)
    # side 20 at angle pi/4 (corners at 45 degrees: axis-aligned) spans x, y in [40, 60]: the pixel centres
    # 40.5 .. 59.5 are inside, so columns and rows 40..59, 20 x 20 = 400 pixels exactly
    ys, xs = np.nonzero(square)
    assert int(square.sum()) == 400
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 59, 40, 59)
    triangle = shapes_data.shape_mask("triangle", (50.0, 50.0), 20.0, 0.0, 100)
    # circumradius 10: side = 10 * sqrt(3) = 17.32, area = sqrt(3) / 4 * 17.32^2 = 129.9
    assert abs(int(triangle.sum()) - 129.9) < 0.03 * 129.9
    # a shape at the border is clipped to the image: a quarter of the circle centred on the corner (0, 0) is left
    corner = shapes_data.shape_mask("circle", (0.0, 0.0), 20.0, 0.0, 100)
    assert abs(int(corner.sum()) - math.pi * 100 / 4) < 0.05 * math.pi * 100 / 4


def test_placement_rules_by_hand() -> None:
    full = np.zeros((20, 20), dtype=bool)
    full[0:10, 0:10] = True  # 100 pixels
    placed = [shapes_data.PlacedShape(1, "red", (5.0, 5.0), 7.1, full, full.copy())]
    cover = np.zeros((20, 20), dtype=bool)
    cover[0:3, 0:10] = True  # hides 30 px: 70 left = (1 - 0.3) * 100, allowed
    assert not shapes_data.hides_too_much(cover, placed)
    cover[3, 0] = True  # hides 31 px: 69 left < 70
    assert shapes_data.hides_too_much(cover, placed)
    # bounding circles 7.1 + 5 + gap 3 = 15.1 apart at least for the same colour; other colours may touch
    assert shapes_data.touches_same_colour("red", (20.0, 5.0), 5.0, placed)  # 15.0 < 15.1
    assert not shapes_data.touches_same_colour("red", (20.2, 5.0), 5.0, placed)  # 15.2
    assert not shapes_data.touches_same_colour("blue", (6.0, 5.0), 5.0, placed)


def test_bad_arguments_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train needs at least 1 image"):
        shapes_data.build_shapes_dataset(tmp_path, n=0, seed=0)
    with pytest.raises(ConfigError, match="min_shapes <= max_shapes"):
        shapes_data.build_shapes_dataset(tmp_path, n=2, seed=0, min_shapes=3, max_shapes=2)
    with pytest.raises(ConfigError, match="seed"):
        shapes_data.build_shapes_dataset(tmp_path, n=2, seed=-1)
