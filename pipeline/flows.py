"""Prefect orchestration: the `finetune` flow, its stage tasks, the champion rule and the four deployments.

Two paths through the same stages (ARCHITECTURE.md), chosen by the flow's parameters:
- DVC path (no `datasets`, no `dataset_root`; deployments `demo` and `retrain`): one task per stage runs
  `dvc repro <stage>` in the repository, in the order validate, preprocess, negatives, cache_features, train,
  evaluate, aggregate.
  DVC decides what re-runs and records it in dvc.lock, so a Prefect run leaves the DVC state as `dvc repro` would
  (`dvc status` of those stages clean afterwards; checked and reported). A stage that dvc.yaml does not have is
  skipped with a logged note. Parameters come from params.yaml alone (dvc.yaml reads it).
- Suite path (`datasets` or `dataset_root`; deployments `rf100` and `odinw13`): `dvc repro` takes no parameter
  overrides, so each dataset runs the stage commands themselves (`python -m pipeline <stage> ...`, with
  `--params`/`--set` for cache-features and train), writing where the DVC suites (suites/<suite>/dvc.yaml) write:
      data/suites/<suite>/<dataset>/{clean/, preprocessed/, negatives.json, features/}, reports/<suite>/<dataset>/
      validate.json, runs/<suite>/<dataset>/seed<s>/{model/, checkpoints/, ...},
      reports/<suite>/<dataset>/seed<s>/metrics.json
  fanned out over datasets (validate, preprocess, negatives, cache_features) and datasets x seeds (train with
  train.seed = s, evaluate on the test split; the baseline model is evaluated on the first seed only, its metrics
  being the same for every seed). Suite "odinw13" trains seed s on the few-shot file fewshot_train_shot10_seed<s>.json,
  which the validate stage carries along from the dataset or draws when it lacks it (`--fewshot-seeds`), as the DVC
  suite; its feature cache is one per dataset x seed (features/seed<s>, built on that file: a cache is keyed by its
  annotation file), where other suites share one per dataset (every seed trains on the same images; a seeded
  `train.subset_images` subset is drawn by train from the cached list).
  The DVC suite stages (suites/<suite>/dvc.yaml, a `matrix` over datasets and seeds) are the DVC way to the same
  runs; there RF100-VL runs once per dataset, without the seed<s> level.

Prefect features: retries for the I/O-bound stages (validate, preprocess; not when the stage says the user's data
or parameters are wrong), the tag "train" under a global concurrency limit of 1 (`tag:train`, created
idempotently: one job at a time on the machine's accelerators, whatever the fan-out: the trainings and the feature
cache builds, which run the full model over every image when cache.enabled), a table artifact of the
metric per dataset and seed and a Markdown summary, and champion promotion (`promote=True`, deployment `retrain`):
the new model replaces the champion recorded in models/registry.json only when its metric beats the champion's
(`decide_promotion`), copied to models/champion/; the reason is logged and kept as a Markdown artifact.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.schedules import Cron
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.aggregate import DEFAULT_METRIC, METRICS_FILE
from pipeline.fewshot import fewshot_file_name
from pipeline.score import write_json
from pipeline.suite_params import ODINW13_RECIPE, RF100VL_RECIPE, SAFE_NAME, default_params
from pipeline.suites import ODINW13_SEEDS, ODINW13_SHOTS
from sam3.coco import SPLITS, present_splits, split_annotation_path
from sam3.errors import ConfigError, DataError

if TYPE_CHECKING:
    from logging import Logger, LoggerAdapter

    from prefect.client.schemas.objects import TaskRun
    from prefect.deployments.runner import RunnerDeployment
    from prefect.futures import PrefectFuture
    from prefect.states import State
    from prefect.tasks import Task

    from pipeline.params import Params

FLOW_NAME = "finetune"
TRAIN_TAG = "train"
TRAIN_CONCURRENCY = 1  # trainings at once: each one takes every accelerator of the machine
IO_RETRIES = 2
RETRY_DELAY_S = 10
STAGE_WORKERS = 4  # stage commands running at once in a suite (each may start its own data workers)
# the order of the DVC path
DVC_STAGES = ("validate", "preprocess", "negatives", "cache_features", "train", "evaluate", "aggregate")
PARAMS_FILE = "params.yaml"  # what dvc.yaml reads
MODEL_FOLDER = "model"  # sam3.trainer.train exports the fine-tuned model to <run dir>/model
NEGATIVES_FILE = "negatives.json"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"  # a suite run's table, in reports/<suite>/
REGISTRY_FILE = "models/registry.json"  # in git: who the champion is, and why
CHAMPION_DIR = "models/champion"  # the champion's model (a copy: the run folder is overwritten by the next run)
CLI_ERROR_PREFIX = "error: "  # how `pipeline.cli` prints a Sam3Error: the user's input is wrong, retrying cannot help
OUTPUT_TAIL_LINES = 20  # lines of a failed command's output kept in the error
PROGRESS_INTERVAL_S = "30"  # seconds between refreshes of a stage's tqdm bars (TQDM_MININTERVAL): each is a log line


# ---------------------------------------------------------------------------------------------------------------
# Running commands


class StageFailed(RuntimeError):
    """A stage command exited with a non-zero status; the message ends with its last lines of output."""

    def __init__(self, command: list[str], returncode: int, tail: list[str]) -> None:
        self.command, self.returncode, self.tail = command, returncode, tail
        output = "\n".join(f"    {line}" for line in tail)
        super().__init__(f"`{shlex.join(command)}` exited with {returncode}; last output:\n{output}")

    @property
    def user_error(self) -> bool:
        """True when the stage reported a Sam3Error (bad data, files or parameters): the same input fails again."""
        return any(line.startswith(CLI_ERROR_PREFIX) for line in self.tail)


def stage_environment() -> dict[str, str]:
    """This process's environment with the interpreter's folder (the venv's bin) first on PATH, so `dvc` stage
    commands (`python -m pipeline ...`) run the same Python; unbuffered output and slow progress bars for the log."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", PROGRESS_INTERVAL_S)
    return env


