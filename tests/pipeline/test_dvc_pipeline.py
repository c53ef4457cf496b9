"""`dvc repro` for real on the project's dvc.yaml, in a throw-away git + DVC copy of the repository with tiny params
(tests/pipeline/prefect_repo.py): every stage runs once (the feature cache off by default: its stage leaves only a
manifest), a second repro does nothing, a train param change re-runs only train and evaluate, and `dvc metrics show`
prints the evaluate stage's bbox_AP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.prefect_repo import copy_repo

VENV_BIN = Path(sys.executable).parent
# Stage commands call `python -m pipeline`: the venv's python must come first on PATH (as the Makefile does).
ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
COMMAND_TIMEOUT_S = 600
RUNNING = re.compile(r"^Running stage '([^']+)':", re.MULTILINE)
UP_TO_DATE = "Data and pipelines are up to date."
# The stages a train param feeds: train itself and evaluate, which reads train's model out.
TRAIN_AND_AFTER = ["train", "evaluate"]
METRICS_FILE = "reports/demo/metrics.json"  # every detail of the evaluation
SUMMARY_FILE = "reports/summary.json"  # the run's headline metrics: what DVC shows and diffs
VOS_SUMMARY = "reports/vos_summary.json"  # the video run's
VOS_REPORT = "reports/vos_shapes/vos/report.md"


def run(repo: Path, *command: str) -> str:
    """Run `command` in `repo` with the venv on PATH; its stdout and stderr together, asserting exit status 0."""
    done = subprocess.run(
        command,
        cwd=repo,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, f"`{' '.join(command)}` exited with {done.returncode}:\n{done.stdout}"
    return done.stdout


def dvc(repo: Path, *args: str) -> str:
    return run(repo, str(VENV_BIN / "dvc"), *args)


def git_commit(repo: Path, message: str) -> None:
    # A throw-away identity: the test machine may have no git user configured.
    identity = ["-c", "user.name=dvc-test", "-c", "user.email=dvc-test@example.invalid"]
    run(repo, "git", "add", "-A")
    run(repo, "git", *identity, "commit", "-q", "--no-verify", "-m", message)


def stages_run(output: str) -> list[str]:
    """The stage names of `Running stage '<name>':` lines, in the order DVC ran them."""
    return RUNNING.findall(output)


def locked_stages(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def out_hash(lock: dict, stage: str, path: str) -> str:
    """The md5 dvc.lock records for `path` among `stage`'s outs."""
    return next(out["md5"] for out in lock[stage]["outs"] if out["path"] == path)


def metrics_table(output: str, path: str) -> dict[str, str]:
    """The row of metrics file `path` in `dvc metrics show` as {column: value} ("-" where the file has no such
    column). Columns are 2+ spaces apart; single spaces occur inside names such as `bbox_AP_per_category.x y`."""
    header, *rows = [re.split(r"\s{2,}", line.strip()) for line in output.strip().splitlines()]
    row = next(row for row in rows if row[0] == path)
    assert len(header) == len(row), f"header and row do not line up:\n{output}"
    return dict(zip(header, row, strict=True))


