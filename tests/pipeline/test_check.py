"""`python -m pipeline check`: every problem of the params, the model source and the dataset, before any stage runs.

Also `train --dry-run`, which now checks the model source the same way (it used to say OK for a folder that is not
there), and the dvc.yaml wiring: every dataset stage depends on check's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.dvc_yaml import documents
from sam3.model import load_model
from tests.pipeline.broken_datasets import clean_split, write_split

pytestmark = pytest.mark.usefixtures("outside_repo")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for split, first in (("train", 1), ("test", 10)):
        write_split(root, split, clean_split(root, split, n_images=1, first_id=first))
    return root


def test_all_good_writes_the_same_file_every_time(dataset, tmp_path, capsys):
    out = tmp_path / "check.json"
    argv = ["check", "--dataset", str(dataset), "--out", str(out), "--set", "evaluate.baseline=tiny"]
    assert main(argv) == 0
    first = out.read_bytes()
    assert json.loads(first) == {
        "ok": True,
        "checked": [
            "params: params",
            "model.source: tiny",
            "evaluate.baseline: tiny",
            "dataset: train split",
            "dataset: test split",
        ],
    }
    assert main([*argv, "--set", "train.max_steps=7"]) == 0  # a param that changes nothing checked
    assert out.read_bytes() == first  # so the stages after it do not re-run


def test_every_problem_is_reported_and_nothing_written(dataset, tmp_path, capsys):
    tiny = tmp_path / "exported"
    load_model("tiny").save_pretrained(tiny)
    (tiny / "model.safetensors").unlink()  # an incomplete folder
    out = tmp_path / "check.json"
    argv = ["check", "--dataset", str(dataset), "--out", str(out)]
    assert main([*argv, "--set", f"model.source={tmp_path / 'nowhere'}", f"evaluate.baseline={tiny}"]) == 2
    err = capsys.readouterr().err
    assert f"model.source: model folder {tmp_path / 'nowhere'} does not exist" in err
    assert f"evaluate.baseline: {tiny / 'model.safetensors'} is missing" in err
    assert "check: 2 problem(s); no stage ran, nothing was replaced" in err
    assert "Traceback" not in err and not out.exists()

    assert main([*argv, "--set", "evaluate.split=valid"]) == 2  # the dataset has no valid split
    assert f"{dataset / 'valid' / '_annotations.coco.json'} not found" in capsys.readouterr().err


def test_the_retention_dataset_needs_the_evaluated_split(dataset, tmp_path, capsys):
    argv = ["check", "--dataset", str(dataset), "--out", str(tmp_path / "check.json")]
    assert main([*argv, "--set", f"evaluate.retention_dataset={dataset}"]) == 0
    assert (
        f"evaluate.retention_dataset: {dataset} (test split)"
        in json.loads((tmp_path / "check.json").read_text())["checked"]
    )
    missing = tmp_path / "held_out"
    assert main([*argv, "--set", f"evaluate.retention_dataset={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"evaluate.retention_dataset = {missing}: {missing / 'test' / '_annotations.coco.json'} not found" in err
    assert "Traceback" not in err


def test_a_params_mistake_is_named_before_anything_else(dataset, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"freeze": "vison", "treads": 2}}))
    assert main(["check", "--dataset", str(dataset), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.treads; did you mean train.threads?" in err


def test_train_dry_run_checks_the_model_source(dataset, tmp_path, capsys):
    argv = ["train", "--run-dir", str(tmp_path / "run"), "--dataset", str(dataset), "--dry-run"]
    assert main([*argv, "--set", f"model.source={tmp_path / 'nowhere'}"]) == 2
    assert f"model.source: model folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert main([*argv, "--set", "model.source=tiny"]) == 0
    assert "# params OK" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_every_dataset_stage_waits_for_check():
    # the image stages wait for check, the video (vos_*) stages for vos_check
    for path, text in documents().items():
        stages = yaml.safe_load(text)["stages"]
        for prefix in ("", "vos_"):
            family = {name: stage for name, stage in stages.items() if name.startswith("vos_") == (prefix == "vos_")}
            checked = [s for s in family if s.startswith(f"{prefix}check")]
            assert len(checked) == (1 if family.keys() - {"demo_data", "aggregate", "vos_data"} else 0), path
            if not checked:
                continue
            out = next(iter(family[checked[0]]["outs"][0]))
            for name, stage in family.items():
                if name in ("demo_data", "aggregate", "vos_data") or name == checked[0]:
                    continue
                assert out in stage["deps"], f"{path}: stage {name} does not depend on {out}"


def test_vos_check_names_a_missing_tracker_and_split_and_writes_nothing(tmp_path, capsys):
    from pipeline.vos_shapes import build_vos_shapes

    out = tmp_path / "vos_check.json"
    argv = ["check", "--vos", "--dataset", str(tmp_path / "none"), "--out", str(out)]
    assert main([*argv, "--set", f"vos.model.source={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"vos.model.source: model folder {tmp_path / 'nowhere'} does not exist" in err
    assert f"{tmp_path / 'none' / 'train' / 'JPEGImages'} not found" in err
    assert "3 problem(s)" in err and not out.exists()  # the tracker, the train and the valid split
    build_vos_shapes(tmp_path / "vos", train_videos=1, valid_videos=1, frames=3, size=32, seed=0)
    argv[3] = str(tmp_path / "vos")
    assert main([*argv, "--set", "vos.model.source=tiny-sam3"]) == 0
    checked = json.loads(out.read_text())["checked"]
    assert checked[1:] == ["vos.model.source: tiny-sam3", "vos dataset: train split", "vos dataset: valid split"]