def run_command(command: list[str], cwd: Path, logger: Logger | LoggerAdapter) -> None:
    """Run `command` in `cwd`, each output line (stdout and stderr) logged; StageFailed on a non-zero exit."""
    logger.info("$ %s", shlex.join(command))
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # a stray non-UTF-8 byte must not fail the stage
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:  # text mode splits on "\r" too: each progress-bar refresh is one line
            line = raw.rstrip()
            if line:
                logger.info("%s", line)
                tail.append(line)
    if process.returncode != 0:
        raise StageFailed(command, process.returncode, list(tail))


def retry_unless_user_error(task_: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry I/O failures, not a stage that said the user's input is wrong."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailed) and error.user_error)


def cli_command(stage: str, *positional: str | Path, **flags: str | int | float | Path | list[str]) -> list[str]:
    """`python -m pipeline <stage> positional... --flag value...` with this interpreter: keyword `flag_name` gives
    `--flag-name`; a list gives several values after its flag (an nargs="+" option)."""
    command = [sys.executable, "-m", "pipeline", stage, *map(str, positional)]
    for name, value in flags.items():
        command += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return command


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


# ---------------------------------------------------------------------------------------------------------------
# Tasks: one per stage. Each runs one command (`dvc repro <stage>` or `python -m pipeline <stage> ...`).


def _run(command: list[str], cwd: str) -> None:
    run_command(command, Path(cwd), get_run_logger())


_IO_RETRY = dict(retries=IO_RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_unless_user_error)


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


DVC_STAGE_TASKS = (validate, preprocess, negatives, cache_features, train, evaluate, aggregate)  # in DVC_STAGES order


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


# ---------------------------------------------------------------------------------------------------------------
# Metrics table


@dataclass(frozen=True)
class MetricRow:
    """One run's metric: the table artifact's row."""

    dataset: str
    seed: int
    value: float | None  # None: no metrics file (the run failed or evaluate did not run) or the metric is null
    metrics_file: str
    model: str | None  # the run's model folder; None when no run recorded one


def read_metric_value(path: Path, metric: str) -> float | None:
    """`metric` of a metrics.json (None when the file is absent or holds null); DataError for a broken file."""
    from pipeline.aggregate import read_metric

    return read_metric(path, metric) if path.is_file() else None


def mean_of(rows: list[MetricRow]) -> float | None:
    values = [row.value for row in rows if row.value is not None]
    return sum(values) / len(values) if values else None


def metrics_markdown(title: str, metric: str, rows: list[MetricRow], notes: list[str]) -> str:
    """A Markdown summary: one row per run (raw values, 0..1 for AP), the mean over runs with a value, then notes."""
    lines = [f"# {title}", "", f"| dataset | seed | {metric} | metrics file |", "|---|---:|---:|---|"]
    for row in rows:
        value = "n/a" if row.value is None else f"{row.value:.4f}"
        lines.append(f"| {row.dataset} | {row.seed} | {value} | {row.metrics_file} |")
    mean = mean_of(rows)
    counted = sum(row.value is not None for row in rows)
    lines += ["", f"Mean {metric} over {counted} of {len(rows)} runs: " + ("n/a" if mean is None else f"{mean:.4f}")]
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def artifact_key(suite: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{FLOW_NAME}-{suite}-{what}".lower())


@task(name="report")
def report(suite: str, metric: str, rows: list[MetricRow], notes: list[str]) -> str:
    """Table artifact of the metric per dataset and seed, and the Markdown summary artifact; returns the Markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = metrics_markdown(f"{FLOW_NAME} {suite}: {metric}", metric, rows, notes)
    create_table_artifact(
        [asdict(row) for row in rows], key=artifact_key(suite, "metrics"), description=f"{metric} per dataset and seed"
    )
    create_markdown_artifact(markdown, key=artifact_key(suite, "summary"), description=f"{FLOW_NAME} {suite}")
    get_run_logger().info("%s", markdown)
    return markdown


# ---------------------------------------------------------------------------------------------------------------
# Champion promotion


@dataclass(frozen=True)
class Champion:
    """The registry's champion: which run made it, its metric, and where its model lives."""

    run: str  # the Prefect flow run (name and id)
    metric: str
    value: float
    model_path: str  # the promoted copy, relative to the repository
    source: str  # the run's model folder it was copied from
    timestamp: str  # ISO 8601, UTC
    model_md5: str | None = None  # DVC's hash of the source (DVC path): `dvc` finds it in the cache


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide_promotion(metric: str, value: float | None, champion: Champion | None) -> Decision:
    """The promotion rule (higher is better, as for every metric of the evaluate stage): promote the new model
    when there is no champion, or when its `metric` value is strictly greater than the champion's on the same
    metric. No promotion without a value (missing or null metric, NaN) or when the champion was chosen on another
    metric (the values do not compare; choose one metric, or reset the registry)."""
    if value is None or value != value:  # NaN != NaN
        return Decision(False, f"not promoted: the new run has no {metric} value (missing, null or NaN)")
    if champion is None:
        return Decision(True, f"promoted: no champion yet; the new run's {metric} is {value:.4f}")
    if champion.metric != metric:
        return Decision(
            False,
            f"not promoted: the champion was chosen on {champion.metric}, this run is judged on {metric}; "
            f"run with metric={champion.metric} or reset {REGISTRY_FILE}",
        )
    if value > champion.value:
        return Decision(
            True,
            f"promoted: {metric} {value:.4f} beats the champion's {champion.value:.4f} "
            f"(+{value - champion.value:.4f}, champion run {champion.run})",
        )
    return Decision(
        False,
        f"not promoted: {metric} {value:.4f} does not beat the champion's {champion.value:.4f} "
        f"({value - champion.value:+.4f}, champion run {champion.run})",
    )


def read_registry(path: Path) -> tuple[Champion | None, list[dict[str, Any]]]:
    """(champion, history of past champions) of a registry file; (None, []) when it does not exist yet."""
    if not path.is_file():
        return None, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        champion = data["champion"]
        history = data.get("history", [])
        return (Champion(**champion) if champion is not None else None), list(history)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: not a model registry ({type(err).__name__}: {err}); expected "
            '{"champion": {"run", "metric", "value", "model_path", "source", "timestamp"} or null, "history": [...]}; '
            "restore it from git"
        ) from None


def promote_model(
    repo: Path, run: str, metric: str, value: float | None, model_dir: Path, model_md5: str | None = None
) -> Decision:
    """Apply `decide_promotion` against the registry of `repo`; when promoted, copy `model_dir` to CHAMPION_DIR
    (the old champion goes to the registry's history) and rewrite the registry."""
    registry = repo / REGISTRY_FILE
    champion, history = read_registry(registry)
    decision = decide_promotion(metric, value, champion)
    if not decision.promote:
        return decision
    if not (repo / model_dir).is_dir():
        raise DataError(f"{repo / model_dir}: model folder to promote does not exist; did the train stage run?")
    target = repo / CHAMPION_DIR
    staging, retired = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for leftover in (staging, retired):  # from an interrupted promotion
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(repo / model_dir, staging)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
    new = Champion(
        run=run,
        metric=metric,
        value=float(value),  # decide_promotion promotes only with a value
        model_path=CHAMPION_DIR,
        source=str(model_dir),
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        model_md5=model_md5,
    )
    write_json(registry, {"champion": asdict(new), "history": history + ([asdict(champion)] if champion else [])})
    return decision


@task(name="promote")
def promote_champion(repo: str, suite: str, metric: str, rows: list[MetricRow], model_md5: str | None) -> Decision:
    """Promote the run's model when it beats the champion; log why or why not, and keep it as an artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    logger = get_run_logger()
    if len(rows) != 1:
        decision = Decision(False, f"not promoted: {len(rows)} candidate runs ({metric}); promotion needs exactly one")
    elif rows[0].model is None:
        decision = Decision(False, "not promoted: the run recorded no model folder (is the train stage in dvc.yaml?)")
    else:
        run = f"{flow_run.name} ({flow_run.id})"
        decision = promote_model(Path(repo), run, metric, rows[0].value, Path(rows[0].model), model_md5)
    logger.info("%s", decision.reason)
    champion, _ = read_registry(Path(repo) / REGISTRY_FILE)
    lines = ["# Champion promotion", "", f"**{decision.reason}**", ""]
    if champion is not None:
        lines += [f"Champion now: run {champion.run}, {champion.metric} {champion.value:.4f}, {champion.model_path}"]
    create_markdown_artifact("\n".join(lines) + "\n", key=artifact_key(suite, "promotion"))
    return decision


# ---------------------------------------------------------------------------------------------------------------
# DVC path


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
    for stage, stage_task in zip(DVC_STAGES, DVC_STAGE_TASKS, strict=True):
        if stage not in present:
            logger.info("stage %r is not in dvc.yaml yet: skipped", stage)
            notes.append(f"stage {stage} skipped: not in dvc.yaml")
            continue
        stage_task(dvc_command("repro", stage), str(repo), label="via dvc")
        ran.append(stage)
    status = json.loads(dvc_output(repo, "status", "--json", *ran) or "{}") if ran else {}
    if status:
        logger.warning("dvc status is not clean after the run: %s", status)
        notes.append(f"dvc status NOT clean: {json.dumps(status, sort_keys=True)}")
    else:
        notes.append(f"dvc status clean for {', '.join(ran) or 'no stage'}")

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


# ---------------------------------------------------------------------------------------------------------------
# Suite path


SUITE_DATA, SUITE_RUNS, SUITE_REPORTS = Path("data/suites"), Path("runs"), Path("reports")  # as suites/*/dvc.yaml
FEWSHOT_SUITES = {"odinw13": ODINW13_SHOTS}  # suites that train each seed on its k-shot file: k


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of a suite run and where its outputs go (relative to the repository; the DVC suites' layout)."""

    name: str
    raw: str  # the dataset folder as given
    suite: str

    @property
    def data(self) -> Path:
        """data/suites/<suite>/<name>: clean/, preprocessed/, negatives.json"""
        return SUITE_DATA / self.suite / self.name

    @property
    def reports(self) -> Path:
        """reports/<suite>/<name>: validate.json"""
        return SUITE_REPORTS / self.suite / self.name

    def features(self, seed: int) -> Path:
        """The feature cache the run of `seed` reads: data/suites/<suite>/<name>/features, shared by the seeds (they
        train on the same annotation file), or .../features/seed<seed> in a few-shot suite (each seed trains on its
        own file, and a cache is keyed by the file it was built on)."""
        folder = self.data / "features"
        return folder / f"seed{seed}" if self.suite in FEWSHOT_SUITES else folder

    def cache_label(self, seed: int) -> str:
        """How the cache of `seed`'s run is named in task runs: the dataset, with the seed in a few-shot suite."""
        return f"{self.name} seed {seed}" if self.suite in FEWSHOT_SUITES else self.name

    def run_dir(self, seed: int) -> Path:
        """runs/<suite>/<name>/seed<seed>: the training run"""
        return SUITE_RUNS / self.suite / self.name / f"seed{seed}"

    def report_dir(self, seed: int) -> Path:
        """reports/<suite>/<name>/seed<seed>: metrics.json, predictions.json, plots/"""
        return self.reports / f"seed{seed}"


def find_datasets(repo: Path, datasets: list[str] | None, dataset_root: str | None) -> tuple[list[str], list[str]]:
    """(dataset folders, folders left out) of a suite: `datasets` as given, each checked, or the sub-folders of
    `dataset_root` (sorted) that hold a split annotation file, and the names of those that do not."""
    if datasets:
        for folder in datasets:
            present_splits(repo / folder)  # DataError naming the folder
        return list(datasets), []
    if dataset_root is None:
        raise ConfigError("a suite needs `datasets` (dataset folders) or `dataset_root` (a folder of datasets)")
    root = repo / dataset_root
    if not root.is_dir():
        raise DataError(f"{root}: dataset_root does not exist; put the suite's dataset folders there or pass datasets")
    found, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(split_annotation_path(folder, split).is_file() for split in SPLITS):
            found.append(str(Path(dataset_root) / folder.name))
        else:
            skipped.append(folder.name)
    if not found:
        raise DataError(f"{root}: no dataset folder (<name>/{{train,valid,test}}/_annotations.coco.json) inside")
    return found, skipped


def plan_suite(suite: str, datasets: list[str]) -> list[DatasetPlan]:
    """One plan per dataset, named by its folder; ConfigError for a bad suite name or two folders of one name."""
    if not SAFE_NAME.fullmatch(suite):
        raise ConfigError(f"suite {suite!r}: use letters, digits, '_', '-', '.' (it names runs/<suite>/)")
    plans = [DatasetPlan(Path(d).name, d, suite) for d in datasets]
    names = [plan.name for plan in plans]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"datasets {repeated} appear twice (the folder name names the run); rename or drop one")
    return plans


