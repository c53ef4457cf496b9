"""sam3.inference: scores, the running top-k across prompts, the map back to original pixels, and the real tiny model
end to end (chunking, mask sizes, AP in original coordinates equal to pycocotools on the same files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.transforms.v2.functional import pil_to_tensor

from sam3.batch import PromptBatch
from sam3.coco import split_annotation_path
from sam3.data import val_transform
from sam3.errors import ConfigError, DataError
from sam3.evaluation import score
from sam3.inference import (
    TopDetections,
    boxes_to_original_xyxy,
    detection_scores,
    masks_to_original,
    merge_top,
    predict_dataset,
    predict_images,
    resolve_device,
)
from sam3.model import load_model
from sam3.tokenizer import attention_mask, tokenize
from tests.datasets import preprocess_dataset
from tests.sam3.tiny_coco import Ann, Img, write_split

CATEGORIES = {1: "cat", 2: "dog", 3: "bird"}
NUM_QUERIES = 16  # the tiny model's decoder queries


@pytest.fixture(scope="module")
def detector():
    return load_model("tiny")


# ---------------------------------------------------------------- scores and top-k


def test_score_is_sigmoid_logit_times_sigmoid_presence():
    logits = torch.tensor([[math.log(3), 0.0, -math.log(3)], [0.0, 0.0, 0.0]])
    presence = torch.tensor([math.log(3), -math.log(3)])
    # sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5, sigmoid(-ln 3) = 0.25
    # row 0 (presence 0.75): 0.5625, 0.375, 0.1875; row 1 (presence 0.25): 0.125 each
    expected = torch.tensor([[0.5625, 0.375, 0.1875], [0.125, 0.125, 0.125]])
    torch.testing.assert_close(detection_scores(logits, presence), expected)


def candidates(scores: list[float], prompts: list[int], first_box: int) -> TopDetections:
    """Candidates whose box k is (first_box + k) in every coordinate, so a kept row can be traced back."""
    boxes = torch.arange(first_box, first_box + len(scores), dtype=torch.float32)[:, None].repeat(1, 4)
    return TopDetections(torch.tensor(scores), torch.tensor(prompts), boxes, boxes[:, :, None].repeat(1, 1, 2))


def test_merge_top_keeps_the_best_across_prompts_and_chunks():
    chunk_a = candidates([0.2, 0.9, 0.5], [0, 0, 0], first_box=0)  # prompt 0: boxes 0, 1, 2
    chunk_b = candidates([0.7, 0.1, 0.9, 0.3, 0.6, 0.4], [1, 1, 1, 2, 2, 2], first_box=3)  # prompts 1, 2: boxes 3..8
    merged = merge_top(merge_top(None, chunk_a, 4), chunk_b, 4)
    # all scores: 0.9 (prompt 0, box 1) and 0.9 (prompt 1, box 5) tie -> the earlier prompt first; then 0.7 (box 3),
    # 0.6 (box 7). Dropped: 0.5, 0.4, 0.3, 0.2, 0.1.
    assert merged.scores.tolist() == pytest.approx([0.9, 0.9, 0.7, 0.6])
    assert merged.prompt_ids.tolist() == [0, 1, 1, 2]
    assert merged.boxes[:, 0].tolist() == [1, 5, 3, 7]
    assert merged.mask_logits[:, 0, 0].tolist() == [1, 5, 3, 7]
    # one sort over everything keeps the same detections in the same order
    everything = candidates([0.2, 0.9, 0.5, 0.7, 0.1, 0.9, 0.3, 0.6, 0.4], [0, 0, 0, 1, 1, 1, 2, 2, 2], first_box=0)
    at_once = merge_top(None, everything, 4)
    assert torch.equal(at_once.boxes, merged.boxes) and torch.equal(at_once.prompt_ids, merged.prompt_ids)


def test_merge_top_threshold_keeps_only_scores_above_it():
    merged = merge_top(None, candidates([0.2, 0.9, 0.5, 0.7], [0, 0, 1, 1], first_box=0), 10, score_threshold=0.5)
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7])  # 0.5 is not above 0.5
    assert merged.boxes[:, 0].tolist() == [1, 3]


# ---------------------------------------------------------------- geometry


def test_box_maps_to_exact_original_pixels():
    # a preprocessed image of 504 x 336 whose original was 1008 x 672 (factor 2 on both axes)
    record = {"id": 1, "width": 504, "height": 336, "orig_width": 1008, "orig_height": 672}
    boxes = torch.tensor([[0.5, 0.5, 0.25, 0.5], [0.95, 0.1, 0.2, 0.4]])
    # box 0: xyxy (0.375, 0.25, 0.625, 0.75) * (504, 336) = (189, 84, 315, 252) -> * 2 = (378, 168, 630, 504)
    # box 1: xyxy (0.85, -0.1, 1.05, 0.3) clipped to (0.85, 0, 1, 0.3) -> (428.4, 0, 504, 100.8)
    #        -> (856.8, 0, 1008, 201.6)
    expected = torch.tensor([[378.0, 168.0, 630.0, 504.0], [856.8, 0.0, 1008.0, 201.6]])
    torch.testing.assert_close(boxes_to_original_xyxy(boxes, record), expected)
    # without orig keys the dataset image is the original
    plain = {"id": 2, "width": 504, "height": 336}
    torch.testing.assert_close(boxes_to_original_xyxy(boxes[:1], plain), torch.tensor([[189.0, 84.0, 315.0, 252.0]]))


def test_mask_logits_map_to_the_original_size():
    record = {"id": 1, "width": 504, "height": 336, "orig_width": 1008, "orig_height": 672}
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0]]).repeat(4, 1)[None]  # [1, 4, 4]: left half inside
    (mask,) = list(masks_to_original(logits, record))
    # bilinear, pixel centres aligned: column x samples u = (x + 0.5) * 4 / 1008 - 0.5; the logits cross 0 halfway
    # between columns 1 and 2 (u = 1.5), i.e. x + 0.5 = 504: columns 0..503 are inside, 504..1007 outside
    assert mask.shape == (672, 1008) and mask.dtype == bool
    assert mask[:, :504].all() and not mask[:, 504:].any()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


# ---------------------------------------------------------------- the tiny model end to end


def direct_scores_and_outputs(detector, image_path: Path, prompts: list[str]):
    """Scores [P * N] (prompt-major) and raw outputs of one plain forward of every prompt on one image."""
    with Image.open(image_path) as pil:
        pixels = pil_to_tensor(pil.convert("RGB"))
    image = val_transform(pixels, torch.zeros(0, 4), None, 224).image
    ids = tokenize(prompts)
    batch = PromptBatch(
        pixel_values=image[None],
        input_ids=ids,
        attention_mask=attention_mask(ids),
        query_image=torch.zeros(len(prompts), dtype=torch.long),
        query_prompt=torch.arange(len(prompts)),
        targets=[{} for _ in prompts],
    )
    with torch.inference_mode():
        out = detector(batch, with_masks=True)
    scores = (out["pred_logits"].sigmoid() * out["presence_logits"].sigmoid()[:, None]).flatten()
    return scores, out


def test_predict_dataset_matches_a_plain_forward_in_original_pixels(detector, tmp_path):
    # a preprocessed 96 x 64 image whose original was 960 x 640
    image = Img(5, 96, 64, [Ann(1, (8, 16, 24, 32))], extra={"orig_width": 960, "orig_height": 640})
    write_split(tmp_path, "test", CATEGORIES, [image])
    results = predict_dataset(detector, tmp_path, "test", with_masks=True, max_dets=20, device="cpu")

    assert len(results) == 20  # 3 prompts x 16 queries = 48 candidates, the best 20 kept
    scores, out = direct_scores_and_outputs(detector, tmp_path / "test" / image.file_name, list(CATEGORIES.values()))
    best = torch.sort(scores, descending=True, stable=True).indices[:20]
    assert [r["score"] for r in results] == pytest.approx(scores[best].tolist(), abs=1e-6)
    assert [r["category_id"] for r in results] == [int(k) // NUM_QUERIES + 1 for k in best]
    assert {r["image_id"] for r in results} == {5}
    boxes = out["pred_boxes"].reshape(-1, 4)[best]  # cxcywh of the 224 x 224 input
    for result, (cx, cy, w, h), k in zip(results, boxes.tolist(), best.tolist(), strict=True):
        # the 224 x 224 input shows the whole 960 x 640 original: x0 = (cx - w / 2) * 960, clipped to the image
        x0, y0 = max(cx - w / 2, 0) * 960, max(cy - h / 2, 0) * 640
        x1, y1 = min(cx + w / 2, 1) * 960, min(cy + h / 2, 1) * 640
        assert result["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
        rle = result["segmentation"]
        assert rle["size"] == [640, 960]  # the ORIGINAL size, not the dataset's 64 x 96 nor the model's 224
        logits = out["pred_masks"].reshape(-1, *out["pred_masks"].shape[-2:])[k]
        expected = F.interpolate(logits[None, None], size=(640, 960), mode="bilinear")[0, 0] > 0
        iou = mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(expected.numpy().astype(np.uint8)))], [0])
        assert iou[0, 0] > 0.999 or (mask_utils.area(rle) == 0 and not expected.any())


def canonical(results: list[dict]) -> list[dict]:
    return sorted(results, key=lambda r: (r["image_id"], r["category_id"], [round(v, 2) for v in r["bbox"]]))


def test_prompt_chunks_and_batches_give_the_same_results(detector, tmp_path):
    images = [Img(1, 96, 64, [Ann(1, (8, 16, 24, 32))]), Img(2, 64, 96, [Ann(3, (10, 20, 30, 40))])]
    write_split(tmp_path, "test", CATEGORIES, images)
    # max_dets 48 = 3 prompts x 16 queries keeps every candidate, so near-equal scores cannot swap at the cut
    whole = predict_dataset(detector, tmp_path, "test", with_masks=True, max_dets=48, prompt_chunk=16, device="cpu")
    chunked = predict_dataset(
        detector, tmp_path, "test", with_masks=True, max_dets=48, prompt_chunk=2, batch_size=2, device="cpu"
    )
    assert len(whole) == len(chunked) == 2 * 48
    for a, b in zip(canonical(whole), canonical(chunked), strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        # GEMM shapes differ with the chunk size, so a logit within float error of 0 may flip one pixel
        assert mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0] > 0.99

    top = predict_dataset(detector, tmp_path, "test", max_dets=10, prompt_chunk=1, device="cpu")
    for image_id in (1, 2):
        kept = [r["score"] for r in top if r["image_id"] == image_id]
        every = sorted((r["score"] for r in whole if r["image_id"] == image_id), reverse=True)
        assert len(kept) == 10 and kept == sorted(kept, reverse=True)
        assert kept == pytest.approx(every[:10], abs=1e-5)  # the 10 best over ALL prompts, not per chunk


def test_predict_images_boxes_in_image_pixels_and_threshold(detector, tmp_path):
    write_split(tmp_path, "test", CATEGORIES, [Img(1, 96, 64, [Ann(1, (8, 16, 24, 32))])])
    with Image.open(tmp_path / "test" / "img_001.png") as pil:
        image = pil.copy()
    (detections,) = predict_images(detector, [image], ["cat", "dog"], with_masks=True, max_dets=5, device="cpu")
    assert len(detections) == 5
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
    for d in detections:
        assert d.prompt == ["cat", "dog"][d.prompt_index]
        assert 0 <= d.box[0] <= d.box[2] <= 96 and 0 <= d.box[1] <= d.box[3] <= 64
        assert d.mask.shape == (64, 96)
    middle = detections[2].score
    above = predict_images(detector, [image], ["cat", "dog"], score_threshold=middle, device="cpu")[0]
    assert [d.score for d in above] == pytest.approx([d.score for d in detections[:2]])


def test_errors_are_user_errors(detector, tmp_path):
    write_split(tmp_path, "test", CATEGORIES, [Img(1, 96, 64)])
    with pytest.raises(DataError, match="split 'valid' not found"):
        predict_dataset(detector, tmp_path, "valid", device="cpu")
    with pytest.raises(ConfigError, match="prompt_chunk"):
        predict_dataset(detector, tmp_path, "test", prompt_chunk=0, device="cpu")
    with pytest.raises(ConfigError, match="no prompts"):
        predict_images(detector, [Image.new("RGB", (32, 32))], [], device="cpu")


# ---------------------------------------------------------------- acceptance: AP in original coordinates


def test_ap_in_original_coordinates_equals_pycocotools_on_the_same_files(tmp_path):
    """Predict on a preprocessed copy (half size); score against the RAW GT file: our scoring and pycocotools run
    directly on the two files give the same AP, and it is above 0 only because the boxes are in original pixels."""
    detector = load_model("tiny")
    with torch.no_grad():  # no box offsets: every query's box is its grid cell (sam3.scratch), 1/4 of each side
        detector.model.detr_decoder.box_head.layer3.weight.zero_()
        detector.model.detr_decoder.box_head.layer3.bias.zero_()
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    # objects on grid cells (column, row): (0, 0) of a 200 x 160 image, (1, 2) and (3, 3) of a 160 x 200 one
    images = [
        Img(1, 200, 160, [Ann(1, (0, 0, 50, 40))]),
        Img(2, 160, 200, [Ann(2, (40, 100, 40, 50)), Ann(3, (120, 150, 40, 50))]),
    ]
    write_split(raw, "test", CATEGORIES, images)
    preprocess_dataset(raw, pre, size=100)
    assert json.loads(split_annotation_path(pre, "test").read_text())["images"][0]["width"] == 100

    predictions = predict_dataset(detector, pre, "test", device="cpu")
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(predictions))
    raw_gt = split_annotation_path(raw, "test")

    coco_gt = COCO(str(raw_gt))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(pred_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = score(raw_gt, pred_file, "bbox")
    ours = [metrics[k] for k in ("bbox_AP", "bbox_AP50", "bbox_AP75")]
    assert ours == pytest.approx(list(evaluator.stats[:3]))
    assert metrics["bbox_AP50"] > 0.05  # how high depends on the random model's ranking of its 16 grid boxes

    # the same predictions read as if in the preprocessed image's pixels (half size): a quarter of each GT box at best
    halved = [{**p, "bbox": [v / 2 for v in p["bbox"]]} for p in predictions]
    assert score(raw_gt, halved, "bbox")["bbox_AP50"] == 0
