"""pipeline.evaluate: metrics.json, predictions and plot files from the tiny model on a shapes split; the GT mapping
round trip (GT fed as predictions scores AP 1.0); --gt-original; the baseline's before/after table; one-line errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import cli, evaluate
from pipeline.preprocess import preprocess_dataset
from pipeline.shapes_data import CATEGORY_NAMES, build_shapes_dataset
from sam3.coco import annotation_mask, encode_mask, load_coco, split_annotation_path
from sam3.errors import DataError, ModelLoadError, Sam3Error
from sam3.evaluation.ground_truth import scale_to_original
from sam3.inference import boxes_to_original_xyxy, masks_to_original
from sam3.model import load_model
from tests.sam3.tiny_coco import Ann, Img, write_split

pytestmark = pytest.mark.usefixtures("outside_repo")  # stage flags only, not the repository's params.yaml


def parse(*argv: str) -> argparse.Namespace:
    """Arguments as `python -m pipeline evaluate ...` parses them."""
    return cli.build_parser().parse_args(["evaluate", *(str(a) for a in argv)])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Shapes at 224 px (the tiny model's size): 2 test images, 9 categories."""
    root = tmp_path_factory.mktemp("shapes")
    build_shapes_dataset(root, n=1, seed=0, n_valid=1, n_test=2)
    return root


def test_segmentation_writes_metrics_predictions_and_plots(shapes, tmp_path, capsys):
    out, plots = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "plots"
    stats, summary_file = tmp_path / "train_stats.jsonl", tmp_path / "summary.json"
    losses = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]  # steps 10..70; the summary's loss is the mean of the last 5: 5.0
    lines = [{"step": 10 * (k + 1), "loss": loss, "images_per_s": 2.0 + k} for k, loss in enumerate(losses)]
    lines.insert(3, {"step": 35, "event": "rollback", "reason": "spike", "lr_multiplier": 0.5})
    lines.append({"step": 70, "val/bbox_AP": 0.25})
    stats.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = parse(
        "--model", "tiny", "--dataset", shapes, "--out", out, "--mode", "segmentation", "--plots-dir", plots,
        "--summary", summary_file, "--train-stats", stats,
    )  # fmt: skip
    assert evaluate.run(args) == 0

    text = out.read_text()
    metrics = json.loads(text)
    assert text == json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "cgF1", "cgF1_50", "IL_MCC"):
        assert key in metrics
    for key in ("pmF1", "pmF1_50", "bbox_AP_per_category", "segm_AP_per_category"):
        assert key in metrics
    assert set(metrics["segm_AP_per_category"]) == set(CATEGORY_NAMES)
    # 9 prompts x 16 queries = 144 candidates per image, the best 100 kept; 2 images x 9 prompts = 18 SA-Co pairs
    assert (metrics["num_images"], metrics["num_predictions"], metrics["num_pairs"]) == (2, 200, 18)
    assert "baseline" not in metrics
    report = (out.parent / evaluate.REPORT_FILE).read_text()  # the model's table alone, and the figures
    assert "| metric | model: tiny |" in report and "| segm_AP |" in report
    for name in ("pr_curve.png", "per_category_ap.png", "predictions.png"):
        assert f"](plots/{name})" in report
        with Image.open(plots / name) as image:  # a real PNG a person can open
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
    summary = json.loads(summary_file.read_text())
    assert summary == {
        "bbox_AP": metrics["bbox_AP"],
        "bbox_AP50": metrics["bbox_AP50"],
        "segm_AP": metrics["segm_AP"],
        "segm_AP50": metrics["segm_AP50"],
        "cgF1": metrics["cgF1"],
        "IL_MCC": metrics["IL_MCC"],
        "pmF1": metrics["pmF1"],
        "retention_rejection": metrics["retention"]["rejection"],  # evaluate.retention_prompts defaults to 32
        "steps": 70,
        "train_loss": 5.0,
    }  # no images/s: it differs from machine to machine, and the summary is committed

    predictions = json.loads((out.parent / evaluate.PREDICTIONS_FILE).read_text())
    assert len(predictions) == 200
    assert all(p["segmentation"]["size"] == [224, 224] for p in predictions)
    # the metrics are those of the saved file scored on its own
    from sam3.evaluation import score

    gt_file = split_annotation_path(shapes, "test")
    assert metrics["segm_AP"] == pytest.approx(score(gt_file, predictions, "segm")["segm_AP"])
    assert metrics["bbox_AP"] == pytest.approx(score(gt_file, predictions, "bbox")["bbox_AP"])

    rows = json.loads((plots / evaluate.PER_CATEGORY_PLOT).read_text())
    assert {tuple(sorted(r)) for r in rows} == {("AP", "category", "iou_type")}
    assert {r["iou_type"] for r in rows} == {"bbox", "segm"}
    curve = json.loads((plots / evaluate.PR_CURVE_PLOT).read_text())
    assert len(curve) == 101 and curve[0]["recall"] == 0.0 and curve[-1]["recall"] == 1.0
    printed = capsys.readouterr().out
    assert printed.startswith("segm AP") and str(out) in printed