def dataset_commands(plan: DatasetPlan, params: Params, seeds: list[int]) -> dict[str, list[str]]:
    """validate, preprocess and negatives of one dataset: dvc.yaml's commands, with outputs under `plan.data` (and
    the report under `plan.reports`). A few-shot suite's validate also completes the seeds' few-shot files."""
    negative = params.negatives
    k = FEWSHOT_SUITES.get(plan.suite)
    fewshot = {} if k is None else {"fewshot_k": k, "fewshot_seeds": [str(seed) for seed in seeds]}
    return {
        "validate": cli_command(
            "validate", plan.raw, out=plan.data / "clean", report=plan.reports / "validate.json",
            max_pixels=params.validate.max_pixels, **fewshot,
        ),
        "preprocess": cli_command(
            "preprocess", plan.data / "clean", out=plan.data / "preprocessed", size=params.preprocess.size,
            workers=params.preprocess.workers,
        ),
        "negatives": cli_command(
            "negatives", plan.data / "preprocessed", out=plan.data / NEGATIVES_FILE,
            strategy=negative.strategies.split(), per_image=negative.per_image, seed=negative.seed,
            similarity_threshold=negative.similarity_threshold, score_threshold=negative.score_threshold,
            model=params.model.source,
        ),
    }  # fmt: skip


