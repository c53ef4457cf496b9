"""`python -m pipeline fetch` and `pipeline.fewshot`: few-shot draws worked out by hand, the ODinW13 layout check on
a generated folder (names with spaces), and RF100-VL's offline path (the `rf100vl` package is not installed here).
"""

import argparse
import importlib.util
import json

import numpy as np
import pytest

from pipeline import fetch
from pipeline.fewshot import fewshot_file_name, instance_counts, make_fewshot, shortfall
from pipeline.suites import ODINW13_DATASETS
from sam3.coco import ANNOTATIONS_FILE, SPLITS, load_coco, save_coco
from sam3.errors import ConfigError, DataError

SEEDS = (3, 30, 300)


def hand_coco():
    """4 images; A twice in image 1, B in 2, A+B in 3, C in 4; category D has no annotation."""
    anns = [(1, 1, 1), (2, 1, 1), (3, 2, 2), (4, 3, 1), (5, 3, 2), (6, 4, 3)]  # (ann id, image id, category id)
    return {
        "info": {"description": "hand"},
        "licenses": [],
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in (1, 2, 3, 4)],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": [0, 0, 2, 2]} for a, i, c in anns],
        "categories": [{"id": c, "name": n} for c, n in ((1, "A"), (2, "B"), (3, "C"), (4, "D"))],
    }


