"""The `finetune` flow and its six deployments.

Two paths through the same stages (docs/ARCHITECTURE.md), chosen by the flow's parameters:
- DVC path (no `datasets`, no `dataset_root`; deployments `demo` and `retrain`): `dvc repro <stage>` per stage
  (`pipeline.flows.dvc_path`); parameters come from params.yaml alone.
- Suite path (`datasets` or `dataset_root`; deployments `rf100` and `odinw13`): the stage commands per dataset and
  seed with `--params`/`--set` (`pipeline.flows.suite_path`), writing where the DVC suites write.
- VOS DVC path (`vos_dvc_file`; deployments `vos` and `mose`): `dvc repro <file>:<stage>` for the video stages
  (vos_validate -> vos_preprocess -> vos_train -> vos_evaluate) of dvc.yaml or suites/mose/dvc.yaml.
Then a metrics table and a Markdown summary as artifacts (`pipeline.flows.report`), and with `promote=True`
(deployment `retrain`) champion promotion (`pipeline.flows.registry`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.schedules import Cron
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.aggregate import DEFAULT_METRIC
from pipeline.flows import dvc_path, suite_path
from pipeline.flows.dvc_path import PARAMS_FILE, VOS_METRIC
from pipeline.flows.registry import promote_champion
from pipeline.flows.report import FLOW_NAME, report
from pipeline.flows.tasks import ensure_train_limit
from pipeline.suite_params import ODINW13_RECIPE, RF100VL_RECIPE, default_params
from pipeline.suites import ODINW13_SEEDS
from sam3.errors import ConfigError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

STAGE_WORKERS = 4  # stage commands running at once in a suite (each may start its own data workers)


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=STAGE_WORKERS))
def finetune(
    suite: str = "demo",
    datasets: list[str] | None = None,
    dataset_root: str | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    params_file: str = PARAMS_FILE,
    metric: str = DEFAULT_METRIC,
    promote: bool = False,
    repo: str | None = None,
    vos_dvc_file: str | None = None,
) -> dict[str, Any]:
    """Fine-tune and evaluate, through DVC (no datasets given) or over a suite of dataset folders.

    suite: names the run (runs/<suite>/, artifact keys); "rf100vl" and "odinw13" add their benchmark summaries.
    datasets / dataset_root: suite path, dataset folders (Roboflow COCO layout) or a folder of them.
    seeds: suite path, one training per dataset and seed (train.seed); default params' train.seed.
    overrides: suite path, `section.key=value` over params_file (e.g. "train.max_steps=100").
    metric: key of metrics.json for the table and the promotion rule (higher is better).
    promote: judge the run against models/registry.json's champion (needs exactly one run).
    repo: the repository (default: the current directory); relative paths are relative to it.
    vos_dvc_file: video object segmentation instead: the VOS stages of this dvc.yaml through DVC ("dvc.yaml":
        params.yaml's vos.dataset; "suites/mose/dvc.yaml": the MOSE suite), judged on `metric` (J&F).
    Returns {"rows": [...], "notes": [...], "promotion": reason or None}.
    """
    root = Path(repo).resolve() if repo else Path.cwd()
    logger = get_run_logger()
    ensure_train_limit()
    if vos_dvc_file is not None:
        if datasets is not None or dataset_root is not None or seeds or overrides or params_file != PARAMS_FILE:
            raise ConfigError(
                f"vos_dvc_file runs the VOS stages of {vos_dvc_file} through DVC, which read params.yaml (and the "
                "suite's params file): set the dataset, seed and other values there, not as flow parameters"
            )
        if not (root / vos_dvc_file).is_file():
            raise ConfigError(f"{root / vos_dvc_file}: no such dvc.yaml; run from the repository root or pass repo")
        logger.info("VOS DVC path in %s over %s", root, vos_dvc_file)
        result = dvc_path.run_vos_dvc_path(root, vos_dvc_file, metric)
    elif datasets is None and dataset_root is None:
        if seeds or overrides or params_file != PARAMS_FILE:
            raise ConfigError(
                f"seeds, overrides and params_file apply to suites (datasets or dataset_root); the DVC path reads "
                f"{PARAMS_FILE}: set train.seed and other values there"
            )
        if not (root / "dvc.yaml").is_file():
            raise ConfigError(f"{root}: no dvc.yaml; run from the repository root or pass repo=<its path>")
        logger.info("DVC path in %s", root)
        result = dvc_path.run_dvc_path(root, metric)
    else:
        folders, skipped = suite_path.find_datasets(root, datasets, dataset_root)
        if skipped:
            logger.warning("%d folders of %s hold no dataset split, left out: %s", len(skipped), dataset_root, skipped)
        if not seeds:
            from pipeline.params import load_params

            seeds = [load_params(root / params_file, overrides).train.seed]
        if promote and len(folders) * len(seeds) != 1:
            raise ConfigError(
                f"promote needs one run (one dataset, one seed); got {len(folders)} datasets x {len(seeds)} seeds"
            )
        logger.info("suite %s: %d datasets x seeds %s in %s", suite, len(folders), seeds, root)
        result = suite_path.run_suite_path(
            root, suite, folders, list(seeds), params_file, list(overrides or []), metric
        )
    report(suite, metric, result.rows, result.notes)
    decision = (
        promote_champion(str(root), suite, metric, result.rows, result.model_md5)
        if promote and not result.failed
        else None
    )
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} stage runs did not complete: {', '.join(result.failed)}")
    return {
        "rows": [asdict(row) for row in result.rows],
        "notes": result.notes,
        "promotion": decision.reason if decision else None,
    }


RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
RETRAIN_TIMEZONE = "Europe/Paris"
# Recipe settings per suite (docs/RECIPE.md sections 4-5), the same as the DVC suites' train_flags.
RF100_OVERRIDES = list(RF100VL_RECIPE)
ODINW13_OVERRIDES = list(ODINW13_RECIPE)


def deployments() -> list[RunnerDeployment]:
    """finetune/demo, finetune/rf100, finetune/odinw13, finetune/vos, finetune/mose and finetune/retrain (cron
    RETRAIN_CRON, RETRAIN_TIMEZONE)."""
    from prefect.deployments.runner import EntrypointType

    # MODULE_PATH: a flow run finds the flow by import, whatever its working directory. paused=False: serving
    # resumes the schedule that stopping the server paused (prefect.serve pauses on shutdown).
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, paused=False)
    rf100_root, odinw_root = default_params("rf100vl").root, default_params("odinw13").root
    return [
        finetune.to_deployment(
            "demo", description="DVC path on params.yaml's dataset (the demo)", parameters={}, **common
        ),
        finetune.to_deployment(
            "rf100",
            description=f"RF100-VL: every dataset under {rf100_root}, recipe settings",
            parameters={
                "suite": "rf100vl",
                "dataset_root": rf100_root,
                "overrides": RF100_OVERRIDES,
            },
            **common,
        ),
        finetune.to_deployment(
            "odinw13",
            description=f"ODinW13 10-shot: datasets under {odinw_root}, seeds 3, 30, 300",
            parameters={
                "suite": "odinw13",
                "dataset_root": odinw_root,
                "seeds": list(ODINW13_SEEDS),
                "overrides": ODINW13_OVERRIDES,
            },
            **common,
        ),
        finetune.to_deployment(
            "vos",
            description="video object segmentation: the VOS stages of dvc.yaml over params.yaml's vos.dataset",
            parameters={"suite": "vos", "vos_dvc_file": "dvc.yaml", "metric": VOS_METRIC},
            **common,
        ),
        finetune.to_deployment(
            "mose",
            description="MOSE: the VOS stages of suites/mose/dvc.yaml (SAM 2.1's MOSE recipe) over mose.root",
            parameters={"suite": "mose", "vos_dvc_file": "suites/mose/dvc.yaml", "metric": VOS_METRIC},
            **common,
        ),
        finetune.to_deployment(
            "retrain",
            description="scheduled DVC-path retraining; promotes the model only when it beats the champion",
            parameters={"suite": "retrain", "promote": True},
            schedule=Cron(RETRAIN_CRON, timezone=RETRAIN_TIMEZONE),
            **common,
        ),
    ]
