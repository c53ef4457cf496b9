"""pipeline.preprocess on small generated datasets: geometry, mask round trip, determinism, idempotence, CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipeline.cli import main
from pipeline.preprocess import preprocess_dataset
from sam3.coco import annotation_mask, encode_mask, load_coco, save_coco, split_annotation_path
from sam3.errors import DataError
from sam3.resize import boxes_to_original, fit_size, mask_to_original

pytestmark = pytest.mark.usefixtures("outside_repo")  # stage flags only, not the repository's params.yaml

SIZE = 256

# (split, file name, width, height): three larger than SIZE (landscape JPEG, portrait PNG, landscape PNG) and
# one that already fits (copied byte for byte).
IMAGES = (
    ("train", "a.jpg", 600, 400),
    ("train", "b.png", 400, 600),
    ("train", "small.png", 200, 150),
    ("valid", "c.jpg", 640, 480),
)


def blob_outline(cx: float, cy: float, radius: float, phase: float, points: int = 64) -> np.ndarray:
    """[points, 2] outline of an irregular blob: r(t) = radius * (1 + 0.25 sin(3t + phase) + 0.12 cos(5t))."""
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    r = radius * (1 + 0.25 * np.sin(3 * t + phase) + 0.12 * np.cos(5 * t))
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def blob_mask(height: int, width: int, cx: float, cy: float, radius: float, phase: float) -> np.ndarray:
    """The same blob rasterised directly (pixel centres inside the curve), bool [height, width]."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    t = np.arctan2(yy - cy, xx - cx)
    r = radius * (1 + 0.25 * np.sin(3 * t + phase) + 0.12 * np.cos(5 * t))
    return np.hypot(xx - cx, yy - cy) <= r


