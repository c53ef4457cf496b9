"""pipeline.retention: how the negative phrases are chosen, and the Retention table (the stage: test_evaluate.py)."""

from __future__ import annotations

import pytest

from pipeline.negatives import name_keys
from pipeline.retention import RetentionOptions, choose_phrases, retention_summary, retention_table, split_phrases
from sam3.model import load_model

RANKED = [f"phrase {k}" for k in range(10)]  # nearest first


def test_split_phrases_takes_the_nearest_then_a_seeded_draw_of_the_rest():
    phrases = split_phrases(RANKED, count=5, neighbours=0.5, seed=0)
    assert phrases.neighbours == RANKED[:3]  # floor(5 x 0.5 + 1/2) = 3
    assert len(phrases.random) == 2 and set(phrases.random) <= set(RANKED[3:])
    assert phrases.random == sorted(phrases.random, key=RANKED.index)  # kept in ranking order
    assert split_phrases(RANKED, 5, 0.5, seed=0) == phrases  # the same seed, the same phrases
    assert any(split_phrases(RANKED, 5, 0.5, seed=s).random != phrases.random for s in range(1, 6))
    assert split_phrases(RANKED, 4, 0.0, seed=0).neighbours == []  # all random
    assert split_phrases(RANKED, 4, 1.0, seed=0).all == RANKED[:4]  # all nearest
    short = split_phrases(RANKED[:3], 8, 0.5, seed=0)  # fewer phrases than asked: all of them, no repeat
    assert sorted(short.all) == sorted(RANKED[:3])


def test_chosen_phrases_name_no_category():
    categories = ["dog", "cats", "traffic light"]  # all in the bank (COCO), "cats" as a plural
    phrases = choose_phrases(load_model("tiny"), categories, RetentionOptions(prompts=40, neighbours=0.5, seed=3))
    assert (len(phrases.neighbours), len(phrases.random)) == (20, 20)
    assert len(set(phrases.all)) == 40
    taken = frozenset().union(*(name_keys(c) for c in categories))
    assert all(name_keys(phrase).isdisjoint(taken) for phrase in phrases.all)  # no "dog", "cat", "traffic lights"


MODEL = {
    "phrases": {"neighbours": ["a", "b"], "random": ["c"]},
    "rejection": 0.5,
    "IL_MCC": 0.25,
    "num_images": 2,
    "num_phrases": 3,
    "num_pairs": 6,
    "num_rejected": 3,
    "threshold": 0.5,
    "dataset": {"path": "data/held_out", "split": "test", "bbox_AP": 0.125, "bbox_AP50": None},
}
BASELINE = {**MODEL, "rejection": 0.875, "IL_MCC": 0.5, "dataset": {**MODEL["dataset"], "bbox_AP": 0.25}}


def test_retention_table_by_hand():
    lines = retention_table(MODEL, BASELINE, "after", "before").splitlines()
    assert lines[0] == "## Retention"
    assert lines[2].startswith("3 phrases outside the categories (2 nearest, 1 random) on 2 images: 6 negative pairs")
    assert lines[4:] == [
        "| metric | baseline: before | model: after | change |",
        "|:--|--:|--:|--:|",
        "| rejection of negative prompts | 0.875 | 0.500 | -0.375 |",  # 0.5 - 0.875
        "| IL_MCC with negative prompts | 0.500 | 0.250 | -0.250 |",
        "| held-out bbox_AP | 0.250 | 0.125 | -0.125 |",
        "| held-out bbox_AP50 | n/a | n/a | n/a |",  # undefined: no change to show
    ]
    alone = retention_table(MODEL, None, "after", "before").splitlines()
    assert alone[4:7] == ["| metric | model: after |", "|:--|--:|", "| rejection of negative prompts | 0.500 |"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_retention_summary(iou_type):
    block = {**MODEL, "dataset": {"bbox_AP": 0.125, "segm_AP": 0.0625}}
    expected_ap = 0.125 if iou_type == "bbox" else 0.0625  # mask AP in segmentation mode
    assert retention_summary(block, iou_type) == {"retention_rejection": 0.5, "retention_AP": expected_ap}
    assert retention_summary({"dataset": block["dataset"]}, iou_type) == {"retention_AP": expected_ap}
