"""The suite path: the stage commands of `pipeline.stages` per dataset (and seed), fanned out as Prefect tasks.

`dvc repro` takes no parameter overrides, so a suite run of the flow (datasets or dataset_root given) runs the stage
commands themselves, with `--params <file> --set <overrides>` on every stage, writing where the DVC suites write
(`pipeline.stages.suite_layout`):
    data/suites/<suite>/<dataset>/{clean/, preprocessed/, negatives.json, features/}
    reports/<suite>/<dataset>/validate.json
    runs/<suite>/<dataset>/seed<s>/{model/, checkpoints/, ...}   reports/<suite>/<dataset>/seed<s>/metrics.json
validate, preprocess, negatives (and cache_features) run per dataset, train (train.seed = s, applied last) and
evaluate per dataset x seed; the baseline model is evaluated on the first seed only (its metrics do not depend on
the seed). A few-shot suite (odinw13) trains seed s on fewshot_train_shot10_seed<s>.json, which validate carries
along or draws (validate.fewshot_seeds), and its feature cache is one per dataset x seed (a cache is keyed by its
annotation file); other suites share one cache per dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.futures import wait

from pipeline import stages
from pipeline.aggregate import METRICS_FILE
from pipeline.fewshot import fewshot_file_name
from pipeline.flows import tasks
from pipeline.flows.commands import with_interpreter
from pipeline.flows.dvc_path import PathResult
from pipeline.flows.report import MetricRow, metrics_markdown, read_metric_value
from pipeline.stages import Layout
from pipeline.suite_params import SAFE_NAME
from pipeline.suites import FEWSHOT_SUITES
from sam3.coco import SPLITS, present_splits, split_annotation_path
from sam3.errors import ConfigError, DataError
from sam3.io import write_json, write_text

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"  # a suite run's table, in reports/<suite>/
SUITE_REPORTS = Path("reports")


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of a suite run: its name (the folder's), the folder as given, and the suite."""

    name: str
    raw: str
    suite: str

    def layout(self, seed: int) -> Layout:
        """Where the run of `seed` reads and writes (the DVC suites' layout, with a seed<s> level for every suite)."""
        k = FEWSHOT_SUITES.get(self.suite)
        train_file = fewshot_file_name(k, seed) if k is not None else None
        return stages.suite_layout(self.suite, self.name, self.raw, seed, train_file)

    def cache_label(self, seed: int) -> str:
        """How the cache of `seed`'s run is named in task runs: the dataset, with the seed in a few-shot suite."""
        return f"{self.name} seed {seed}" if self.suite in FEWSHOT_SUITES else self.name


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


def dataset_commands(plan: DatasetPlan, seeds: list[int], params_file: str, overrides: list[str]) -> dict[str, list]:
    """validate, preprocess and negatives of one dataset (`pipeline.stages`, every stage with the run's params file
    and overrides). A few-shot suite's validate also completes the seeds' few-shot files."""
    layout = plan.layout(seeds[0])
    k = FEWSHOT_SUITES.get(plan.suite)
    fewshot = [] if k is None else [f"validate.fewshot_k={k}", f"validate.fewshot_seeds={list(seeds)}"]
    return {
        "validate": with_interpreter(stages.validate(layout, params_file, [*overrides, *fewshot])),
        "preprocess": with_interpreter(stages.preprocess(layout, params_file, overrides)),
        "negatives": with_interpreter(stages.negatives(layout, params_file, overrides)),
    }


def cache_command(plan: DatasetPlan, seed: int, params_file: str, overrides: list[str]) -> list[str]:
    """cache-features for the run of `seed`, into its layout's feature folder, with train's params and overrides."""
    return with_interpreter(stages.cache_features(plan.layout(seed), params_file, overrides))


def run_commands(
    plan: DatasetPlan, seed: int, params_file: str, overrides: list[str], with_baseline: bool
) -> dict[str, list[str]]:
    """train (train.seed = `seed`, applied after `overrides`) and evaluate of one dataset and seed. `with_baseline`:
    also evaluate the params' baseline model (before/after table); a suite asks for it on one seed per dataset."""
    layout = plan.layout(seed)
    no_baseline = [] if with_baseline else [stages.NO_BASELINE]
    return {
        "train": with_interpreter(stages.train(layout, params_file, [*overrides, f"train.seed={seed}"])),
        "evaluate": with_interpreter(stages.evaluate(layout, params_file, [*overrides, *no_baseline])),
    }