def cache_command(plan: DatasetPlan, seed: int, params_file: str, overrides: list[str]) -> list[str]:
    """cache-features for the run of `seed`: dvc.yaml's command into plan.features(seed), with train's params file
    and overrides (a model or cache setting among them reaches the cache; with cache.enabled false it writes only the
    "off" manifest). A few-shot suite caches the seed's few-shot file, as train reads it."""
    settings = [arg for item in overrides for arg in ("--set", item)]
    k = FEWSHOT_SUITES.get(plan.suite)
    fewshot = {} if k is None else {"train_annotations": fewshot_file_name(k, seed)}
    return cli_command(
        "cache-features", plan.data / "preprocessed", *settings, out=plan.features(seed), params=params_file,
        negatives=plan.data / NEGATIVES_FILE, **fewshot,
    )  # fmt: skip


def run_commands(
    plan: DatasetPlan, seed: int, params: Params, params_file: str, overrides: list[str], with_baseline: bool
) -> dict[str, list[str]]:
    """train (train.seed = `seed`, applied after `overrides`) and evaluate of one dataset and seed: dvc.yaml's
    commands, into plan.run_dir(seed) and plan.report_dir(seed). A few-shot suite trains on the seed's few-shot
    file. `with_baseline`: also evaluate params' baseline model (before/after table); its metrics do not depend on
    the seed, so a suite asks for it on one seed per dataset."""
    run_dir, report_dir, split = plan.run_dir(seed), plan.report_dir(seed), params.evaluate.split
    settings = [arg for item in [*overrides, f"train.seed={seed}"] for arg in ("--set", item)]
    k = FEWSHOT_SUITES.get(plan.suite)
    fewshot = {} if k is None else {"train_annotations": fewshot_file_name(k, seed)}
    baseline = {"baseline": params.evaluate.baseline} if with_baseline else {}
    return {
        "train": cli_command(
            "train", *settings, run_dir=run_dir, dataset=plan.data / "preprocessed", params=params_file,
            negatives=plan.data / NEGATIVES_FILE, feature_cache=plan.features(seed), **fewshot,
        ),
        "evaluate": cli_command(
            "evaluate", model=run_dir / MODEL_FOLDER, dataset=plan.data / "preprocessed", split=split,
            gt_original=split_annotation_path(plan.data / "clean", split), mode=params.model.mode,
            prompt_chunk=params.evaluate.prompt_chunk, max_dets=params.evaluate.max_dets,
            out=report_dir / METRICS_FILE, predictions=report_dir / "predictions.json", plots_dir=report_dir / "plots",
            **baseline,
        ),
    }  # fmt: skip