@pytest.mark.slow
def test_dvc_repro_runs_each_stage_once_and_reruns_only_what_a_param_change_affects(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")  # tiny params: model at 112 px, train.max_steps 2, dataset.raw data/raw/demo
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    assert (params["train"]["max_steps"], params["model"]["image_size"], params["dataset"]["raw"]) == (
        2,
        112,
        "data/raw/demo",
    )
    if not (repo / ".dvc" / "config").is_file():
        dvc(repo, "init", "-q")
    git_commit(repo, "pipeline code and tiny params")
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    assert stages == [
        "demo_data", "check", "validate", "preprocess", "negatives", "cache_features", "train", "evaluate",
        "vos_data", "vos_check", "vos_validate", "vos_preprocess", "vos_train", "vos_evaluate",
    ]  # fmt: skip

    # (1) A fresh repository: every stage runs, once, in dependency order (a chain here), and leaves its outs.
    first = dvc(repo, "repro")
    assert stages_run(first) == stages, first
    assert set(locked_stages(repo)) == set(stages)
    for out in ("data/raw/demo", "data/clean/demo", "data/preprocessed/demo", "data/negatives/demo.json"):
        assert (repo / out).exists(), f"{out} missing after `dvc repro`:\n{first}"
    # the feature cache is off by default (cache.enabled false): its stage writes only a manifest saying so
    off = json.loads((repo / "data/features/demo/manifest.json").read_text(encoding="utf-8"))
    assert off == {"format": 1, "enabled": False}
    assert [p.name for p in (repo / "data/features/demo").iterdir()] == ["manifest.json"]
    for out in ("runs/demo/model", "runs/demo/train_stats.jsonl", METRICS_FILE, SUMMARY_FILE, "reports/demo/report.md"):
        assert (repo / out).exists(), f"{out} missing after `dvc repro`:\n{first}"
    steps = [json.loads(line)["step"] for line in (repo / "runs/demo/train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # train.max_steps 2
    for out in ("runs/vos_shapes/model", VOS_REPORT, VOS_SUMMARY, "reports/vos_shapes/vos/plots/per_video_jf.png"):
        assert (repo / out).exists(), f"{out} missing after `dvc repro`:\n{first}"
    git_commit(repo, "first repro")
    lock_before = locked_stages(repo)
    checked = (repo / "reports/demo/check.json").read_bytes()

    # (2) Nothing changed: nothing runs, every stage is skipped.
    second = dvc(repo, "repro")
    assert stages_run(second) == [], second
    assert UP_TO_DATE in second
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in second, second

    # (3) One train param changed: check (it reads every param) writes the same file, so the data stages are
    # skipped and keep their lock; train and evaluate run again.
    params["train"]["max_steps"] = 3
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    third = dvc(repo, "repro")
    assert stages_run(third) == ["check", *TRAIN_AND_AFTER], third
    assert (repo / "reports/demo/check.json").read_bytes() == checked
    lock_after = locked_stages(repo)
    data_stages = [stage for stage in stages if stage not in ["check", *TRAIN_AND_AFTER]]
    assert {s: lock_after[s] for s in data_stages} == {s: lock_before[s] for s in data_stages}
    assert lock_after["train"]["params"]["params.yaml"]["train"]["max_steps"] == 3
    steps = [json.loads(line)["step"] for line in (repo / "runs/demo/train_stats.jsonl").read_text().splitlines()]
    # a longer run goes on from its step-2 checkpoint (checkpoints persist) and its log (not a DVC output)
    assert steps == [1, 2, 3]
    assert "the run's length changed from 2 to 3 steps" in third
    assert not (repo / "runs/demo/checkpoints/superseded.pt").exists()
    assert out_hash(lock_after, "train", "runs/demo/model") != out_hash(lock_before, "train", "runs/demo/model")

    # (4) `dvc metrics show` prints the run's summary (rounded to DVC's default 5 digits): the evaluation's bbox_AP
    # and the training's steps; `dvc metrics diff` compares it with the last commit's run.
    bbox_ap = json.loads((repo / METRICS_FILE).read_text(encoding="utf-8"))["bbox_AP"]
    shown = dvc(repo, "metrics", "show")
    table = metrics_table(shown, SUMMARY_FILE)
    assert float(table["bbox_AP"]) == pytest.approx(bbox_ap, abs=5e-6)
    assert table["steps"] == "3"
    diff = dvc(repo, "metrics", "diff", "--json")
    assert json.loads(diff)[SUMMARY_FILE]["steps"] == {"old": 2, "new": 3, "diff": 1}

    # the video run's summary beside it: J&F of the fine-tuned tracker (and the starting one's)
    vos_jf = json.loads((repo / VOS_SUMMARY).read_text(encoding="utf-8"))["J&F"]
    assert float(metrics_table(shown, VOS_SUMMARY)["J&F"]) == pytest.approx(vos_jf, abs=5e-6)

    # (5) A vos.train change re-runs the video stages it feeds only; the run goes on from its checkpoint.
    params["vos"]["train"]["max_steps"] = 3
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    fifth = dvc(repo, "repro")
    assert stages_run(fifth) == ["vos_check", "vos_train", "vos_evaluate"], fifth
    steps = [json.loads(line)["step"] for line in (repo / "runs/vos_shapes/train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    # Left clean: every stage's deps, params and outs match dvc.lock.
    assert json.loads(dvc(repo, "status", "--json")) == {}