def run_suite_path(
    repo: Path, suite: str, datasets: list[str], seeds: list[int], params_file: str, overrides: list[str], metric: str
) -> PathResult:
    """Submit every stage of every dataset and seed, stage by stage so that the thread pool's queue is in dependency
    order (a task waiting for its upstream holds a worker), wait, then summarise what finished."""
    from pipeline.params import load_params

    load_params(repo / params_file, overrides)  # a typo fails here, before any stage runs
    plans = plan_suite(suite, datasets)
    cwd = str(repo)
    futures: dict[str, PrefectFuture] = {}
    per_dataset = {plan.name: dataset_commands(plan, seeds, params_file, overrides) for plan in plans}
    for stage_task, upstream in (
        (tasks.validate, None),
        (tasks.preprocess, "validate"),
        (tasks.negatives, "preprocess"),
    ):
        for plan in plans:
            wait_for = [futures[f"{upstream} {plan.name}"]] if upstream else None
            command = per_dataset[plan.name][stage_task.name]
            futures[f"{stage_task.name} {plan.name}"] = stage_task.submit(
                command, cwd, label=plan.name, wait_for=wait_for
            )
    caches = submit_caches(plans, seeds, params_file, overrides, cwd, futures)
    per_run = {
        (p.name, s): run_commands(p, s, params_file, overrides, with_baseline=s == seeds[0])
        for p in plans
        for s in seeds
    }
    for (name, seed), commands in per_run.items():
        label = f"{name} seed {seed}"
        futures[f"train {label}"] = tasks.train.submit(
            commands["train"], cwd, label=label, wait_for=[caches[name, seed]]
        )
    for (name, seed), commands in per_run.items():
        label = f"{name} seed {seed}"
        futures[f"evaluate {label}"] = tasks.evaluate.submit(
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
    per_folder: dict[str, PrefectFuture] = {}
    for plan in plans:
        for seed in seeds:
            folder = plan.layout(seed).features
            if folder in per_folder:
                continue
            label = plan.cache_label(seed)
            per_folder[folder] = futures[f"{tasks.cache_features.name} {label}"] = tasks.cache_features.submit(
                cache_command(plan, seed, params_file, overrides),
                cwd,
                label=label,
                wait_for=[futures[f"negatives {plan.name}"]],
            )
    return {(plan.name, seed): per_folder[plan.layout(seed).features] for plan in plans for seed in seeds}


@task(name="aggregate", task_run_name="aggregate {suite}")
def summarise_suite(
    cwd: str, suite: str, plans: list[DatasetPlan], seeds: list[int], metric: str
) -> tuple[list[MetricRow], list[str]]:
    """The suite path's aggregate step: the metric of every run (dataset x seed), written to
    reports/<suite>/summary.json and summary.md; for the benchmark suites (rf100vl, odinw13) also their own
    summary from `pipeline.aggregate` (means per domain, or per seed and over seeds)."""
    repo = Path(cwd)
    rows = []
    for plan in plans:
        for seed in seeds:
            layout = plan.layout(seed)
            metrics_file = f"{layout.results}/{METRICS_FILE}"
            value = read_metric_value(repo / metrics_file, metric)
            rows.append(MetricRow(plan.name, seed, value, metrics_file, layout.model))
    ran = [row for row in rows if (repo / row.metrics_file).is_file()]
    missing = [f"{row.dataset} seed {row.seed}" for row in rows if row not in ran]
    notes = [f"no metrics file: {', '.join(missing)}"] if missing else []
    result: dict[str, Any] = {"suite": suite, "metric": metric, "runs": [asdict(row) for row in rows]}
    markdown = metrics_markdown(f"{suite}: {metric}", metric, rows, notes) + benchmark_markdown(
        suite, ran, seeds, metric, result
    )
    out = repo / SUITE_REPORTS / suite
    write_json(out / SUMMARY_JSON, result)
    write_text(out / SUMMARY_MD, markdown)
    return rows, notes


def benchmark_markdown(suite: str, ran: list[MetricRow], seeds: list[int], metric: str, result: dict) -> str:
    """The benchmark suites' own summary (added to `result` under the suite's name) as Markdown; '' for others."""
    from pipeline.aggregate import aggregate_odinw13, aggregate_rf100vl, odinw13_markdown, rf100vl_markdown
    from pipeline.suites import rf100vl_domains

    if not ran or suite not in ("odinw13", "rf100vl"):
        return ""
    if suite == "odinw13":
        result["odinw13"] = {"metric": metric, **aggregate_odinw13({(r.dataset, r.seed): r.value for r in ran})}
        return "\n" + odinw13_markdown(result["odinw13"])
    domains, source = rf100vl_domains()
    result["rf100vl"], markdown = {}, ""
    for seed in seeds:  # the suite has no seeds: one summary per seed asked for
        values = {r.dataset: r.value for r in ran if r.seed == seed}
        summary = {"metric": metric, "domains_source": source, **aggregate_rf100vl(values, domains)}
        result["rf100vl"][str(seed)] = summary
        markdown += f"\n## Seed {seed}\n\n" + rf100vl_markdown(summary)
    return markdown
