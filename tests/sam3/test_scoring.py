"""score(), pr_curve(), per_category_rows() on small COCO and SA-Co files, against values worked out by hand.

COCO AP facts used below: COCOeval interpolates precision at 101 recall thresholds 0, 0.01, ..., 1 and averages
over the 10 IoU thresholds 0.50:0.95; a precision that never reaches a recall threshold counts 0 there.
Precision is tp / (tp + fp + eps), so "1" reads 1 - 2e-16 (pytest.approx).
SA-Co: pairs are image x category for COCO GT; only detections with score > 0.5 count.
"""

import copy
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam3.coco import encode_mask
from sam3.errors import ConfigError, DataError
from sam3.evaluation import per_category_rows, pr_curve, score

SIZE = 100


def image(image_id, **extra):
    return {"id": image_id, "file_name": f"{image_id}.jpg", "height": SIZE, "width": SIZE, **extra}


def box_mask(box):
    x, y, w, h = box
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


def ann(ann_id, image_id, category_id, box):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(box),
        "area": box[2] * box[3],
        "iscrowd": 0,
        "segmentation": encode_mask(box_mask(box)),
    }


def det(image_id, category_id, box, score_value, with_mask=False, mask_box=None):
    """A COCO result; with_mask adds the RLE of `mask_box` (default: the box itself)."""
    result = {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score_value}
    if with_mask:
        result["segmentation"] = encode_mask(box_mask(mask_box or box))
    return result


def coco(images, annotations, categories=("cat",)):
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(categories)]
    return {"images": images, "annotations": annotations, "categories": cats}


A, B, C = (10, 10, 20, 20), (50, 50, 30, 30), (5, 60, 40, 30)  # 20x20 small, 30x30 and 40x30 medium


def two_category_gt():
    # img1: cat A, dog B;  img2: cat C;  img3: nothing
    return coco(
        [image(1), image(2), image(3)],
        [ann(1, 1, 1, A), ann(2, 1, 2, B), ann(3, 2, 1, C)],
        categories=("cat", "dog"),
    )


def gt_as_predictions(gt, with_mask=False):
    return [det(a["image_id"], a["category_id"], a["bbox"], 1.0, with_mask) for a in gt["annotations"]]


def test_gt_as_predictions_is_perfect_bbox():
    gt = two_category_gt()
    metrics = score(gt, gt_as_predictions(gt), "bbox")
    # every detection sits exactly on its GT with the top score: precision 1 at every recall and IoU
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["bbox_AP50"] == pytest.approx(1.0)
    assert metrics["bbox_AP75"] == pytest.approx(1.0)
    assert metrics["bbox_APs"] == pytest.approx(1.0)  # A is 400 px < 32^2
    assert metrics["bbox_APm"] == pytest.approx(1.0)  # B 900, C 1200 px
    assert metrics["bbox_APl"] is None  # nothing above 96^2: undefined, null not -1
    assert metrics["bbox_AP_per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    # pairs 3 images x 2 categories = 6: (1,cat) (1,dog) (2,cat) TP, the other 3 TN -> MCC = 3*3/sqrt(3*3*3*3) = 1
    assert metrics["cgF1"] == pytest.approx(100.0)
    assert metrics["cgF1_50"] == pytest.approx(100.0)
    assert metrics["IL_MCC"] == pytest.approx(1.0)
    assert metrics["pmF1"] == pytest.approx(1.0)
    assert (metrics["num_pairs"], metrics["num_positive_pairs"], metrics["num_skipped_pairs"]) == (6, 3, 0)
    json.dumps(metrics, allow_nan=False)  # JSON-safe


def test_gt_as_predictions_is_perfect_segm():
    gt = two_category_gt()
    metrics = score(gt, gt_as_predictions(gt, with_mask=True), "segm")
    assert metrics["segm_AP"] == pytest.approx(1.0)
    assert metrics["segm_AP50"] == pytest.approx(1.0)
    assert metrics["segm_AP_per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert metrics["cgF1"] == pytest.approx(100.0)
    assert metrics["IL_MCC"] == pytest.approx(1.0)
    assert "bbox_AP" not in metrics


def test_segm_scores_masks_not_boxes():
    # same box as the GT, but the mask covers only its left 12 of 20 columns: mask IoU = 240 / 400 = 0.6
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A)])
    half = det(1, 1, A, 0.9)
    half["segmentation"] = encode_mask(box_mask((10, 10, 12, 20)))
    metrics = score(gt, [half], "segm")
    # AP = 1 at IoU .50/.55/.60, 0 at the other 7 -> 3/10; SA-Co: pmF1 mean 3/10, IL TP 1 TN 1 -> MCC 1
    assert metrics["segm_AP"] == pytest.approx(0.3)
    assert metrics["pmF1"] == pytest.approx(0.3)
    assert metrics["cgF1"] == pytest.approx(30.0)
    # the same prediction scored by box is perfect
    assert score(gt, [half], "bbox")["bbox_AP"] == pytest.approx(1.0)


