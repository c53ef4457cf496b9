"""The DVC suites (suites/<suite>/{dvc.yaml,params.yaml}) and `python -m pipeline suite-params`.

Fast: the params files in git are what `suite_params.render` writes for the recipe's defaults, with every list empty,
so that DVC sees no suite stage at all; `suite-params` lists what is on disk and keeps the other values; mistakes
in the file are ConfigErrors naming the key.
The cache_features stage of each suite builds the folder its train stage reads, on the same annotation file.
Slow: `dvc repro` for real in a throw-away git + DVC copy of the repository (tests/pipeline/prefect_repo.py) on
generated suites of 3 shapes datasets: ODinW13 x 2 seeds, training each seed on its few-shot file (one shipped with
the dataset, the others drawn by validate), and RF100-VL with a domains file; every matrix stage and the aggregate
run once (cache_features writing its "off" manifest), the aggregate table holds every run, a second repro does
nothing and `dvc status` is clean. Then cache.enabled true: one run's cache_features and train run again, train
reading the features (ODinW13: the seed's few-shot images only; RF100-VL: every training image, the 2-image subset
drawn from them).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import statistics
from pathlib import Path

import pytest
import yaml

from pipeline import suite_params
from pipeline.cli import main
from pipeline.flows.flow import ODINW13_OVERRIDES, RF100_OVERRIDES
from pipeline.suite_params import SuiteParams, default_params, fill, load, render, save
from pipeline.suites import ODINW13_SEEDS, ODINW13_SHOTS
from sam3.coco import ANNOTATIONS_FILE, load_coco, save_coco
from sam3.errors import ConfigError, DataError
from tests.pipeline.prefect_repo import REPO, copy_repo, shapes_datasets
from tests.pipeline.test_dvc_pipeline import UP_TO_DATE, dvc, git_commit, stages_run

SUITES = ("rf100vl", "odinw13")


def write_roboflow(folder: Path, splits: tuple[str, ...] = ("train", "valid", "test")) -> Path:
    """A dataset folder with an (empty) annotation file per split: all that finding datasets looks at."""
    for split in splits:
        save_coco(folder / split / ANNOTATIONS_FILE, {"images": [], "annotations": [], "categories": []})
    return folder


# ---------------------------------------------------------------------------------------------- the params files


@pytest.mark.parametrize("suite", SUITES)
def test_params_in_git_are_the_rendered_defaults_with_no_dataset(suite):
    path = REPO / suite_params.params_path(suite)
    assert path.read_text(encoding="utf-8") == render(suite, default_params(suite))
    params = load(suite, path)
    assert (params.datasets, params.aggregate) == ([], [])  # no stage without data: the root `dvc status` stays clean


def test_defaults_are_the_recipe_and_the_prefect_deployments_use_them():
    odinw = default_params("odinw13")
    assert odinw.validate_flags == {"fewshot-k": ODINW13_SHOTS, "fewshot-seeds": list(ODINW13_SEEDS)}
    assert odinw.seeds() == [3, 30, 300] and default_params("rf100vl").seeds() == []
    assert odinw.train_flags == {"set": ODINW13_OVERRIDES} and ODINW13_OVERRIDES[-1] == "loss.pos_weight=5.0"
    assert default_params("rf100vl").train_flags == {"set": RF100_OVERRIDES}
    assert "train.subset_images=100" in RF100_OVERRIDES


def test_render_then_load_round_trips_every_value(tmp_path):
    params = SuiteParams(
        root="data/raw/x",
        datasets=["a", "b-2", "c.v1"],
        aggregate=["odinw13"],
        validate_flags={"fewshot-k": 5, "fewshot-seeds": [1, 2]},
        train_flags={"set": ["train.max_steps=null", "optim.betas=[0.9,0.99]"]},
        aggregate_flags={"metric": "bbox_AP50"},
    )
    save("odinw13", params, tmp_path / "p.yaml")
    assert load("odinw13", tmp_path / "p.yaml") == params
    text = (tmp_path / "p.yaml").read_text()
    assert "  datasets: [a, b-2, c.v1]  # the matrix" in text and "    fewshot-seeds: [1, 2]\n" in text


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"root": "r", "dataset": []}, r"unknown keys \['dataset'\]"),
        ({"root": "r", "aggregate": ["rf100vl"]}, r"odinw13.aggregate must be \[\] or \[odinw13\]"),
        ({"root": "r", "datasets": ["has space"]}, "odinw13.datasets must be a list of folder names"),
        ({"root": "r", "train_flags": {"set": ["train.freeze=heads; rm -rf x"]}}, "values go into the stage command"),
        ({"root": "r", "validate_flags": {"fewshot-seeds": ["3"]}}, "must be a list of integers"),
        ({"root": "my data"}, "odinw13.root = 'my data'"),
    ],
)
def test_mistakes_in_the_file_name_the_key(tmp_path, section, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"odinw13": section}), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load("odinw13", path)


# ----------------------------------------------------------------------------------------------- suite-params


def test_suite_params_lists_the_datasets_on_disk_and_keeps_the_other_values(tmp_path, monkeypatch, capsys):
    """Under data/raw/odinw13: Aquarium (has seed 3's few-shot file), pothole, Raccoon, a folder without test/, one
    whose name has a space. The user's edited train_flags survive the rewrite."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/raw/odinw13"
    for name in ("Aquarium", "pothole", "Raccoon", "Aquarium copy"):
        write_roboflow(root / name)
    write_roboflow(root / "notes", splits=("train",))
    save_coco(root / "Aquarium/train/fewshot_train_shot10_seed3.json", {"images": []})
    file = suite_params.params_path("odinw13", tmp_path)
    edited = default_params("odinw13")
    edited.train_flags = {"set": ["train.max_steps=5"]}
    save("odinw13", edited, file)

    assert main(["suite-params", "odinw13", "--root", "data/raw/odinw13", "--params", str(REPO / "params.yaml")]) == 0
    written = load("odinw13", file)
    assert written.datasets == ["Aquarium", "Raccoon", "pothole"]  # sorted, as `sorted` orders names
    assert (written.root, written.aggregate, written.train_flags) == (
        "data/raw/odinw13",
        ["odinw13"],
        edited.train_flags,
    )
    out = capsys.readouterr().out
    assert "left out data/raw/odinw13/notes: no test/_annotations.coco.json" in out
    assert "left out data/raw/odinw13/Aquarium copy: name has characters a stage command would split" in out
    assert "3 of the 13 odinw13 datasets (pipeline.suites.ODINW13_DATASETS) found" in out
    assert (
        "Aquarium: few-shot files found: fewshot_train_shot10_seed3.json; drawn by validate: "
        "fewshot_train_shot10_seed30.json, fewshot_train_shot10_seed300.json"
    ) in out

    empty = tmp_path / "empty"
    empty.mkdir()
    before = file.read_bytes()
    with pytest.raises(DataError, match="no dataset folder with train/_annotations.coco.json and test/"):
        fill("odinw13", empty, file, "test")
    assert file.read_bytes() == before  # unchanged
    assert main(["suite-params", "odinw13", "--root", "data/raw/odinw13", "--domains", "d.json"]) == 2


def option(command: str, name: str) -> str | None:
    """The value after `name` in a stage command (None when the command does not have the option)."""
    words = shlex.split(command)
    return words[words.index(name) + 1] if name in words else None


@pytest.mark.parametrize("suite", SUITES)
def test_cache_features_builds_the_folder_train_reads_on_the_same_annotation_file(suite):
    stages = yaml.safe_load((REPO / "suites" / suite / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    names = list(stages)
    assert names.index("negatives") < names.index("cache_features") < names.index("train")
    cache, train = stages["cache_features"], stages["train"]
    assert cache["matrix"] == train["matrix"] and cache["wdir"] == train["wdir"]
    ((folder, settings),) = [next(iter(out.items())) for out in cache["outs"]]
    assert settings == {"persist": True}  # a re-run for a train-only flag finds its key and rebuilds nothing
    assert folder in train["deps"]
    assert option(train["cmd"], "--feature-cache") == option(cache["cmd"], "--out") == folder
    for same in ("--train-annotations", "--negatives"):  # ODinW13: the seed's few-shot file; RF100-VL: the split's
        assert option(cache["cmd"], same) == option(train["cmd"], same)
    assert option(cache["cmd"], "--params") == "params.yaml"  # the root's, as train's default (wdir: the root)
    assert f"${{{suite}.train_flags}}" in cache["cmd"] and "cache" in cache["params"]
    assert "no cache_features stage" not in (REPO / "suites" / suite / "dvc.yaml").read_text(encoding="utf-8")


def enable_cache(repo: Path) -> None:
    """cache.enabled true in the repository's params.yaml, with the frozen vision encoder a cache needs."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["cache"]["enabled"], params["train"]["freeze"] = True, "vision"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def cache_manifest(repo: Path, folder: str) -> dict:
    return json.loads((repo / folder / "manifest.json").read_text(encoding="utf-8"))


def test_without_data_dvc_sees_no_suite_stage(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    if not (repo / ".dvc" / "config").is_file():
        dvc(repo, "init", "-q")
    stages = dvc(repo, "stage", "list", "--all", "--name-only").split()
    assert not [stage for stage in stages if stage.startswith("suites/")], stages
    assert json.loads(dvc(repo, "status", "--json", *(f"suites/{s}/dvc.yaml" for s in SUITES))) == {}


# ------------------------------------------------------------------------------------------- dvc repro, for real


def dataset_log(output: str, annotation_file: str) -> int:
    """The number of images `sam3.data.dataset` logged for `annotation_file` when a stage built a dataset from it."""
    (images,) = re.findall(rf"{re.escape(annotation_file)}: images (\d+),", output)
    return int(images)


def prepared_repo(tmp_path: Path, suite: str, names: list[str]) -> Path:
    """A throw-away repository with 3 shapes datasets under data/raw/<suite>, committed."""
    repo = copy_repo(tmp_path / "repo")
    if not (repo / ".dvc" / "config").is_file():
        dvc(repo, "init", "-q")
    shapes_datasets(repo / "data/raw" / suite, names)
    return repo


@pytest.mark.slow
def test_odinw13_suite_trains_each_seed_on_its_fewshot_file_and_aggregates_over_seeds(tmp_path, monkeypatch):
    names, seeds, k = ["Aquarium", "Raccoon", "pothole"], [3, 30], 1
    repo = prepared_repo(tmp_path, "odinw13", names)
    # Raccoon ships seed 3's file: its first training image alone. The other files are drawn by validate.
    raw_train = repo / "data/raw/odinw13/Raccoon/train"
    train = load_coco(raw_train / ANNOTATIONS_FILE)
    first = train["images"][0]["id"]
    shipped = {
        **train,
        "images": train["images"][:1],
        "annotations": [a for a in train["annotations"] if a["image_id"] == first],
    }
    save_coco(raw_train / "fewshot_train_shot1_seed3.json", shipped)
    monkeypatch.chdir(repo)
    assert main(["suite-params", "odinw13", "--root", "data/raw/odinw13"]) == 0
    file = suite_params.params_path("odinw13", repo)
    params = load("odinw13", file)
    assert params.datasets == names
    params.validate_flags = {"fewshot-k": k, "fewshot-seeds": seeds}
    params.train_flags = {"set": ["train.max_steps=2", "loss.pos_weight=5.0"]}
    save("odinw13", params, file)
    git_commit(repo, "code, data and the odinw13 suite's datasets")

    first_repro = dvc(repo, "repro", "suites/odinw13/dvc.yaml")
    ran = stages_run(first_repro)
    stage = "suites/odinw13/dvc.yaml:{}@{}".format
    expected = [stage(s, n) for s in ("check", "validate", "preprocess", "negatives") for n in names]
    per_seed = ("cache_features", "train", "evaluate")
    expected += [stage(s, f"{n}-{seed}") for s in per_seed for n in names for seed in seeds]
    expected += [stage("aggregate", "odinw13")]
    assert sorted(ran) == sorted(expected), first_repro  # each matrix stage once, and the aggregate
    assert ran[-1] == "suites/odinw13/dvc.yaml:aggregate@odinw13"

    metrics = {}
    for name in names:
        report = json.loads((repo / f"reports/odinw13/{name}/validate.json").read_text())
        for seed in seeds:
            label = f"train/fewshot_train_shot{k}_seed{seed}.json"
            source = "dataset" if (name, seed) == ("Raccoon", 3) else "generated"
            assert report["fewshot"][label]["source"] == source
            # train read the seed's few-shot file: the dataset it built holds exactly that file's images
            fewshot = f"data/suites/odinw13/{name}/preprocessed/{label}"
            images = load_coco(repo / fewshot)["images"]
            assert dataset_log(first_repro, fewshot) == len(images)
            run = yaml.safe_load((repo / f"runs/odinw13/{name}/seed{seed}/params.yaml").read_text())
            assert (run["train"]["seed"], run["train"]["max_steps"], run["loss"]["pos_weight"]) == (seed, 2, 5.0)
            metrics[name, seed] = json.loads((repo / f"reports/odinw13/{name}/seed{seed}/metrics.json").read_text())
    shipped_clean = "data/suites/odinw13/Raccoon/preprocessed/train/fewshot_train_shot1_seed3.json"
    assert dataset_log(first_repro, shipped_clean) == 1 < len(train["images"])  # the shipped file, used as it is

    # the aggregate: a row per dataset with its value per seed; per-seed means over the 3 datasets, then the mean and
    # the sample std over the 2 seeds: m = (m_3 + m_30) / 2, sd = |m_3 - m_30| / sqrt(2)
    table = json.loads((repo / "reports/odinw13.json").read_text())
    assert table["datasets"] == {n: {str(s): metrics[n, s]["bbox_AP"] for s in seeds} for n in names}
    seed_means = [statistics.fmean(metrics[n, s]["bbox_AP"] for n in names) for s in seeds]
    assert [table["seeds"][str(s)]["mean"] for s in seeds] == pytest.approx(seed_means)
    assert table["mean"] == pytest.approx(sum(seed_means) / 2)
    assert table["std"] == pytest.approx(abs(seed_means[0] - seed_means[1]) / math.sqrt(2))
    markdown = (repo / "reports/odinw13.md").read_text()
    for name in names:
        assert f"| {name} | " in markdown

    second = dvc(repo, "repro", "suites/odinw13/dvc.yaml")
    assert stages_run(second) == [] and UP_TO_DATE in second, second
    assert json.loads(dvc(repo, "status", "--json", "suites/odinw13/dvc.yaml")) == {}

    # the cache was off: each dataset x seed folder holds only the "off" manifest
    assert cache_manifest(repo, "data/suites/odinw13/Aquarium/features/seed30") == {"format": 1, "enabled": False}
    # on: Raccoon seed 3 caches its shipped 1-image file and trains from it
    enable_cache(repo)
    cached = dvc(repo, "repro", stage("train", "Raccoon-3"))
    # check reads every param: it re-runs, writes the same file, and only the cache and train follow
    assert stages_run(cached) == [
        stage("check", "Raccoon"), stage("cache_features", "Raccoon-3"), stage("train", "Raccoon-3")
    ], cached  # fmt: skip
    manifest = cache_manifest(repo, "data/suites/odinw13/Raccoon/features/seed3")
    assert manifest["enabled"] and [e["image_id"] for e in manifest["splits"]["train"]] == [first]
    assert manifest["key"]["data"]["train"] == hashlib.sha256((repo / shipped_clean).read_bytes()).hexdigest()
    assert "training from the feature cache data/suites/odinw13/Raccoon/features/seed3" in cached


@pytest.mark.slow
def test_rf100vl_suite_runs_every_dataset_and_aggregates_per_domain(tmp_path, monkeypatch):
    names = ["aerial-cows", "bone-fracture", "cable-damage"]
    repo = prepared_repo(tmp_path, "rf100vl", names)
    domains = {"aerial-cows": "Aerial", "bone-fracture": "Lab Imaging", "cable-damage": "Aerial"}
    (repo / "domains.json").write_text(json.dumps(domains), encoding="utf-8")
    monkeypatch.chdir(repo)
    assert main(["suite-params", "rf100vl", "--root", "data/raw/rf100vl", "--domains", "domains.json"]) == 0
    file = suite_params.params_path("rf100vl", repo)
    params = load("rf100vl", file)
    assert (params.datasets, params.aggregate_flags) == (names, {"domains": "domains.json"})
    params.train_flags = {"set": ["train.max_steps=2", "train.subset_images=2"]}  # the "100 images" setting, at 2
    save("rf100vl", params, file)
    git_commit(repo, "code, data and the rf100vl suite's datasets")

    first = dvc(repo, "repro", "suites/rf100vl/dvc.yaml")
    stages = ("check", "validate", "preprocess", "negatives", "cache_features", "train", "evaluate")
    expected = [f"suites/rf100vl/dvc.yaml:{stage}@{name}" for stage in stages for name in names]
    assert sorted(stages_run(first)) == sorted([*expected, "suites/rf100vl/dvc.yaml:aggregate@rf100vl"]), first
    assert first.count("2 training images (2 per process)") == 3  # train_flags reached every train stage

    values = {n: json.loads((repo / f"reports/rf100vl/{n}/metrics.json").read_text())["bbox_AP"] for n in names}
    table = json.loads((repo / "reports/rf100vl.json").read_text())
    assert table["datasets"] == {n: {"value": values[n], "domain": domains[n]} for n in names}
    aerial = table["domains"]["Aerial"]
    assert (aerial["count"], aerial["mean"]) == (2, pytest.approx((values["aerial-cows"] + values["cable-damage"]) / 2))
    assert table["domains"]["Lab Imaging"] == {"mean": values["bone-fracture"], "count": 1, "expected": 1}
    assert table["mean"] == pytest.approx(sum(values.values()) / 3)
    assert "| **mean Aerial** (2 of 2) |" in (repo / "reports/rf100vl.md").read_text()

    second = dvc(repo, "repro", "suites/rf100vl/dvc.yaml")
    assert stages_run(second) == [] and UP_TO_DATE in second, second
    assert json.loads(dvc(repo, "status", "--json", "suites/rf100vl/dvc.yaml")) == {}

    # the cache on: every training image is cached, and train draws its seeded 2-image subset from them
    features = "data/suites/rf100vl/bone-fracture/features"
    assert cache_manifest(repo, features) == {"format": 1, "enabled": False}
    enable_cache(repo)
    target = "suites/rf100vl/dvc.yaml:{}@bone-fracture".format
    cached = dvc(repo, "repro", target("train"))
    assert stages_run(cached) == [target("check"), target("cache_features"), target("train")], cached
    assert len(cache_manifest(repo, features)["splits"]["train"]) == 4  # the dataset's 4 training images
    assert f"training from the feature cache {features}" in cached
    assert "2 training images (2 per process)" in cached