def run_suite_path(
    repo: Path, suite: str, datasets: list[str], seeds: list[int], params_file: str, overrides: list[str], metric: str
) -> PathResult:
    """Submit every stage of every dataset and seed, stage by stage so that the thread pool's queue is in dependency
    order (a task waiting for its upstream holds a worker), wait, then summarise what finished."""
    from pipeline.params import load_params

    params = load_params(repo / params_file, overrides)  # a typo fails here, before any stage runs
    plans = plan_suite(suite, datasets)
    cwd = str(repo)
    futures: dict[str, PrefectFuture] = {}
    per_dataset = {plan.name: dataset_commands(plan, params, seeds) for plan in plans}
    for stage_task, upstream in ((validate, None), (preprocess, "validate"), (negatives, "preprocess")):
        for plan in plans:
            wait_for = [futures[f"{upstream} {plan.name}"]] if upstream else None
            command = per_dataset[plan.name][stage_task.name]
            futures[f"{stage_task.name} {plan.name}"] = stage_task.submit(
                command, cwd, label=plan.name, wait_for=wait_for
            )
    caches = submit_caches(plans, seeds, params_file, overrides, cwd, futures)
    per_run = {
        (p.name, s): run_commands(p, s, params, params_file, overrides, with_baseline=s == seeds[0])
        for p in plans
        for s in seeds
    }
    for (name, seed), commands in per_run.items():
        label = f"{name} seed {seed}"
        futures[f"train {label}"] = train.submit(commands["train"], cwd, label=label, wait_for=[caches[name, seed]])
    for (name, seed), commands in per_run.items():
        label = f"{name} seed {seed}"
        futures[f"evaluate {label}"] = evaluate.submit(
            commands["evaluate"], cwd, label=label, wait_for=[futures[f"train {label}"]]
        )
    wait(list(futures.values()))
    failed = [name for name, future in futures.items() if not future.state.is_completed()]
    logger = get_run_logger()
    for name in failed:
        logger.error("%s did not complete: %s", name, futures[name].state.message)
    rows, notes = summarise_suite(cwd, suite, plans, seeds, metric)
    return PathResult(rows, notes + [f"did not complete: {name}" for name in failed], failed)