def test_false_detection_on_image_without_gt_is_image_level_fp():
    gt = coco([image(1), image(2), image(3)], [ann(1, 1, 1, A)])
    preds = [det(1, 1, A, 0.9), det(2, 1, B, 0.6)]
    metrics = score(gt, preds)
    # pairs: (1,cat) TP, (2,cat) FP, (3,cat) TN.  pmF1: TP 1, FP 0 (the FP is on a pair without GT), FN 0 -> 1
    # IL_MCC = (1*1 - 1*0) / sqrt((1+1)(1+0)(1+1)(1+0)) = 1/2;  cgF1 = 100 * 1 * 0.5 = 50
    assert metrics["pmF1"] == pytest.approx(1.0)
    assert metrics["IL_MCC"] == pytest.approx(0.5)
    assert metrics["cgF1"] == pytest.approx(50.0)
    # AP: the false detection ranks below the true one (0.6 < 0.9), so precision stays 1 up to recall 1
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    # without it: IL TP 1, TN 2 -> (1*2) / sqrt(1*1*2*2) = 1
    assert score(gt, preds[:1])["cgF1"] == pytest.approx(100.0)


def test_missed_instance_is_fn():
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A), ann(2, 1, 1, B)])
    metrics = score(gt, [det(1, 1, A, 0.9)])
    # pmF1: TP 1, FP 0, FN 1 -> 2 / (2 + 0 + 1) = 2/3 at every threshold;  IL: TP 1 TN 1 -> MCC 1
    assert metrics["pmF1"] == pytest.approx(2 / 3)
    assert metrics["IL_MCC"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(200 / 3)
    # AP: recall reaches 1/2 with precision 1 -> recall thresholds 0, 0.01, ..., 0.50 (51 of 101) get 1
    assert metrics["bbox_AP"] == pytest.approx(51 / 101)


def test_duplicate_detection_is_fp_in_pmf1():
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A)])
    metrics = score(gt, [det(1, 1, A, 0.9), det(1, 1, A, 0.8)])
    # one GT matched once: TP 1, FP 1 (the duplicate), FN 0 -> pmF1 = 2 / (2 + 1) = 2/3;  IL: TP 1, TN 1 -> 1
    assert metrics["pmF1"] == pytest.approx(2 / 3)
    assert metrics["pmF1_50"] == pytest.approx(2 / 3)
    assert metrics["IL_MCC"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(200 / 3)
    # AP is not hurt: the duplicate ranks after the only GT is found
    assert metrics["bbox_AP"] == pytest.approx(1.0)


def test_detections_at_or_below_half_are_ignored():
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A)])
    preds = [det(1, 1, A, 0.9), det(1, 1, B, 0.3), det(2, 1, B, 0.4), det(2, 1, C, 0.5)]
    metrics = score(gt, preds)
    # kept: only the 0.9 one (0.5 is not > 0.5).  (1,cat) TP with FP 0, (2,cat) TN -> pmF1 1, MCC 1, cgF1 100
    assert metrics["pmF1"] == pytest.approx(1.0)
    assert metrics["IL_MCC"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(100.0)
    # lowering the last one's score does not matter; raising it just above 0.5 makes (2,cat) an IL FP:
    # IL TP 1, FP 1 -> zero denominator (TN + FN = 0) with FP != 0 -> MCC 0
    preds[3]["score"] = 0.51
    assert score(gt, preds)["IL_MCC"] == 0.0


def test_iou_06_counts_at_three_of_ten_thresholds():
    gt = coco([image(1), image(2)], [ann(1, 1, 1, (0, 0, 10, 10))])
    metrics = score(gt, [det(1, 1, (0, 0, 6, 10), 0.9)])
    # IoU = 60 / 100 = 0.6 >= 0.50, 0.55, 0.60 only.  pmF1_t = 1, 1, 1, then 0 x 7 -> mean 3/10
    # IL: TP 1, TN 1 -> MCC 1;  cgF1 = 100 * 0.3 = 30, cgF1_50 = 100
    assert metrics["pmF1"] == pytest.approx(0.3)
    assert metrics["pmF1_50"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(30.0)
    assert metrics["cgF1_50"] == pytest.approx(100.0)
    # AP: 1 at 3 IoU thresholds, 0 at 7 -> 0.3;  AP50 1, AP75 0
    assert metrics["bbox_AP"] == pytest.approx(0.3)
    assert metrics["bbox_AP50"] == pytest.approx(1.0)
    assert metrics["bbox_AP75"] == 0.0


def test_il_mcc_two_by_two_over_image_category_pairs():
    gt = coco(
        [image(1), image(2), image(3), image(4)],
        [ann(1, 1, 1, A), ann(2, 2, 2, B), ann(3, 3, 1, C)],
        categories=("cat", "dog"),
    )
    preds = [det(1, 1, A, 0.9), det(2, 2, B, 0.9), det(1, 2, A, 0.9)]  # the last: a dog where the cat is
    metrics = score(gt, preds)
    # pairs: (1,cat) TP  (1,dog) FP  (2,cat) TN  (2,dog) TP  (3,cat) FN  (3,dog) TN  (4,cat) TN  (4,dog) TN
    # TP 2, FP 1, FN 1, TN 4: MCC = (2*4 - 1*1) / sqrt((2+1)(2+1)(4+1)(4+1)) = 7/15
    # pmF1: TP 2, FP 0, FN 1 (C) -> 4 / 5;  cgF1 = 100 * 0.8 * 7/15 = 37.33
    assert metrics["IL_MCC"] == pytest.approx(7 / 15)
    assert metrics["pmF1"] == pytest.approx(0.8)
    assert metrics["cgF1"] == pytest.approx(100 * 0.8 * 7 / 15)
    assert (metrics["num_pairs"], metrics["num_positive_pairs"]) == (8, 3)


def saco_gt():
    pair = {"text_input": "", "queried_category": "0", "is_instance_exhaustive": 1, "is_pixel_exhaustive": 1}
    images = [
        image(11, **{**pair, "text_input": "red circle"}),  # positive, exhaustive
        image(12, **{**pair, "text_input": "blue square"}),  # negative, exhaustive
        image(13, **{**pair, "text_input": "green blob", "is_instance_exhaustive": 0}),  # not exhaustive: skipped
        image(14, **{**pair, "text_input": "yellow star"}),  # negative, exhaustive
    ]
    return coco(images, [ann(1, 11, 1, A), ann(2, 13, 1, B)], categories=("object",))


def test_saco_format_skips_non_exhaustive_pairs():
    # category_id is ignored in the SA-Co format (the prompt is the pair's text): 7 is not even a category
    preds = [det(11, 7, A, 0.9), det(12, 7, B, 0.8), det(13, 7, C, 0.9)]
    metrics = score(saco_gt(), preds)
    # scored pairs 11, 12, 14 (13 skipped): 11 TP, 12 FP, 14 TN.  pmF1 = 1 (FN 0, FP on 12 not counted)
    # MCC = (1*1 - 1*0) / sqrt(2*1*2*1) = 1/2 -> cgF1 50.  Pair 13 (a miss and an FP) would have been a positive pair.
    assert (metrics["num_pairs"], metrics["num_positive_pairs"], metrics["num_skipped_pairs"]) == (3, 1, 1)
    assert metrics["pmF1"] == pytest.approx(1.0)
    assert metrics["IL_MCC"] == pytest.approx(0.5)
    assert metrics["cgF1"] == pytest.approx(50.0)
    # AP over pairs 11, 12, 14 with categories pooled: TP (0.9) ranks above the FP (0.8) -> 1; no per-category AP
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["bbox_AP_per_category"] == {}


def test_saco_format_segm():
    preds = [det(11, 1, A, 0.9, with_mask=True), det(13, 1, A, 0.9, with_mask=True)]
    metrics = score(saco_gt(), preds, "segm")
    # pairs 11 TP, 12 TN, 14 TN -> MCC 1, pmF1 1
    assert metrics["cgF1"] == pytest.approx(100.0)
    assert metrics["segm_AP"] == pytest.approx(1.0)


def test_mixed_formats_are_refused():
    gt = saco_gt()
    del gt["images"][0]["text_input"]
    with pytest.raises(DataError, match="carry 'text_input'"):
        score(gt, [])


def test_empty_predictions_score_zero():
    metrics = score(two_category_gt(), [])
    assert metrics["bbox_AP"] == 0.0
    assert metrics["bbox_AP_per_category"] == {"cat": 0.0, "dog": 0.0}
    # IL: FN 3, TN 3 -> zero denominator (TP + FP = 0) with FN != 0 -> 0;  pmF1: TP 0 -> 0
    assert metrics["cgF1"] == 0.0
    assert metrics["pmF1"] == 0.0
    assert metrics["IL_MCC"] == 0.0


def test_category_without_gt_is_null():
    gt = coco([image(1)], [ann(1, 1, 1, A)], categories=("cat", "unused"))
    metrics = score(gt, [det(1, 1, A, 0.9)])
    assert metrics["bbox_AP_per_category"] == {"cat": pytest.approx(1.0), "unused": None}
    assert per_category_rows(metrics) == [{"category": "cat", "iou_type": "bbox", "AP": pytest.approx(1.0)}]


def test_crowd_gt_is_ignored():
    crowd = {**ann(2, 1, 1, B), "iscrowd": 1}
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A), crowd])
    metrics = score(gt, [det(1, 1, A, 0.9)])
    # the crowd region is neither a miss for AP (COCOeval ignores it) nor an instance for SA-Co: all perfect
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["cgF1"] == pytest.approx(100.0)


