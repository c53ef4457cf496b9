"""The DVC path: `dvc repro <stage>` per stage, in dvc.yaml's order; DVC decides what re-runs and records it in
dvc.lock, so a Prefect run leaves the DVC state as `dvc repro` would (`dvc status` checked and reported)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger

from pipeline.flows import tasks
from pipeline.flows.commands import OUTPUT_TAIL_LINES, StageFailed, stage_environment
from pipeline.flows.report import MetricRow, read_metric_value
from pipeline.stage_args import DEFAULT_PARAMS_FILE as PARAMS_FILE  # what dvc.yaml reads
from pipeline.stages import MODEL_FOLDER, VosLayout, vos_root_layout, vos_suite_layout


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def dvc_output(repo: Path, *args: str) -> str:
    """stdout of a read-only dvc command in `repo`; StageFailed when it fails."""
    command = dvc_command(*args)
    result = subprocess.run(command, cwd=repo, env=stage_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(command, result.returncode, (result.stdout + result.stderr).splitlines()[-OUTPUT_TAIL_LINES:])
    return result.stdout


def dvc_stage_names(repo: Path) -> list[str]:
    return dvc_output(repo, "stage", "list", "--name-only").split()


def dvc_metrics(repo: Path) -> dict[str, dict[str, Any]]:
    """{metrics file: its values} of the workspace, as `dvc metrics show --json` reads them."""
    shown = json.loads(dvc_output(repo, "metrics", "show", "--json") or "{}")
    files = shown.get("", {}).get("data", {})
    return {path: entry.get("data", {}) for path, entry in sorted(files.items()) if isinstance(entry, dict)}


def dvc_locked_model(repo: Path) -> tuple[str, str | None] | None:
    """(path, md5) of the train stage's model folder as dvc.lock records it, or None when it records none."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return None
    outs = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get("train", {}).get("outs", [])
    for out in outs:
        if Path(out["path"]).name == MODEL_FOLDER:
            return out["path"], out.get("md5")
    return None


def status_note(repo: Path, ran: list[str]) -> str:
    """The summary's line on `dvc status` of the stages `ran` (a warning in the log too when it is not clean)."""
    status = json.loads(dvc_output(repo, "status", "--json", *ran) or "{}") if ran else {}
    if status:
        get_run_logger().warning("dvc status is not clean after the run: %s", status)
        return f"dvc status NOT clean: {json.dumps(status, sort_keys=True)}"
    return f"dvc status clean for {', '.join(ran) or 'no stage'}"


@dataclass
class PathResult:
    """What a path (DVC or suite) hands to the report: the rows, notes for the summary, failures."""

    rows: list[MetricRow]
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    model_md5: str | None = None


def run_dvc_path(repo: Path, metric: str) -> PathResult:
    """`dvc repro <stage>` for each of DVC_STAGES in dvc.yaml, in order; then the metric from `dvc metrics show`."""
    from pipeline.params import load_params

    logger = get_run_logger()
    present = set(dvc_stage_names(repo))
    notes, ran = [], []
    for stage, stage_task in zip(tasks.DVC_STAGES, tasks.DVC_STAGE_TASKS, strict=True):
        if stage not in present:
            logger.info("stage %r is not in dvc.yaml yet: skipped", stage)
            notes.append(f"stage {stage} skipped: not in dvc.yaml")
            continue
        stage_task(dvc_command("repro", stage), str(repo), label="via dvc")
        ran.append(stage)
    notes.append(status_note(repo, ran))

    params = load_params(repo / PARAMS_FILE)
    locked = dvc_locked_model(repo)
    model, md5 = locked if locked else (None, None)
    rows = [
        MetricRow(params.dataset.name, params.train.seed, read_metric_value(repo / path, metric), path, model)
        for path, values in dvc_metrics(repo).items()
        if metric in values
    ]
    if not rows:
        notes.append(f"no DVC metrics file holds {metric} (is the evaluate stage in dvc.yaml?)")
    return PathResult(rows, notes, model_md5=md5)


VOS_METRIC = "J&F"  # the VOS deployments' headline metric (vos-evaluate's summary)


def run_vos_dvc_path(repo: Path, dvc_file: str, metric: str = VOS_METRIC) -> PathResult:
    """`dvc repro <dvc_file>:<stage>` for the VOS stages (vos_check -> vos_evaluate) of `dvc_file` (dvc.yaml:
    params.yaml's vos.dataset; suites/mose/dvc.yaml: every dataset of the MOSE suite's matrix), then `metric` from
    each run's vos_summary.json."""
    target = "" if dvc_file == "dvc.yaml" else f"{dvc_file}:"
    document = yaml.safe_load((repo / dvc_file).read_text(encoding="utf-8")) or {}
    present = set(document.get("stages", {}))
    notes, ran = [], []
    for stage, stage_task in zip(tasks.VOS_STAGES, tasks.VOS_STAGE_TASKS, strict=True):
        if stage not in present:
            notes.append(f"stage {stage} skipped: not in {dvc_file}")
            continue
        stage_task(dvc_command("repro", f"{target}{stage}"), str(repo), label=f"{dvc_file} via dvc")
        ran.append(f"{target}{stage}")
    notes.append(status_note(repo, ran))
    rows = [
        MetricRow(name, 0, read_metric_value(repo / layout.summary, metric), layout.summary, layout.model)
        for name, layout in _vos_runs(repo, dvc_file)
    ]
    if not rows:
        notes.append(f"{dvc_file} declares no VOS run (an empty dataset list?)")
    return PathResult(rows, notes)


def _vos_runs(repo: Path, dvc_file: str) -> list[tuple[str, VosLayout]]:
    """(dataset name, its layout) of each VOS run `dvc_file` declares: the root pipeline's one (params.yaml's
    vos.dataset.name), or one per dataset of a suite's matrix (suites/<suite>/params.yaml's <suite>.datasets), with
    the paths pipeline.stages gives its stages. A declared run without a summary gets a row without a value; an
    earlier run's summary of a dataset no longer listed is not read."""
    if dvc_file == "dvc.yaml":
        from pipeline.params import load_params

        name = load_params(repo / PARAMS_FILE).vos.dataset.name
        return [(name, vos_root_layout(name))]
    suite_dir = Path(dvc_file).parent
    suite = suite_dir.name
    suite_params = yaml.safe_load((repo / suite_dir / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    datasets = (suite_params.get(suite) or {}).get("datasets") or []
    return [(name, vos_suite_layout(suite, name, raw="")) for name in datasets]  # raw: not read here
