"""`python -m pipeline aggregate` and `pipeline.suites`: suite summaries checked against means worked out by hand.

Runs are tiny generated suites: metrics.json files in the layouts the stage reads, with chosen AP values.
"""

import argparse
import json
import math

import pytest

from pipeline import aggregate, suites
from sam3.errors import ConfigError, DataError

# ODinW13: 3 datasets x 2 seeds (bbox_AP), the other 10 datasets and seed 300 not run.
ODINW_AP = {
    ("Aquarium", 3): 0.50,
    ("Aquarium", 30): 0.40,
    ("Raccoon", 3): 0.30,
    ("Raccoon", 30): 0.20,
    ("pothole", 3): 0.10,
    ("pothole", 30): 0.60,
}
# RF100-VL: a 5-dataset suite given by a domains file; 3 of them run, plus one run outside the suite.
DOMAINS = {"d1": "Aerial", "d2": "Aerial", "d3": "Document", "d4": "Sport", "d5": "Document"}
RF_AP = {"d1": 0.20, "d2": 0.40, "d3": 0.90, "extra": 0.99}


def write_metrics(path, **metrics):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bbox_AP50": 0.0, **metrics}))


@pytest.fixture
def odinw_results(tmp_path):
    root = tmp_path / "odinw"
    for (dataset, seed), ap in ODINW_AP.items():
        write_metrics(root / dataset / f"seed{seed}" / "metrics.json", bbox_AP=ap)
    return root


@pytest.fixture
def rf_results(tmp_path):
    root = tmp_path / "rf"
    for dataset, ap in RF_AP.items():
        write_metrics(root / dataset / "metrics.json", bbox_AP=ap)
    (tmp_path / "domains.json").write_text(json.dumps(DOMAINS))
    return root, tmp_path / "domains.json"


def run_stage(*argv):
    parser = argparse.ArgumentParser()
    aggregate.add_arguments(parser)
    return aggregate.run(parser.parse_args(list(argv)))


def test_odinw13_per_seed_means_then_mean_and_sample_std(odinw_results, tmp_path, capsys):
    out_json, out_md = tmp_path / "agg.json", tmp_path / "agg.md"
    code = run_stage(
        "--suite", "odinw13", "--results", str(odinw_results), "--out-json", str(out_json), "--out-md", str(out_md)
    )
    assert code == 0
    result = json.loads(out_json.read_text())
    # seed 3:  (0.50 + 0.30 + 0.10) / 3 = 0.30;  seed 30: (0.40 + 0.20 + 0.60) / 3 = 0.40
    assert result["seeds"]["3"] == {"mean": pytest.approx(0.30), "count": 3}
    assert result["seeds"]["30"] == {"mean": pytest.approx(0.40), "count": 3}
    # mean over seeds (0.30 + 0.40) / 2 = 0.35; sample std sqrt(((-0.05)^2 + 0.05^2) / (2 - 1)) = sqrt(0.005)
    assert result["mean"] == pytest.approx(0.35)
    assert result["std"] == pytest.approx(math.sqrt(0.005))  # 0.0707...
    assert result["num_seeds"] == 2
    assert result["datasets"]["pothole"] == {"3": pytest.approx(0.10), "30": pytest.approx(0.60)}
    assert result["missing_seeds"] == [300]
    assert result["missing"] == sorted(set(suites.ODINW13_DATASETS) - {"Aquarium", "Raccoon", "pothole"})
    assert len(result["missing"]) == 10
    assert result["missing_runs"] == [] and result["not_in_suite"] == [] and result["undefined"] == []

    markdown = out_md.read_text()
    assert "| dataset | seed 3 | seed 30 | mean over seeds |" in markdown
    assert "| pothole | 10.0 | 60.0 | 35.0 |" in markdown  # row mean (0.10 + 0.60) / 2
    assert "| **mean over datasets** (count) | 30.0 (3) | 40.0 (3) | |" in markdown
    assert "35.0 ± 7.1 |" in markdown  # 100 * sqrt(0.005) = 7.07
    assert "Missing seeds: 300" in markdown
    assert "Missing (10 of 13): AerialMaritimeDrone_large, CottontailRabbits" in markdown
    assert capsys.readouterr().out.startswith("# ODinW13: bbox_AP (x100)")


def test_rf100vl_mean_per_domain_and_missing(rf_results, tmp_path):
    root, domains = rf_results
    out_json, out_md = tmp_path / "agg.json", tmp_path / "agg.md"
    argv = ["--suite", "rf100vl", "--results", str(root), "--out-json", str(out_json), "--out-md", str(out_md)]
    assert run_stage(*argv, "--domains", str(domains)) == 0
    result = json.loads(out_json.read_text())
    # all: (0.20 + 0.40 + 0.90) / 3 = 0.50; "extra" is not in the suite and is left out
    assert result["mean"] == pytest.approx(0.50)
    assert (result["count"], result["expected"]) == (3, 5)
    assert result["domains"] == {
        "Aerial": {"mean": pytest.approx(0.30), "count": 2, "expected": 2},  # (0.20 + 0.40) / 2
        "Document": {"mean": pytest.approx(0.90), "count": 1, "expected": 2},  # d5 missing
        "Sport": {"mean": None, "count": 0, "expected": 1},  # d4 missing
    }
    assert result["missing"] == ["d4", "d5"]
    assert result["not_in_suite"] == ["extra"]
    assert result["datasets"]["d3"] == {"value": pytest.approx(0.90), "domain": "Document"}
    assert result["domains_source"] == str(domains)

    markdown = out_md.read_text()
    assert "| d1 | Aerial | 20.0 |" in markdown
    assert "| **mean Aerial** (2 of 2) | | 30.0 |" in markdown
    assert "| **mean Sport** (0 of 1) | | n/a |" in markdown
    assert "| **mean** (3 of 5) | | 50.0 |" in markdown
    assert "Missing (2 of 5): d4, d5" in markdown
    assert "Not in the suite, left out: extra" in markdown