def submit_caches(
    plans: list[DatasetPlan],
    seeds: list[int],
    params_file: str,
    overrides: list[str],
    cwd: str,
    futures: dict[str, PrefectFuture],
) -> dict[tuple[str, int], PrefectFuture]:
    """Submit the cache_features tasks after each dataset's negatives (one per feature cache folder: per dataset, or
    per dataset x seed in a few-shot suite), adding them to `futures`; return the future each (dataset, seed) run's
    train waits for."""
    per_folder: dict[Path, PrefectFuture] = {}
    for plan in plans:
        for seed in seeds:
            folder = plan.features(seed)
            if folder in per_folder:
                continue
            label = plan.cache_label(seed)
            per_folder[folder] = futures[f"{cache_features.name} {label}"] = cache_features.submit(
                cache_command(plan, seed, params_file, overrides),
                cwd,
                label=label,
                wait_for=[futures[f"negatives {plan.name}"]],
            )
    return {(plan.name, seed): per_folder[plan.features(seed)] for plan in plans for seed in seeds}


@task(name="aggregate", task_run_name="aggregate {suite}")
def summarise_suite(
    cwd: str, suite: str, plans: list[DatasetPlan], seeds: list[int], metric: str
) -> tuple[list[MetricRow], list[str]]:
    """The suite path's aggregate step: the metric of every run (dataset x seed), written to
    reports/<suite>/summary.json and summary.md; for the benchmark suites (rf100vl, odinw13) also their own
    summary from `pipeline.aggregate` (means per domain, or per seed and over seeds)."""
    from pipeline.aggregate import aggregate_odinw13, aggregate_rf100vl, odinw13_markdown, rf100vl_markdown, write_text
    from pipeline.suites import rf100vl_domains

    repo = Path(cwd)
    rows = [
        MetricRow(
            plan.name,
            seed,
            read_metric_value(repo / plan.report_dir(seed) / METRICS_FILE, metric),
            str(plan.report_dir(seed) / METRICS_FILE),
            str(plan.run_dir(seed) / MODEL_FOLDER),
        )
        for plan in plans
        for seed in seeds
    ]
    ran = [row for row in rows if (repo / row.metrics_file).is_file()]
    missing = [f"{row.dataset} seed {row.seed}" for row in rows if row not in ran]
    notes = [f"no metrics file: {', '.join(missing)}"] if missing else []
    result: dict[str, Any] = {"suite": suite, "metric": metric, "runs": [asdict(row) for row in rows]}
    markdown = metrics_markdown(f"{suite}: {metric}", metric, rows, notes)
    if suite == "odinw13" and ran:
        result["odinw13"] = {"metric": metric, **aggregate_odinw13({(r.dataset, r.seed): r.value for r in ran})}
        markdown += "\n" + odinw13_markdown(result["odinw13"])
    elif suite == "rf100vl" and ran:
        domains, source = rf100vl_domains()
        result["rf100vl"] = {}
        for seed in seeds:  # the suite has no seeds: one summary per seed asked for
            values = {r.dataset: r.value for r in ran if r.seed == seed}
            summary = {"metric": metric, "domains_source": source, **aggregate_rf100vl(values, domains)}
            result["rf100vl"][str(seed)] = summary
            markdown += f"\n## Seed {seed}\n\n" + rf100vl_markdown(summary)
    out = repo / SUITE_REPORTS / suite
    write_json(out / SUMMARY_JSON, result)
    write_text(out / SUMMARY_MD, markdown)
    return rows, notes


