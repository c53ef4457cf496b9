"""The demo dataset built from package images: counts, exact masks, watershed coins, byte-identical rebuilds, CLI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline import dataset_writer, demo_data
from pipeline.cli import main
from sam3.coco import ANNOTATIONS_FILE, SPLITS, annotation_mask, load_coco
from sam3.errors import DataError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo_data.build_demo_dataset(out)
    return out


def split_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of the True pixels, w and h counted in pixels (COCO convention)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_layout_counts_and_categories(demo_dir: Path) -> None:
    totals: Counter[str] = Counter()
    names_per_split = {}
    for split in SPLITS:
        coco = load_coco(demo_dir / split / ANNOTATIONS_FILE)
        categories = coco["categories"]
        assert [c["id"] for c in categories] == list(range(1, len(categories) + 1))
        assert all(c["supercategory"] for c in categories)
        assert coco["images"], f"{split} has no images"
        assert "date_created" not in coco["info"]
        totals["images"] += len(coco["images"])
        totals["annotations"] += len(coco["annotations"])
        names = {c["id"]: c["name"] for c in categories}
        names_per_split[split] = Counter(names[a["category_id"]] for a in coco["annotations"])
    all_names = set(names.values())
    assert len(all_names) >= 4
    assert {"nucleus", "coin", "person", "chair", "dining table", "bottle"} <= all_names
    assert not any("_" in n or n == "background" for n in all_names)
    assert totals["annotations"] >= 150
    assert 20 <= totals["images"] <= 40
    # every split holds every category (crops at CROP_FRACTION = 0.75 keep each photo's categories)
    for split in SPLITS:
        assert set(names_per_split[split]) == all_names, split
    # the coins photo is whole in train: all 24 watershed coins are there
    assert names_per_split["train"]["coin"] == 24


def test_masks_boxes_areas_and_images_agree(demo_dir: Path) -> None:
    for split in SPLITS:
        coco = load_coco(demo_dir / split / ANNOTATIONS_FILE)
        images = {i["id"]: i for i in coco["images"]}
        for record in images.values():
            assert "/" not in record["file_name"] and record["file_name"].endswith(".png")
            with Image.open(demo_dir / split / record["file_name"]) as image:
                assert image.mode == "RGB"
                assert image.size == (record["width"], record["height"])
            assert max(record["width"], record["height"]) <= 640
        for ann in coco["annotations"]:
            image = images[ann["image_id"]]
            mask = annotation_mask(ann["segmentation"], image["height"], image["width"])
            assert mask.any()
            assert int(mask.sum()) == ann["area"]
            assert all(isinstance(v, float) for v in ann["bbox"])
            assert np.allclose(mask_bbox(mask), ann["bbox"], atol=1)
            assert ann["iscrowd"] == 0
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_cli_rebuild_is_byte_identical(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert main(["demo-data", "--out", str(out)]) == 0
    for split in SPLITS:
        coco = load_coco(out / split / ANNOTATIONS_FILE)
        on_disk = {p.name for p in (out / split).iterdir()}
        assert on_disk == {ANNOTATIONS_FILE} | {i["file_name"] for i in coco["images"]}
    first, second = split_files(demo_dir), split_files(out)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_segment_coins_finds_the_24_coins() -> None:
    with Image.open(demo_data.package_file("skimage", "data/coins.png", "pip install scikit-image")) as image:
        gray = np.asarray(image.convert("L"))
    labels = demo_data.segment_coins(gray)
    assert labels.shape == (303, 384)
    assert labels.max() == 24
    areas = np.bincount(labels.ravel())[1:]
    # the coins are 36-63 px wide in this 384 x 303 photo: areas between ~1,000 and ~3,200 pixels, no specks
    assert areas.min() > 1000 and areas.max() < 3500
    # each coin is one connected blob (no coin split in two, none merged with a neighbour across the background)
    assert all(ndimage.label(labels == k)[1] == 1 for k in range(1, 25))


def test_nuclei_source_has_125_instances_and_8_bit_rgb() -> None:
    source = demo_data.load_nuclei()
    assert source.rgb.shape == (512, 512, 3) and source.rgb.dtype == np.uint8
    assert len(source.instances) == 125
    # the normalisation spans 0..255 (1st percentile -> 0, 99.8th -> 255)
    assert source.rgb.min() == 0 and source.rgb.max() == 255


def test_nucleus_tiles_are_disjoint_between_splits() -> None:
    sources = {"nuclei": demo_data.Source("nuclei", np.zeros((512, 512, 3), np.uint8), [], [])}
    for name in ("voc", "arc2017", "coins"):
        sources[name] = demo_data.Source(name, np.zeros((100, 200, 3), np.uint8), [], [])
    views = demo_data.demo_views(sources)
    tiles = [v for v in views if v.source == "nuclei"]
    assert len(tiles) == 16
    covered = np.zeros((512, 512), dtype=int)
    for v in tiles:
        x0, y0, x1, y1 = v.window
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()
    assert Counter(v.split for v in tiles) == {"train": 10, "valid": 3, "test": 3}
    # a 200 x 100 photo: 150 x 75 crops; centre crop starts at ((200-150)//2, (100-75)//2) = (25, 12)
    voc = {v.split: v.window for v in views if v.source == "voc"}
    assert voc == {"train": (0, 0, 200, 100), "valid": (25, 12, 175, 87), "test": (50, 25, 200, 100)}


def test_crop_instances_keeps_big_enough_parts() -> None:
    mask = np.zeros((20, 40), dtype=bool)
    mask[0:10, 0:10] = True  # 100 pixels
    outside = np.zeros((20, 40), dtype=bool)
    outside[15:20, 35:40] = True
    instances = [("thing", mask), ("far", outside)]
    # window x in [8, 30): 2 of 10 columns visible = 20 px < 25% of 100 and < 1000 px -> dropped
    kept, dropped = demo_data.crop_instances(instances, (8, 0, 30, 12))
    assert kept == [] and dropped == 1  # "far" is outside the window: neither kept nor dropped
    # window x in [7, 30): 3 columns = 30 px >= 25 -> kept, cropped to the window
    kept, dropped = demo_data.crop_instances(instances, (7, 0, 30, 12))
    assert dropped == 0 and [c for c, _ in kept] == ["thing"]
    assert kept[0][1].shape == (12, 23) and kept[0][1].sum() == 30


def test_mask_annotation_bbox_and_area_by_hand() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:7] = True  # rows 1-3, columns 2-6: 3 x 5 = 15 pixels
    mask[5, 0] = True  # one more pixel: bbox grows to x 0..6, y 1..5
    ann = dataset_writer.mask_annotation(mask, annotation_id=7, image_id=3, category_id=2)
    assert ann["bbox"] == [0.0, 1.0, 7.0, 5.0]
    assert ann["area"] == 16
    assert (ann["id"], ann["image_id"], ann["category_id"], ann["iscrowd"]) == (7, 3, 2, 0)
    assert np.array_equal(annotation_mask(ann["segmentation"], 6, 8), mask)


def test_readable_names_and_normalisation() -> None:
    assert demo_data.readable_name("burts_bees_baby_wipes") == "burts bees baby wipes"
    assert demo_data.readable_name("diningtable") == "dining table"
    assert demo_data.readable_name("_background_") in demo_data.NOT_OBJECTS
    # percentiles (0, 100) of [0, 50, 100, 200] are 0 and 200: x * 255 / 200 -> 0, 63.75, 127.5, 255
    # rounded half to even: 0, 64, 128, 255
    image = np.array([[0, 50], [100, 200]], dtype=np.uint16)
    assert demo_data.normalize_to_uint8(image, (0.0, 100.0)).tolist() == [[0, 64], [128, 255]]


def test_missing_package_or_file_says_what_to_install() -> None:
    with pytest.raises(DataError, match="pip install --no-deps stardist"):
        demo_data.package_file("stardist", "data/images/not_there.tif", "pip install --no-deps stardist")
    with pytest.raises(DataError, match="not installed.*pip install nothing-here"):
        demo_data.package_file("no_such_package_for_demo", "x.png", "pip install nothing-here")