def box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def make_dataset(root: Path) -> Path:
    """Write a small COCO dataset: per image an RLE blob, a polygon blob, a thin crescent (RLE) and a box-only
    annotation, on a textured picture so the image bytes mean something."""
    rng = np.random.default_rng(0)
    per_split: dict[str, dict] = {}
    ann_id = 0
    for image_id, (split, name, width, height) in enumerate(IMAGES, start=1):
        data = per_split.setdefault(
            split,
            {"info": {"description": "test"}, "categories": [{"id": 1, "name": "blob"}, {"id": 2, "name": "moon"}]},
        )
        yy, xx = np.mgrid[0:height, 0:width]
        pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.int16)
        pixels += rng.integers(-20, 21, size=pixels.shape)
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        (root / split).mkdir(parents=True, exist_ok=True)
        picture.save(root / split / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        data.setdefault("images", []).append(
            {"id": image_id, "file_name": name, "width": width, "height": height, "license": 1}
        )

        s = min(width, height)
        rle_blob = blob_mask(height, width, 0.3 * width, 0.35 * height, 0.2 * s, phase=image_id)
        outline = blob_outline(0.7 * width, 0.6 * height, 0.18 * s, phase=2 * image_id)
        polygon_blob = annotation_mask([outline.flatten().tolist()], height, width)
        # a crescent: a disc minus a shifted disc, 0.05 * s wide at its thickest
        crescent = blob_mask(height, width, 0.5 * width, 0.8 * height, 0.12 * s, 0) & ~blob_mask(
            height, width, 0.5 * width + 0.05 * s, 0.8 * height, 0.12 * s, 0
        )
        anns = [
            (1, {"segmentation": encode_mask(rle_blob), "bbox": box_of(rle_blob), "area": float(rle_blob.sum())}),
            (
                1,
                {
                    "segmentation": [outline.flatten().tolist()],
                    "bbox": box_of(polygon_blob),
                    "area": float(polygon_blob.sum()),
                },
            ),
            (2, {"segmentation": encode_mask(crescent), "bbox": box_of(crescent), "area": float(crescent.sum())}),
            (2, {"bbox": [12.5, 20.0, 40.0, 30.0], "area": 1200.0}),
        ]
        for category_id, ann in anns:
            ann_id += 1
            data.setdefault("annotations", []).append(
                dict(ann, id=ann_id, image_id=image_id, category_id=category_id, iscrowd=0)
            )
    for split, data in per_split.items():
        save_coco(split_annotation_path(root, split), data)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def by_id(items: list[dict]) -> dict:
    return {item["id"]: item for item in items}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def preprocessed(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pre") / "out"
    summary = preprocess_dataset(dataset, out, size=SIZE, workers=1)
    return out, summary


def test_summary_counts(preprocessed):
    _, summary = preprocessed
    assert summary["splits"]["train"] == {
        "images": 3,
        "resized": 2,
        "copied": 1,
        "annotations": 12,
        "unreferenced_files": 0,
    }
    assert summary["splits"]["valid"]["resized"] == 1
    assert (summary["images"], summary["resized"], summary["copied"], summary["annotations"]) == (4, 3, 1, 16)
    assert summary["seconds"] > 0


def test_images_resized_records_and_formats(dataset, preprocessed):
    out, _ = preprocessed
    for split, name, width, height in IMAGES:
        new_w, new_h = fit_size(width, height, SIZE)
        record = next(r for r in load_coco(split_annotation_path(out, split))["images"] if r["file_name"] == name)
        assert (record["width"], record["height"]) == (new_w, new_h)
        assert (record["orig_width"], record["orig_height"]) == (width, height)
        assert record["license"] == 1  # other fields kept
        with Image.open(out / split / name) as im:
            assert im.size == (new_w, new_h)
            assert im.format == ("JPEG" if name.endswith(".jpg") else "PNG")
            if im.format == "JPEG":
                # quality 95: the base luminance table's first entry 16 scales to (16 * 10 + 50) // 100 = 2
                # (libjpeg: scale = 200 - 2 * 95 = 10 percent); 4:4:4 chroma is sampling 0
                assert im.quantization[0][0] == 2
                assert JpegImagePlugin.get_sampling(im) == 0
    # 600x400 -> 256x171, 400x600 -> 171x256, 640x480 -> 256x192; 200x150 already fits
    assert fit_size(640, 480, SIZE) == (256, 192)
    small_in, small_out = dataset / "train" / "small.png", out / "train" / "small.png"
    assert small_out.read_bytes() == small_in.read_bytes()


def test_annotations_scaled(dataset, preprocessed):
    out, _ = preprocessed
    for split in ("train", "valid"):
        raw, pre = load_coco(split_annotation_path(dataset, split)), load_coco(split_annotation_path(out, split))
        assert [a["id"] for a in pre["annotations"]] == [a["id"] for a in raw["annotations"]]  # order kept
        assert pre["categories"] == raw["categories"] and pre["info"] == raw["info"]
        raw_images, pre_images = by_id(raw["images"]), by_id(pre["images"])
        for a_raw, a_pre in zip(raw["annotations"], pre["annotations"], strict=True):
            before, after = raw_images[a_raw["image_id"]], pre_images[a_pre["image_id"]]
            sx, sy = after["width"] / before["width"], after["height"] / before["height"]
            x, y, w, h = a_raw["bbox"]
            assert a_pre["bbox"] == pytest.approx([x * sx, y * sy, w * sx, h * sy], rel=1e-12)
            np.testing.assert_allclose(boxes_to_original(np.array(a_pre["bbox"]), after), a_raw["bbox"], rtol=1e-9)
            seg = a_raw.get("segmentation")
            if after["width"] == before["width"]:
                assert a_pre == a_raw  # copied image: annotation unchanged, area included
            elif isinstance(seg, list):
                xs, ys = np.array(seg[0][0::2]), np.array(seg[0][1::2])
                np.testing.assert_allclose(a_pre["segmentation"][0][0::2], xs * sx)
                np.testing.assert_allclose(a_pre["segmentation"][0][1::2], ys * sy)
                # pycocotools area of the scaled polygon: about the original area times sx * sy
                mask = annotation_mask(seg, before["height"], before["width"])
                assert a_pre["area"] == pytest.approx(mask.sum() * sx * sy, rel=0.03)
            elif isinstance(seg, dict):
                assert a_pre["segmentation"]["size"] == [after["height"], after["width"]]
                mask = annotation_mask(a_pre["segmentation"], after["height"], after["width"])
                assert a_pre["area"] == float(mask.sum())
            else:
                assert a_pre["area"] == pytest.approx(w * sx * h * sy, rel=1e-12)


def test_masks_round_trip_to_original(dataset, preprocessed):
    """Masks of the preprocessed dataset, scaled back with mask_to_original, overlap the originals at IoU >= 0.95
    (blobs and polygons; measured 0.985-0.99) and >= 0.93 for the thin crescent (at most 0.05 * 400 = 20 px wide,
    8.5 px after the 0.43x shrink, so a one-pixel boundary error is a larger share of it; measured 0.943-0.951,
    where nearest-neighbour resampling both ways gives 0.910-0.926 and would fail)."""
    out, _ = preprocessed
    ious = []
    for split in ("train", "valid"):
        raw, pre = load_coco(split_annotation_path(dataset, split)), load_coco(split_annotation_path(out, split))
        raw_images, pre_images = by_id(raw["images"]), by_id(pre["images"])
        for a_raw, a_pre in zip(raw["annotations"], pre["annotations"], strict=True):
            if "segmentation" not in a_raw:
                continue
            before, after = raw_images[a_raw["image_id"]], pre_images[a_pre["image_id"]]
            original = annotation_mask(a_raw["segmentation"], before["height"], before["width"])
            small = annotation_mask(a_pre["segmentation"], after["height"], after["width"])
            back = mask_to_original(small, after)
            assert back.shape == original.shape
            iou = (back & original).sum() / (back | original).sum()
            ious.append(iou)
            threshold = 0.93 if a_raw["category_id"] == 2 else 0.95
            assert iou >= threshold, f"annotation {a_raw['id']}: IoU {iou:.3f} < {threshold}"
    assert len(ious) == 12  # 3 masks x 4 images


def test_second_run_is_byte_identical_and_workers_agree(dataset, preprocessed, tmp_path):
    out, _ = preprocessed
    first = tree_digest(out)
    assert sorted(first) == [
        "train/_annotations.coco.json",
        "train/a.jpg",
        "train/b.png",
        "train/small.png",
        "valid/_annotations.coco.json",
        "valid/c.jpg",
    ]
    preprocess_dataset(dataset, out, size=SIZE, workers=1)
    assert tree_digest(out) == first
    parallel = tmp_path / "parallel"
    summary = preprocess_dataset(dataset, parallel, size=SIZE, workers=2)
    assert summary["workers"] == 2
    assert tree_digest(parallel) == first


def test_running_on_own_output_changes_nothing(preprocessed, tmp_path):
    out, _ = preprocessed
    again = tmp_path / "again"
    summary = preprocess_dataset(out, again, size=SIZE)
    assert summary["resized"] == 0 and summary["copied"] == 4
    assert tree_digest(again) == tree_digest(out)


def test_orig_keys_survive_a_second_smaller_preprocess(dataset, preprocessed, tmp_path):
    out, _ = preprocessed
    smaller = tmp_path / "smaller"
    preprocess_dataset(out, smaller, size=128)
    raw = load_coco(split_annotation_path(dataset, "train"))
    twice = load_coco(split_annotation_path(smaller, "train"))
    a = by_id(twice["images"])[1]
    # 600x400 -> 256x171 -> 128x86 (171 * 0.5 = 85.5 rounds to the even 86), original still 600x400
    assert (a["width"], a["height"], a["orig_width"], a["orig_height"]) == (128, 86, 600, 400)
    for a_raw, a_twice in zip(raw["annotations"], twice["annotations"], strict=True):
        if a_raw["image_id"] == 1:
            # boxes map back to the true original; both scalings are exact per axis, so only float error remains
            back = boxes_to_original(np.array(a_twice["bbox"]), a)
            np.testing.assert_allclose(back, a_raw["bbox"], rtol=0, atol=0.5)


def test_cli_runs_and_reports_bad_input(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["preprocess", str(dataset), "--out", str(out), "--size", str(SIZE), "--workers", "1"]) == 0
    with Image.open(out / "train" / "a.jpg") as im:
        assert im.size == (256, 171)

    broken = make_dataset(tmp_path / "broken")
    (broken / "valid" / "c.jpg").unlink()
    assert main(["preprocess", str(broken), "--out", str(tmp_path / "x")]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("error: ") and "valid/c.jpg not found" in last_line and "image id 4" in last_line
    assert main(["preprocess", str(dataset), "--out", str(tmp_path / "y"), "--workers", "0"]) == 2
    assert main(["preprocess", str(dataset), "--out", str(dataset)]) == 2


def test_bad_input_raises_data_error_naming_the_file(tmp_path):
    root = make_dataset(tmp_path / "wrong_size")
    ann_file = split_annotation_path(root, "train")
    data = load_coco(ann_file)
    data["images"][0]["width"] = 601
    save_coco(ann_file, data)
    with pytest.raises(DataError, match=r"image id 1: .*a.jpg is 600x400 pixels but the record says 601x400"):
        preprocess_dataset(root, tmp_path / "o1", size=SIZE)

    data["images"][0]["width"] = 600
    data["annotations"][0]["image_id"] = 99
    save_coco(ann_file, data)
    with pytest.raises(DataError, match=r"_annotations.coco.json: annotation id 1 .* image id 99"):
        preprocess_dataset(root, tmp_path / "o2", size=SIZE)

    data["annotations"][0]["image_id"] = 1
    data["annotations"][0]["segmentation"]["size"] = [10, 10]
    save_coco(ann_file, data)
    with pytest.raises(DataError, match=r"image id 1: annotation id 1: RLE size \[10, 10\] differs"):
        preprocess_dataset(root, tmp_path / "o3", size=SIZE, workers=2)

    ann_file.write_text('{"images": [}', encoding="utf-8")
    with pytest.raises(DataError, match=r"_annotations.coco.json:1:13: invalid JSON"):
        preprocess_dataset(root, tmp_path / "o4", size=SIZE)


def test_unreferenced_files_are_counted_not_copied(tmp_path):
    root = make_dataset(tmp_path / "extra")
    (root / "train" / "stray.png").write_bytes(b"not referenced")
    summary = preprocess_dataset(root, tmp_path / "o", size=SIZE)
    assert summary["splits"]["train"]["unreferenced_files"] == 1
    assert not (tmp_path / "o" / "train" / "stray.png").exists()
    assert json.loads((tmp_path / "o" / "train" / "_annotations.coco.json").read_text())["images"][0]["id"] == 1


def test_palette_png_is_resampled_in_rgb(tmp_path):
    """Pillow resizes palette images with nearest-neighbour whatever filter is asked; the stage converts them to
    RGB first so edges are smoothed: a black/white vertical edge at x = 150 of a 300 px wide image, halved to 150,
    gets intermediate greys around x = 75 (nearest-neighbour would leave only 0 and 255)."""
    root = tmp_path / "palette"
    (root / "train").mkdir(parents=True)
    pixels = np.zeros((300, 300), dtype=np.uint8)
    pixels[:, 150:] = 1
    picture = Image.fromarray(pixels).convert("P")
    picture.putpalette([0, 0, 0, 255, 255, 255])
    picture.save(root / "train" / "p.png")
    record = {"id": 1, "file_name": "p.png", "width": 300, "height": 300}
    save_coco(split_annotation_path(root, "train"), {"images": [record], "annotations": [], "categories": []})
    preprocess_dataset(root, tmp_path / "out", size=150)
    with Image.open(tmp_path / "out" / "train" / "p.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (150, 150))
        row = np.asarray(im)[75, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    # the two output pixels either side of the edge are grey (measured 14 and 241), and the edge sits exactly
    # between them, so the Lanczos filter's response is symmetric: 14 + 241 = 255
    assert 0 < row[74] < 128 < row[75] < 255
    assert row[74] + row[75] == 255


def test_output_passes_validation(preprocessed, tmp_path):
    """The preprocessed dataset is a valid dataset in the same layout: the validate stage finds no problem."""
    from pipeline.validate import validate_dataset

    out, _ = preprocessed
    report = validate_dataset(out, tmp_path / "clean", tmp_path / "report.json")
    assert report.problems == []
    assert report.ok and report.exit_code == 0
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_fewshot_files_of_train_are_moved_exactly_as_the_train_split(tmp_path):
    """A few-shot file over train images 1 (a.jpg, 600x400: scaled by 256/600 to 256x171) and 3 (small.png, 200x150:
    fits, kept): its records and annotations come out equal to the train split's own output for those images."""
    root = make_dataset(tmp_path / "raw")
    train = load_coco(split_annotation_path(root, "train"))
    fewshot = {
        **train,
        "info": {"fewshot": {"k": 1, "seed": 3}},
        "images": [image for image in train["images"] if image["id"] in (1, 3)],
        "annotations": [ann for ann in train["annotations"] if ann["image_id"] in (1, 3)],
    }
    save_coco(root / "train" / "fewshot_train_shot1_seed3.json", fewshot)
    summary = preprocess_dataset(root, tmp_path / "out", size=SIZE)

    assert summary["fewshot"] == {"train/fewshot_train_shot1_seed3.json": {"images": 2, "annotations": 8}}
    assert summary["splits"]["train"]["unreferenced_files"] == 0  # carried, not a stray file
    out_train = load_coco(split_annotation_path(tmp_path / "out", "train"))
    out_fewshot = load_coco(tmp_path / "out" / "train" / "fewshot_train_shot1_seed3.json")
    assert out_fewshot["images"] == [by_id(out_train["images"])[i] for i in (1, 3)]
    assert (out_fewshot["images"][0]["width"], out_fewshot["images"][0]["height"]) == (256, 171)
    assert out_fewshot["annotations"] == [a for a in out_train["annotations"] if a["image_id"] in (1, 3)]
    assert out_fewshot["info"] == {"fewshot": {"k": 1, "seed": 3}}  # top-level keys kept


def test_fewshot_image_that_is_not_the_train_image_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "raw")
    train = load_coco(split_annotation_path(root, "train"))
    fewshot = {**train, "images": [dict(train["images"][0], width=601)], "annotations": []}
    save_coco(root / "train" / "fewshot_train_shot1_seed3.json", fewshot)
    with pytest.raises(DataError, match=r"fewshot_train_shot1_seed3.json: images\[0\] \(id 1\) is not an image of"):
        preprocess_dataset(root, tmp_path / "out", size=SIZE)