# ---------------------------------------------------------------------------------------------------------------
# The flow


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
) -> dict[str, Any]:
    """Fine-tune and evaluate, through DVC (no datasets given) or over a suite of dataset folders.

    suite: names the run (runs/<suite>/, artifact keys); "rf100vl" and "odinw13" add their benchmark summaries.
    datasets / dataset_root: suite path, dataset folders (Roboflow COCO layout) or a folder of them.
    seeds: suite path, one training per dataset and seed (train.seed); default params' train.seed.
    overrides: suite path, `section.key=value` over params_file (e.g. "train.max_steps=100").
    metric: key of metrics.json for the table and the promotion rule (higher is better).
    promote: judge the run against models/registry.json's champion (needs exactly one run).
    repo: the repository (default: the current directory); relative paths are relative to it.
    Returns {"rows": [...], "notes": [...], "promotion": reason or None}.
    """
    root = Path(repo).resolve() if repo else Path.cwd()
    logger = get_run_logger()
    ensure_train_limit()
    if datasets is None and dataset_root is None:
        if seeds or overrides or params_file != PARAMS_FILE:
            raise ConfigError(
                f"seeds, overrides and params_file apply to suites (datasets or dataset_root); the DVC path reads "
                f"{PARAMS_FILE}: set train.seed and other values there"
            )
        if not (root / "dvc.yaml").is_file():
            raise ConfigError(f"{root}: no dvc.yaml; run from the repository root or pass repo=<its path>")
        logger.info("DVC path in %s", root)
        result = run_dvc_path(root, metric)
    else:
        folders, skipped = find_datasets(root, datasets, dataset_root)
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
        result = run_suite_path(root, suite, folders, list(seeds), params_file, list(overrides or []), metric)
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


# ---------------------------------------------------------------------------------------------------------------
# Deployments (served by `python -m pipeline.serve`)

RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
RETRAIN_TIMEZONE = "Europe/Paris"
# Recipe settings per suite (SAM3_RECIPE sections 4-5), the same as the DVC suites' train_flags.
RF100_OVERRIDES = list(RF100VL_RECIPE)
ODINW13_OVERRIDES = list(ODINW13_RECIPE)


def deployments() -> list[RunnerDeployment]:
    """finetune/demo, finetune/rf100, finetune/odinw13 and finetune/retrain (cron RETRAIN_CRON, RETRAIN_TIMEZONE)."""
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
            "retrain",
            description="scheduled DVC-path retraining; promotes the model only when it beats the champion",
            parameters={"suite": "retrain", "promote": True},
            schedule=Cron(RETRAIN_CRON, timezone=RETRAIN_TIMEZONE),
            **common,
        ),
    ]