def ground_truth_as_predictions(coco: dict) -> list[dict]:
    """The preprocessed split's annotations as predictions, put through inference's own map to the original:
    boxes as normalised cxcywh of the model input, masks as logits (+1 inside, -1 outside) at the dataset size."""
    images = {image["id"]: image for image in coco["images"]}
    predictions = []
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        width, height = image["width"], image["height"]
        x, y, w, h = ann["bbox"]
        normalised = torch.tensor([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]])
        x0, y0, x1, y1 = boxes_to_original_xyxy(normalised, image)[0].tolist()
        mask = torch.from_numpy(annotation_mask(ann["segmentation"], height, width)).float()
        (orig_mask,) = masks_to_original((mask * 2 - 1)[None], image)
        predictions.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": 1.0,
                "segmentation": encode_mask(orig_mask),
            }
        )
    return predictions


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> tuple[Path, Path]:
    """Shapes drawn at 448 px (raw) and their copy shrunk to 224 px (orig_width/orig_height 448)."""
    root = tmp_path_factory.mktemp("pre")
    raw, pre = root / "raw", root / "pre"
    build_shapes_dataset(raw, n=1, seed=3, n_valid=1, n_test=3, image_size=448)
    preprocess_dataset(raw, pre, size=224)
    return raw, pre


def test_ground_truth_fed_as_predictions_scores_ap_1(preprocessed):
    raw, pre = preprocessed
    split = load_coco(split_annotation_path(pre, "test"))
    assert split["images"][0]["width"] == 224 and split["images"][0]["orig_width"] == 448
    gt = evaluate.ground_truth(pre, "test")  # the split's GT scaled back to 448
    assert all(image["width"] == 448 and "orig_width" not in image for image in gt["images"])
    predictions = ground_truth_as_predictions(split)

    metrics = evaluate.score_predictions(gt, predictions, with_masks=True)
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["segm_AP"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(100.0)

    # pycocotools alone, on the RAW 448 px file: the predicted boxes are where the original annotations are
    coco_gt = COCO(str(split_annotation_path(raw, "test")))
    evaluator = COCOeval(
        coco_gt, coco_gt.loadRes([{k: v for k, v in p.items() if k != "segmentation"} for p in predictions]), "bbox"
    )
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_gt_original_is_used_as_it_is_and_checked(preprocessed):
    raw, pre = preprocessed
    raw_file = split_annotation_path(raw, "test")
    assert evaluate.ground_truth(pre, "test", raw_file) == load_coco(raw_file)
    # the preprocessed file itself is not the original: its images are 224 px, the split says 448
    with pytest.raises(DataError, match="is 224x224 but the split records its original size as 448x448"):
        evaluate.ground_truth(pre, "test", split_annotation_path(pre, "test"))
    with pytest.raises(DataError, match=r"image id \d+ .* is missing"):
        evaluate.ground_truth(pre, "test", split_annotation_path(raw, "valid"))


def test_scaled_ground_truth_agrees_with_the_raw_file(preprocessed):
    raw, pre = preprocessed
    scaled = evaluate.ground_truth(pre, "test")
    original = load_coco(split_annotation_path(raw, "test"))
    for ours, theirs in zip(scaled["annotations"], original["annotations"], strict=True):
        # boxes: 224 -> 448 is x2 exactly; preprocess rounded nothing on the way down (448 -> 224 is /2)
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-6)
        ours_mask = annotation_mask(ours["segmentation"], 448, 448)
        theirs_mask = annotation_mask(theirs["segmentation"], 448, 448)
        assert (ours_mask & theirs_mask).sum() / (ours_mask | theirs_mask).sum() > 0.9  # resampled twice


