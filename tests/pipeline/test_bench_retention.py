"""bench.retention end to end at toy size: every method and every metric comes out, each in [0, 1]."""

from __future__ import annotations

import json

import pytest

from bench import retention
from pipeline.shapes_data import CATEGORY_NAMES


def test_the_negative_phrases_name_no_shape_or_colour_and_retain_never_asks_them():
    negatives = retention.negative_phrases()
    assert len(negatives) == retention.NEGATIVE_PHRASES
    assert retention.negative_phrases() == negatives  # a fixed sample
    words = {w for phrase in negatives for w in phrase.lower().replace("(", " ").replace(")", " ").split()}
    assert not words & retention.VISUAL_WORDS
    pool = retention.retain_phrases(negatives)
    assert not set(negatives) & set(pool)
    assert not [p for p in pool if "triangle" in p.lower()]


def test_concept_datasets_keep_only_their_categories(tmp_path):
    data, counts = retention.build_concepts(tmp_path, n_train=12, n_test=6, seed=0)
    for concept, shapes in retention.CONCEPTS.items():
        coco = json.loads((getattr(data, concept) / "test" / "_annotations.coco.json").read_text())
        names = {c["name"] for c in coco["categories"]}
        assert names == {n for n in CATEGORY_NAMES if n.split(" ")[-1] in shapes}
        ids = {c["id"] for c in coco["categories"]}
        assert all(a["category_id"] in ids for a in coco["annotations"])
        assert {a["image_id"] for a in coco["annotations"]} == {i["id"] for i in coco["images"]}
        assert len(coco["images"]) == counts[concept]["test"] > 0


@pytest.mark.slow
def test_main_reports_every_method_and_metric_in_range(capsys):
    args = [
        "--seeds",
        "0",
        "--pretrain-steps",
        "8",
        "--finetune-steps",
        "2",
        "--n-train",
        "8",
        "--n-test",
        "6",
        "--variants",
    ]
    returned = retention.main(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(returned))
    methods = ("pretrained", *retention.METHODS, *retention.VARIANTS)
    assert set(printed["summary"]) == set(methods)
    (seed,) = printed["seeds"]
    assert seed["seed"] == 0 and set(seed["methods"]) == set(methods)
    for method in methods:
        for source in (seed["methods"][method]["metrics"], printed["summary"][method]):
            assert set(retention.METRICS) <= set(source)
            assert all(0.0 <= source[key] <= 1.0 for key in retention.METRICS), (method, source)
    assert {seed["methods"][m]["train"]["steps"] for m in methods[1:]} == {2}
    assert seed["methods"]["pretrained"]["train"]["steps"] == 8
    assert printed["machine"]["cpu_count"] >= 1 and printed["date"] and printed["wall_seconds"] > 0