def test_rf100vl_without_domain_list_counts_every_run_as_unknown(rf_results):
    root, _ = rf_results
    result = aggregate.aggregate_rf100vl({"a": 0.2, "b": 0.5}, domains=None)
    assert result["mean"] == pytest.approx(0.35)  # (0.2 + 0.5) / 2
    assert result["domains"] == {"unknown": {"mean": pytest.approx(0.35), "count": 2, "expected": 2}}
    assert result["missing"] == [] and result["not_in_suite"] == []


def test_glob_of_metrics_files_and_other_metric(odinw_results, tmp_path):
    # a glob over the files themselves, restricted to seed 3; the metric is another key of the same files
    for (dataset, seed), ap in ODINW_AP.items():
        write_metrics(odinw_results / dataset / f"seed{seed}" / "metrics.json", bbox_AP=ap, segm_AP=ap / 2)
    result = aggregate.aggregate("odinw13", str(odinw_results / "*" / "seed3" / "metrics.json"), metric="segm_AP")
    # one seed: mean (0.25 + 0.15 + 0.05) / 3 = 0.15, no spread
    assert result["mean"] == pytest.approx(0.15)
    assert result["std"] is None and result["num_seeds"] == 1
    assert result["missing_seeds"] == [30, 300]


def test_null_metric_missing_run_and_unknown_dataset_are_listed(odinw_results):
    write_metrics(odinw_results / "Raccoon" / "seed30" / "metrics.json", bbox_AP=None)  # undefined AP
    (odinw_results / "pothole" / "seed30" / "metrics.json").unlink()  # a run that did not happen
    write_metrics(odinw_results / "MyData" / "seed3" / "metrics.json", bbox_AP=1.0)  # not an ODinW13 dataset
    result = aggregate.aggregate("odinw13", odinw_results)
    # seed 3 unchanged 0.30; seed 30: only Aquarium 0.40 is left
    assert result["seeds"]["30"] == {"mean": pytest.approx(0.40), "count": 1}
    assert result["mean"] == pytest.approx(0.35)
    assert result["undefined"] == [{"dataset": "Raccoon", "seed": 30}]
    assert result["missing_runs"] == [{"dataset": "pothole", "seed": 30}]
    assert result["not_in_suite"] == ["MyData"]
    markdown = aggregate.odinw13_markdown(result)
    assert "| pothole | 10.0 | — | 10.0 |" in markdown
    assert "| Raccoon | 30.0 | n/a | 30.0 |" in markdown
    assert "Missing runs: pothole seed 30" in markdown


def test_user_errors_name_the_file(odinw_results, tmp_path):
    with pytest.raises(DataError, match=r"Aquarium/seed3/metrics.json: no metric 'box_AP'.*bbox_AP"):
        aggregate.aggregate("odinw13", odinw_results, metric="box_AP")
    with pytest.raises(DataError, match="no metrics files found; expected the layout"):
        aggregate.aggregate("odinw13", tmp_path / "nothing_here")
    write_metrics(odinw_results / "Aquarium" / "seedA" / "metrics.json", bbox_AP=0.1)
    with pytest.raises(DataError, match="'seedA' is not seed<number>"):
        aggregate.aggregate("odinw13", odinw_results)
    with pytest.raises(ConfigError, match="--domains"):
        aggregate.aggregate("odinw13", odinw_results, domains_file=tmp_path / "d.json")


def test_domains_from_an_installed_rf100vl_package(tmp_path, monkeypatch):
    # A real (small) package named like the real one, found on sys.path as an installed one would be.
    assets = tmp_path / "site" / "fake_rf100vl" / "assets"
    assets.mkdir(parents=True)
    (assets.parent / "__init__.py").write_text("raise ImportError('the package must not be imported')\n")
    (assets / "dataset_name_to_category.json").write_text(json.dumps({"x": "Aerial", "y": "Sport"}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    domains, source = suites.rf100vl_domains(package="fake_rf100vl")
    assert domains == {"x": "Aerial", "y": "Sport"}
    assert source.endswith("fake_rf100vl/assets/dataset_name_to_category.json")
    assert suites.rf100vl_domains(package="no_such_package_rf100vl") == (None, "unknown")


def test_real_rf100vl_list_when_installed():
    packaged = suites.packaged_rf100vl_domains()
    if packaged is None:
        pytest.skip("rf100vl is not installed (it is optional)")
    domains, _ = packaged
    counts = {d: list(domains.values()).count(d) for d in set(domains.values())}
    # docs/RECIPE.md section 5
    assert counts == {
        "Flora/Fauna": 23,
        "Industrial": 22,
        "Misc": 15,
        "Lab Imaging": 13,
        "Aerial": 11,
        "Document": 10,
        "Sport": 6,
    }


def test_odinw13_names():
    assert len(suites.ODINW13_DATASETS) == 13 == len(set(suites.ODINW13_DATASETS))
    assert suites.ODINW13_SEEDS == (3, 30, 300)