def test_baseline_adds_the_before_after_table(shapes, tmp_path, capsys):
    model_dir = tmp_path / "finetuned"
    load_model("tiny", seed=1).save_pretrained(model_dir)  # stands in for a fine-tuned model
    out = tmp_path / "metrics.json"
    args = parse("--model", model_dir, "--dataset", shapes, "--out", out, "--baseline", "tiny", "--max-dets", "20")
    assert evaluate.run(args) == 0

    metrics = json.loads(out.read_text())
    baseline = metrics["baseline"]
    assert baseline["num_predictions"] == metrics["num_predictions"] == 40
    assert "segm_AP" not in metrics
    report = (tmp_path / evaluate.REPORT_FILE).read_text()
    lines = report.splitlines()
    assert lines[2] == f"| metric | baseline: tiny | model: {model_dir} | change |"
    rows = {line.split(" | ")[0][2:]: line for line in lines[4 : lines.index("", 4)]}  # the first table's rows
    assert list(rows) == ["bbox_AP", "bbox_AP50", "bbox_AP75", "cgF1", "cgF1_50", "IL_MCC", "pmF1", "pmF1_50"]
    before, after = baseline["bbox_AP50"], metrics["bbox_AP50"]
    assert rows["bbox_AP50"] == f"| bbox_AP50 | {before:.3f} | {after:.3f} | {after - before:+.3f} |"
    assert report in capsys.readouterr().out


def test_retention_for_the_model_and_its_baseline(shapes, tmp_path, capsys):
    model_dir = tmp_path / "finetuned"
    load_model("tiny", seed=1).save_pretrained(model_dir)  # stands in for a fine-tuned model
    out, summary_file = tmp_path / "metrics.json", tmp_path / "summary.json"
    args = parse(
        "--model", model_dir, "--dataset", shapes, "--out", out, "--baseline", "tiny", "--max-dets", "20",
        "--summary", summary_file, "--set", "evaluate.retention_prompts=5", "evaluate.retention_neighbours=0.4",
    )  # fmt: skip
    assert evaluate.run(args) == 0

    metrics = json.loads(out.read_text())
    model, baseline = metrics["retention"], metrics["baseline"]["retention"]
    # floor(5 x 0.4 + 1/2) = 2 nearest neighbours and 3 random phrases, asked of both models on the 2 test images
    assert (len(model["phrases"]["neighbours"]), len(model["phrases"]["random"])) == (2, 3)
    assert baseline["phrases"] == model["phrases"]
    for block, own in ((model, metrics), (baseline, metrics["baseline"])):
        assert (block["num_images"], block["num_phrases"], block["num_pairs"]) == (2, 5, 2 * 5)
        assert 0.0 <= block["rejection"] <= 1.0
        assert block["rejection"] == block["num_rejected"] / 10
        assert sum(block["counts"].values()) == 2 * len(CATEGORY_NAMES) + 10  # the split's own pairs + negatives
        assert block["IL_MCC_own"] == pytest.approx(own["IL_MCC"])  # own pairs counted as the SA-Co metrics do
        assert -1.0 <= block["IL_MCC"] <= 1.0
        assert "dataset" not in block

    report = (tmp_path / evaluate.REPORT_FILE).read_text()
    retention = report[report.index("## Retention") :].splitlines()
    assert f"| metric | baseline: tiny | model: {model_dir} | change |" in retention
    before, after = baseline["rejection"], model["rejection"]
    assert f"| rejection of negative prompts | {before:.3f} | {after:.3f} | {after - before:+.3f} |" in retention
    assert any(line.startswith("| IL_MCC with negative prompts | ") for line in retention)
    assert json.loads(summary_file.read_text())["retention_rejection"] == after
    printed = capsys.readouterr().out
    assert f"retention: rejection {after:.3f} ({model['num_rejected']} of 10 pairs)" in printed
    assert f"baseline retention: rejection {before:.3f}" in printed and "## Retention" in printed