def test_pr_curve_by_hand():
    gt = coco([image(1), image(2)], [ann(1, 1, 1, A), ann(2, 1, 1, B)])
    points = pr_curve(gt, [det(1, 1, A, 0.9)])
    # one of two GT found at precision 1: precision 1 for recall 0 .. 0.50, then 0
    assert len(points) == 101
    assert points[50] == {"recall": pytest.approx(0.5), "precision": pytest.approx(1.0)}
    assert points[51] == {"recall": pytest.approx(0.51), "precision": 0.0}
    assert [p["precision"] for p in points] == pytest.approx([1.0] * 51 + [0.0] * 50)


def test_per_category_rows_sorted_and_without_nulls():
    metrics = {"segm_AP_per_category": {"b": 0.5, "a": None}, "bbox_AP_per_category": {"b": 0.25, "a": 0.75}}
    assert per_category_rows(metrics) == [
        {"category": "a", "iou_type": "bbox", "AP": 0.75},
        {"category": "b", "iou_type": "bbox", "AP": 0.25},
        {"category": "b", "iou_type": "segm", "AP": 0.5},
    ]


def left_part(box):
    """The left 2/3 of a box: a predicted mask whose area (and so COCO area range) differs from its box's."""
    x, y, w, h = box
    return (x, y, max(1, 2 * w // 3), h)


def random_case(seed):
    """5 images, 3 categories, 0-3 objects each; predictions: jittered GT, misses, random FPs, random scores.

    Predicted masks cover the left 2/3 of their box, so mask and box IoU, and mask and box areas, differ.
    """
    rng = np.random.default_rng(seed)
    images, anns, preds = [image(i) for i in range(1, 6)], [], []
    for image_id in range(1, 6):
        for _ in range(rng.integers(0, 4)):
            w, h = (int(v) for v in rng.integers(4, 60, size=2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            category = int(rng.integers(1, 4))
            anns.append(ann(len(anns) + 1, image_id, category, (x, y, w, h)))
            if rng.random() < 0.8:
                dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
                jittered = (max(0, x + dx), max(0, y + dy), w, h)
                preds.append(det(image_id, category, jittered, float(rng.random()), True, left_part(jittered)))
        for _ in range(rng.integers(0, 3)):
            w, h = (int(v) for v in rng.integers(4, 40, size=2))
            box = (int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h)), w, h)
            preds.append(det(image_id, int(rng.integers(1, 4)), box, float(rng.random()), True, left_part(box)))
    return coco(images, anns, categories=("a", "b", "c")), preds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_equals_pycocotools_on_the_same_files(tmp_path, iou_type):
    gt, preds = random_case(seed=7)
    if iou_type == "segm":  # plain mask results: loadRes takes each one's area and box from its mask
        preds = copy.deepcopy(preds)
        for p in preds:
            del p["bbox"]
    gt_file, pred_file = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_file.write_text(json.dumps(gt))
    pred_file.write_text(json.dumps(preds))

    coco_gt = COCO(str(gt_file))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(pred_file)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()

    metrics = score(gt_file, pred_file, iou_type)
    for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        expected = evaluator.stats[i]
        assert metrics[f"{iou_type}_{key}"] == (None if expected == -1 else pytest.approx(expected)), key
    assert 0.05 < metrics[f"{iou_type}_AP"] < 0.95  # a case with hits, misses and false positives
    for k, name in enumerate(["a", "b", "c"]):
        precision = evaluator.eval["precision"][:, :, k, 0, -1]
        assert metrics[f"{iou_type}_AP_per_category"][name] == pytest.approx(precision[precision > -1].mean())


def test_segm_area_ranges_use_the_mask_even_when_results_carry_a_box():
    # seed 7: some predicted masks (left 2/3 of their box) fall in another COCO area range than their boxes.
    # loadRes would take a result's area from its bbox when it has one and change segm APm; score() drops the box.
    gt, preds = random_case(seed=7)
    without_boxes = copy.deepcopy(preds)
    for p in without_boxes:
        del p["bbox"]
    assert score(gt, preds, "segm") == score(gt, without_boxes, "segm")


def test_input_errors_say_what_and_where(tmp_path):
    gt = two_category_gt()
    with pytest.raises(DataError, match=r"prediction 0: image_id 99 is not in"):
        score(gt, [det(99, 1, A, 0.9)])
    with pytest.raises(DataError, match=r"prediction 1: category_id 5 is not in"):
        score(gt, [det(1, 1, A, 0.9), det(1, 5, A, 0.9)])
    with pytest.raises(DataError, match=r"prediction 0: 'segmentation' must be a COCO RLE"):
        score(gt, [det(1, 1, A, 0.9)], "segm")
    bad_gt = saco_gt()
    bad_gt["annotations"][1]["category_id"] = 9
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 2\): category_id 9 is not in 'categories'"):
        score(bad_gt, [])
    with pytest.raises(ConfigError, match="iou_type"):
        score(gt, [], "keypoints")
    with pytest.raises(DataError, match="file not found"):
        score(tmp_path / "missing.json", [])
    broken = tmp_path / "pred.json"
    broken.write_text('[{"image_id": 1,\n  oops}]')
    with pytest.raises(DataError, match=r"pred.json:2:3: invalid JSON"):
        score(gt, broken)