def random_coco(n_images=60, seed=0):
    """A generated training set: 3 categories, 0-3 instances per image; category 'rare' has only 4 instances."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "file_name": f"img {image_id}.jpg", "width": 32, "height": 32})
        for category_id in rng.integers(1, 3, size=rng.integers(0, 4)).tolist():
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id, "bbox": [1, 1, 4, 4]})
    for image_id in (5, 17, 33, 50):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 3, "bbox": [2, 2, 3, 3]})
    cats = [{"id": 1, "name": "fish"}, {"id": 2, "name": "shark"}, {"id": 3, "name": "rare"}]
    return {"images": images, "annotations": anns, "categories": cats}


# ----------------------------------------------------------------------------------------------- make_fewshot


def test_hand_draw_seed0_takes_whole_images():
    """k=1. default_rng(0).permutation(4) + 1 = [3, 1, 2, 4] (pinned below). Walk: image 3 -> A(4), B(5), now A=1,
    B=1; image 1 -> A closed, nothing; image 2 -> B closed, nothing; image 4 -> C(6). Images {3, 4}, anns {4, 5, 6}."""
    assert (np.random.default_rng(0).permutation(4) + 1).tolist() == [3, 1, 2, 4]
    out = make_fewshot(hand_coco(), k=1, seed=0)
    assert [img["id"] for img in out["images"]] == [3, 4]
    assert [a["id"] for a in out["annotations"]] == [4, 5, 6]
    assert [c["name"] for c in out["categories"]] == ["A", "B", "C", "D"]  # every category kept, ids unchanged
    assert out["info"]["description"] == "hand" and out["info"]["fewshot"]["k"] == 1
    assert out["info"]["fewshot"]["seed"] == 0 and out["licenses"] == []
    assert shortfall(out, 1) == {"D": 0}  # D has no instance anywhere


def test_hand_draw_seed1_can_exceed_k():
    """k=1. default_rng(1).permutation(4) + 1 = [1, 2, 3, 4]. Image 1: A open -> both A(1), A(2) taken (A=2 > k);
    image 2 -> B(3); image 3 -> A, B closed; image 4 -> C(6). Images {1, 2, 4}, anns {1, 2, 3, 6}."""
    assert (np.random.default_rng(1).permutation(4) + 1).tolist() == [1, 2, 3, 4]
    out = make_fewshot(hand_coco(), k=1, seed=1)
    assert [img["id"] for img in out["images"]] == [1, 2, 4]
    assert [a["id"] for a in out["annotations"]] == [1, 2, 3, 6]
    assert instance_counts(out) == {1: 2, 2: 1, 3: 1, 4: 0}


def test_draw_ignores_input_order():
    coco = hand_coco()
    shuffled = {**coco, "images": coco["images"][::-1], "annotations": coco["annotations"][::-1]}
    assert make_fewshot(shuffled, k=1, seed=0) == make_fewshot(coco, k=1, seed=0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_each_category_reaches_k_when_available(k):
    coco = random_coco()
    available = instance_counts(coco)
    for seed in SEEDS:
        out = make_fewshot(coco, k=k, seed=seed)
        got = instance_counts(out)
        for category_id, n in available.items():
            assert got[category_id] >= min(k, n), (k, seed, category_id)
        assert got[3] == min(k, 4)  # 'rare' has 4 instances on 4 images: all of them once k >= 4
        # referenced images exist, and every kept image contributes an annotation
        image_ids = [img["id"] for img in out["images"]]
        assert image_ids == sorted(set(image_ids))
        assert {a["image_id"] for a in out["annotations"]} == set(image_ids)
        # a subset of the source: records unchanged
        source_anns = {a["id"]: a for a in coco["annotations"]}
        assert all(source_anns[a["id"]] == a for a in out["annotations"])
        assert len(out["images"]) < len(coco["images"])
    assert shortfall(make_fewshot(coco, k=10, seed=3), 10) == {"rare": 4}


def test_deterministic_and_seeds_differ():
    coco = random_coco()
    draws = {seed: make_fewshot(coco, k=3, seed=seed) for seed in SEEDS}
    assert make_fewshot(coco, k=3, seed=30) == draws[30]
    image_sets = [tuple(img["id"] for img in draws[s]["images"]) for s in SEEDS]
    assert len(set(image_sets)) == 3


def test_bad_input_is_reported():
    coco = hand_coco()
    with pytest.raises(ConfigError, match="k must be >= 1"):
        make_fewshot(coco, k=0, seed=3)
    dangling = {**coco, "annotations": [*coco["annotations"], {"id": 99, "image_id": 42, "category_id": 1}]}
    with pytest.raises(DataError, match="annotation 99: image_id 42"):
        make_fewshot(dangling, k=1, seed=3)
    with pytest.raises(DataError, match="'images'"):
        make_fewshot({"annotations": [], "categories": []}, k=1, seed=3)


# ---------------------------------------------------------------------------------------------------- ODinW13


def fetch_args(*argv):
    parser = argparse.ArgumentParser()
    fetch.add_arguments(parser)
    return parser.parse_args(list(argv))


def folder_of(dataset):
    return next(e for e in fetch.ODINW13_TRAIN_FOLDERS if e.dataset == dataset)


def test_layout_table_covers_the_suite():
    assert tuple(e.dataset for e in fetch.ODINW13_TRAIN_FOLDERS) == ODINW13_DATASETS
    assert folder_of("Aquarium").folder == "Aquarium/Aquarium Combined.v2-raw-1024.coco/train"


def test_odinw13_two_present_generates_and_reports_missing(tmp_path, capsys):
    root = tmp_path / "odinw"
    aquarium = root / folder_of("Aquarium").folder
    mushrooms = root / folder_of("NorthAmericaMushrooms").folder
    save_coco(aquarium / "annotations_without_background.json", random_coco(seed=1))
    save_coco(mushrooms / ANNOTATIONS_FILE, random_coco(seed=2))  # Roboflow's name: the fallback source
    shipped = mushrooms / fewshot_file_name(10, 3)
    shipped.write_text('{"images": [], "annotations": [], "categories": [], "shipped": true}\n')

    assert fetch.run(fetch_args("odinw13", "--root", str(root))) == 0
    out = capsys.readouterr().out

    for seed in SEEDS:  # generated files are the documented draw of the full annotations
        assert load_coco(aquarium / fewshot_file_name(10, seed)) == make_fewshot(random_coco(seed=1), 10, seed)
    assert shipped.read_text() == '{"images": [], "annotations": [], "categories": [], "shipped": true}\n'
    for seed in (30, 300):
        assert load_coco(mushrooms / fewshot_file_name(10, seed)) == make_fewshot(random_coco(seed=2), 10, seed)
    assert f"generated {aquarium / fewshot_file_name(10, 300)}" in out
    assert "found fewshot_train_shot10_seed3.json" in out
    assert out.count("NOT READY") == 11
    assert f"missing: expected training folder {root / 'CottontailRabbits/train'}" in out
    assert "2 of 13 ODinW13 datasets ready" in out and "warning: 11 dataset(s) not ready" in out

    # a second run finds all six files and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in root.rglob("fewshot_*.json")}
    assert fetch.run(fetch_args("odinw13", "--root", str(root))) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("fewshot_*.json")} == before
    assert "generated" not in capsys.readouterr().out


def test_odinw13_pistols_and_k(tmp_path, capsys):
    root = tmp_path / "odinw"
    export = root / "pistols" / "export"
    save_coco(export / "train_annotations_without_background.json", hand_coco())
    assert fetch.run(fetch_args("odinw13", "--root", str(root), "--fewshot-k", "1")) == 0
    assert load_coco(export / fewshot_file_name(1, 3)) == make_fewshot(hand_coco(), 1, 3)
    assert "fewer than 1 instances in the whole set: {'D': 0}" in capsys.readouterr().out


def test_odinw13_nothing_ready_is_an_error(tmp_path, capsys):
    root = tmp_path / "odinw"
    (root / "pothole" / "train").mkdir(parents=True)  # folder present but nothing to draw from
    with pytest.raises(DataError, match="none of the 13 ODinW13 datasets"):
        fetch.run(fetch_args("odinw13", "--root", str(root)))
    out = capsys.readouterr().out
    assert f"no full training annotations to draw them from (expected {root / 'pothole/train'}" in out
    with pytest.raises(ConfigError, match="--fewshot-k"):
        fetch.run(fetch_args("odinw13", "--root", str(root), "--fewshot-k", "0"))


# --------------------------------------------------------------------------------------------------- RF100-VL

needs_no_package = pytest.mark.skipif(
    importlib.util.find_spec("rf100vl") is not None, reason="tests the path without the rf100vl package"
)


def make_split(root, dataset, split):
    save_coco(root / dataset / split / ANNOTATIONS_FILE, {"images": [], "annotations": [], "categories": []})


@needs_no_package
def test_rf100vl_without_package_says_what_to_do(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        fetch.run(fetch_args("rf100vl", "--root", str(tmp_path / "rf")))
    assert "pip install rf100vl" in str(err.value) and "ROBOFLOW_API_KEY" in str(err.value)
    assert "\n" not in str(err.value)  # the CLI prints it as one line
    out = capsys.readouterr().out
    assert f"{tmp_path / 'rf'}/<dataset>/{{train,valid,test}}/_annotations.coco.json" in out
    assert "dataset list unknown" in out


@needs_no_package
def test_rf100vl_layout_check_with_domains_file(tmp_path, capsys):
    root = tmp_path / "rf"
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps({"cells": "Lab Imaging", "boats": "Aerial", "chess": "Misc"}))
    for split in SPLITS:
        make_split(root, "boats", split)
    make_split(root, "cells", "train")
    with pytest.raises(ConfigError, match="pip install rf100vl"):
        fetch.run(fetch_args("rf100vl", "--root", str(root), "--domains-file", str(domains)))
    out = capsys.readouterr().out
    assert "present (1): boats" in out and "missing (1): chess" in out
    assert f"incomplete: {root / 'cells'} lacks valid/{ANNOTATIONS_FILE}, test/{ANNOTATIONS_FILE}" in out

    for split in SPLITS:  # complete everything: nothing to download, no package needed
        make_split(root, "cells", split)
        make_split(root, "chess", split)
    assert fetch.run(fetch_args("rf100vl", "--root", str(root), "--domains-file", str(domains))) == 0
    assert "all 3 RF100-VL datasets are present" in capsys.readouterr().out


def test_rf100vl_without_api_key(tmp_path, monkeypatch, capsys):
    """An importable `rf100vl` (a bare stand-in folder: the real package is not installed here) but no key."""
    package = tmp_path / "site" / "rf100vl"
    (package / "assets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "assets" / "dataset_name_to_category.json").write_text(json.dumps({"boats": "Aerial"}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="ROBOFLOW_API_KEY is not set"):
        fetch.run(fetch_args("rf100vl", "--root", str(tmp_path / "rf")))
    out = capsys.readouterr().out
    assert "missing (1): boats" in out and "export ROBOFLOW_API_KEY=" in out