def test_a_retention_dataset_is_scored_and_a_missing_one_named(shapes, tmp_path, capsys):
    out, summary_file = tmp_path / "metrics.json", tmp_path / "summary.json"
    common = ("--dataset", shapes, "--out", out, "--max-dets", "20", "--summary", summary_file)
    # the split itself as the held-out dataset: its AP must be the split's own; no negative prompts (0)
    args = parse(
        "--model", "tiny", *common, "--set", f"evaluate.retention_dataset={shapes}", "evaluate.retention_prompts=0"
    )
    assert evaluate.run(args) == 0
    metrics = json.loads(out.read_text())
    assert list(metrics["retention"]) == ["dataset"]
    held_out = metrics["retention"]["dataset"]
    assert isinstance(held_out["bbox_AP"], float) and held_out["bbox_AP"] == pytest.approx(metrics["bbox_AP"])
    assert (held_out["path"], held_out["split"], held_out["num_images"]) == (str(shapes), "test", 2)
    summary = json.loads(summary_file.read_text())
    assert summary["retention_AP"] == held_out["bbox_AP"] and "retention_rejection" not in summary
    assert "| held-out bbox_AP |" in (tmp_path / evaluate.REPORT_FILE).read_text()
    capsys.readouterr()

    # checked before any model loads (the model folder is missing too); one line, exit 2, no traceback
    missing = tmp_path / "held_out"
    argv = ["evaluate", "--model", str(tmp_path / "nope"), "--dataset", str(shapes), "--out", str(tmp_path / "m.json")]
    assert cli.main([*argv, "--set", f"evaluate.retention_dataset={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"error: evaluate.retention_dataset = {missing}: not a COCO dataset with a 'test' split" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--set", "evaluate.retention_prompts=-1"]) == 2
    assert "evaluate.retention_prompts must be >= 0" in capsys.readouterr().err


def test_comparison_table_by_hand():
    metrics = {"bbox_AP": 0.5, "cgF1": 40.0, "IL_MCC": None, "num_images": 3}
    baseline = {"bbox_AP": 0.25, "cgF1": 10.5, "IL_MCC": 0.1}
    table = evaluate.comparison_table(metrics, baseline, "after", "before", "title")
    assert table.splitlines() == [
        "## title",
        "",
        "| metric | baseline: before | model: after | change |",
        "|:--|--:|--:|--:|",
        "| bbox_AP | 0.250 | 0.500 | +0.250 |",  # 0.5 - 0.25
        "| cgF1 | 10.50 | 40.00 | +29.50 |",  # cgF1 is on 0..100: two decimals
        "| IL_MCC | 0.100 | n/a | n/a |",  # undefined after: no change to show
    ]


def test_errors_are_one_line_user_errors(shapes, tmp_path):
    out = tmp_path / "metrics.json"
    with pytest.raises(DataError, match="split 'train2' not found") as err:
        evaluate.run(parse("--model", tmp_path / "nope", "--dataset", shapes, "--split", "train2", "--out", out))
    assert "\n" not in str(err.value)  # the split is checked before the (missing) model
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        evaluate.run(parse("--model", tmp_path / "nope", "--dataset", shapes, "--out", out))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        evaluate.run(parse("--model", "tiny", "--dataset", shapes, "--out", out, "--baseline", tmp_path / "nope"))
    assert not out.exists()

    boxes_only = tmp_path / "boxes"
    write_split(boxes_only, "test", {1: "cat"}, [Img(1, 32, 32, [Ann(1, (4, 4, 8, 8), segmentation=[])])])
    with pytest.raises(Sam3Error, match="has no segmentation.*--mode detection"):
        evaluate.run(parse("--model", "tiny", "--dataset", boxes_only, "--out", out, "--mode", "segmentation"))


def test_scale_to_original_leaves_unresized_images_alone():
    coco = {
        "images": [
            {"id": 1, "width": 50, "height": 40, "orig_width": 100, "orig_height": 120},
            {"id": 2, "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 5], "area": 100},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12},
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    out = scale_to_original(coco)
    # image 1: sx = 100 / 50 = 2, sy = 120 / 40 = 3 -> bbox [20, 30, 40, 15], area 40 * 15 = 600
    assert out["images"][0] == {"id": 1, "width": 100, "height": 120}
    assert out["annotations"][0]["bbox"] == [20.0, 30.0, 40.0, 15.0] and out["annotations"][0]["area"] == 600.0
    assert out["annotations"][1] == coco["annotations"][1] and out["images"][1] == coco["images"][1]
    assert coco["images"][0]["width"] == 50  # the input is not changed
