"""The flow's tasks: one per stage, each running one command (`dvc repro <stage>` or `python -m pipeline <stage> ...`).

I/O-bound stages (validate, preprocess) retry, unless the stage said the user's input is wrong; the stages that run
the model on the accelerators (cache_features, train) carry the tag "train", under a global concurrency limit of one.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.flows.commands import retry_unless_user_error, run_command

TRAIN_TAG = "train"
TRAIN_CONCURRENCY = 1  # trainings at once: each one takes every accelerator of the machine
IO_RETRIES = 2
RETRY_DELAY_S = 10
# the order of the DVC path
DVC_STAGES = ("check", "validate", "preprocess", "negatives", "cache_features", "train", "evaluate", "aggregate")


def _run(command: list[str], cwd: str) -> None:
    run_command(command, Path(cwd), get_run_logger())


_IO_RETRY = dict(retries=IO_RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_unless_user_error)


@task(name="check", task_run_name="check {label}", cache_policy=NO_CACHE)
def check(command: list[str], cwd: str, label: str) -> None:
    """Check the params, the model source and the dataset before any stage replaces its outputs (reads only)."""
    _run(command, cwd)


@task(name="validate", task_run_name="validate {label}", cache_policy=NO_CACHE, **_IO_RETRY)
def validate(command: list[str], cwd: str, label: str) -> None:
    """Check a dataset, write its clean copy and report (reads every image: retried on I/O errors)."""
    _run(command, cwd)


@task(name="preprocess", task_run_name="preprocess {label}", cache_policy=NO_CACHE, **_IO_RETRY)
def preprocess(command: list[str], cwd: str, label: str) -> None:
    """Resize a clean dataset (reads and writes every image: retried on I/O errors)."""
    _run(command, cwd)


@task(name="negatives", task_run_name="negatives {label}", cache_policy=NO_CACHE)
def negatives(command: list[str], cwd: str, label: str) -> None:
    """Choose the negative phrases of each training image."""
    _run(command, cwd)


@task(name="cache_features", task_run_name="cache_features {label}", tags=[TRAIN_TAG], cache_policy=NO_CACHE)
def cache_features(command: list[str], cwd: str, label: str) -> None:
    """Run the frozen encoders once per image and prompt and store their outputs (cache.enabled; off: only an "off"
    manifest, about a second). Under the "train" tag's limit, as it runs the model on the accelerators; not retried,
    as train is not (its failures, out of memory among them, come back the same)."""
    _run(command, cwd)


@task(name="train", task_run_name="train {label}", tags=[TRAIN_TAG], cache_policy=NO_CACHE)
def train(command: list[str], cwd: str, label: str) -> None:
    """Fine-tune; the "train" tag's global concurrency limit lets one run at a time."""
    _run(command, cwd)


@task(name="evaluate", task_run_name="evaluate {label}", cache_policy=NO_CACHE)
def evaluate(command: list[str], cwd: str, label: str) -> None:
    """Predict on the test split and score it (metrics.json)."""
    _run(command, cwd)


@task(name="aggregate", task_run_name="aggregate {label}", cache_policy=NO_CACHE)
def aggregate(command: list[str], cwd: str, label: str) -> None:
    """The DVC path's aggregate stage (the suite path summarises in `summarise_suite`)."""
    _run(command, cwd)


# in DVC_STAGES order
DVC_STAGE_TASKS = (check, validate, preprocess, negatives, cache_features, train, evaluate, aggregate)
# the VOS stages (pipeline.flows.dvc_path.run_vos_dvc_path) and the tasks that run them, in order
VOS_STAGES = ("vos_check", "vos_validate", "vos_preprocess", "vos_train", "vos_evaluate")
VOS_STAGE_TASKS = (check, validate, preprocess, train, evaluate)


def ensure_train_limit() -> None:
    """Create the global concurrency limit `tag:train` = TRAIN_CONCURRENCY if absent (or set it back); idempotent.

    Prefect 3 enforces a task tag's limit through the global concurrency limit named "tag:<tag>"."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(f"tag:{TRAIN_TAG}", TRAIN_CONCURRENCY)
        except ObjectAlreadyExists:  # another flow created it between the read and the create: the same limit
            pass
