"""pipeline.flows: the promotion rule and registry, stage commands against the real CLI parser (the feature cache
between negatives and train on both paths), command running and retries, deployments; and (slow) the `finetune`
flow on a suite of 3 shapes datasets x 2 seeds under Prefect's test harness with the feature cache on, with its
metric table, Markdown summary and one-at-a-time accelerator jobs (cache builds and trainings)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import yaml
from prefect import flow

from pipeline.cli import build_parser
from pipeline.flows import commands, dvc_path, report, suite_path, tasks
from pipeline.flows import flow as flows_flow
from pipeline.flows.commands import StageFailed
from pipeline.flows.registry import (
    CHAMPION_DIR,
    REGISTRY_FILE,
    Champion,
    decide_promotion,
    promote_model,
    read_registry,
)
from pipeline.flows.report import MetricRow
from pipeline.flows.suite_path import DatasetPlan
from pipeline.params import Params
from pipeline.stage_args import stage_params
from sam3.coco import ANNOTATIONS_FILE
from sam3.errors import ConfigError, DataError
from tests.pipeline.prefect_repo import IMAGE_SIZE, REPO, shapes_datasets, write_params


def champion(value: float, metric: str = "bbox_AP") -> Champion:
    return Champion("old-run (1)", metric, value, CHAMPION_DIR, "runs/demo/model", "2026-01-01T00:00:00+00:00")


# --- the promotion rule -------------------------------------------------------------------------------------------


def test_no_champion_promotes_any_value() -> None:
    decision = decide_promotion("bbox_AP", 0.0, None)
    assert decision.promote
    assert decision.reason == "promoted: no champion yet; the new run's bbox_AP is 0.0000"


def test_a_higher_value_beats_the_champion() -> None:
    # 0.4125 - 0.4000 = +0.0125
    decision = decide_promotion("bbox_AP", 0.4125, champion(0.4))
    assert decision.promote
    assert "0.4125 beats the champion's 0.4000 (+0.0125, champion run old-run (1))" in decision.reason


def test_a_tie_or_a_lower_value_does_not_promote() -> None:
    tie = decide_promotion("bbox_AP", 0.4, champion(0.4))
    worse = decide_promotion("bbox_AP", 0.35, champion(0.4))  # 0.35 - 0.40 = -0.05
    assert not tie.promote and not worse.promote
    assert "0.4000 does not beat the champion's 0.4000 (+0.0000" in tie.reason
    assert "0.3500 does not beat the champion's 0.4000 (-0.0500" in worse.reason


def test_no_value_or_nan_never_promotes_even_without_a_champion() -> None:
    for value in (None, math.nan):
        decision = decide_promotion("bbox_AP", value, None)
        assert not decision.promote
        assert "has no bbox_AP value" in decision.reason


def test_a_champion_chosen_on_another_metric_is_not_compared() -> None:
    decision = decide_promotion("cgF1", 90.0, champion(0.4, metric="bbox_AP"))
    assert not decision.promote
    assert "chosen on bbox_AP, this run is judged on cgF1" in decision.reason


# --- the registry ---------------------------------------------------------------------------------------------------


def make_model(folder: Path, weights: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model.safetensors").write_text(weights, encoding="utf-8")
    return folder


def test_promote_model_copies_the_winner_and_keeps_the_loser_out(tmp_path: Path) -> None:
    make_model(tmp_path / "runs/a/model", "weights of a")
    make_model(tmp_path / "runs/b/model", "weights of b")
    make_model(tmp_path / "runs/c/model", "weights of c")
    champion_weights = tmp_path / CHAMPION_DIR / "model.safetensors"

    first = promote_model(tmp_path, "run-a", "bbox_AP", 0.30, Path("runs/a/model"), model_md5="abc.dir")
    assert first.promote and champion_weights.read_text() == "weights of a"
    current, history = read_registry(tmp_path / REGISTRY_FILE)
    assert (current.run, current.value, current.source, current.model_md5) == ("run-a", 0.30, "runs/a/model", "abc.dir")
    assert current.model_path == CHAMPION_DIR and history == []

    second = promote_model(tmp_path, "run-b", "bbox_AP", 0.25, Path("runs/b/model"))  # worse: nothing changes
    assert not second.promote and champion_weights.read_text() == "weights of a"
    assert read_registry(tmp_path / REGISTRY_FILE)[0] == current

    third = promote_model(tmp_path, "run-c", "bbox_AP", 0.31, Path("runs/c/model"))
    assert third.promote and champion_weights.read_text() == "weights of c"
    newest, history = read_registry(tmp_path / REGISTRY_FILE)
    assert (newest.run, newest.value) == ("run-c", 0.31)
    assert [entry["run"] for entry in history] == ["run-a"]  # the old champion moves to the history
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["champion", "registry.json"]  # no leftovers


def test_promoting_a_missing_model_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="runs/x/model: model folder to promote does not exist"):
        promote_model(tmp_path, "run-x", "bbox_AP", 0.5, Path("runs/x/model"))
    assert not (tmp_path / REGISTRY_FILE).exists()


def test_a_broken_registry_names_the_file(tmp_path: Path) -> None:
    registry = tmp_path / REGISTRY_FILE
    registry.parent.mkdir()
    registry.write_text('{"champions": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"registry.json: not a model registry \(KeyError"):
        read_registry(registry)
    assert read_registry(tmp_path / "absent.json") == (None, [])


# --- stage commands -------------------------------------------------------------------------------------------------


def parsed(command: list[str]) -> argparse.Namespace:
    """A stage command read back by the real CLI parser."""
    assert command[:3] == [sys.executable, "-m", "pipeline"]
    return build_parser().parse_args(command[3:])


def resolved(command: list[str], cwd: Path) -> tuple[argparse.Namespace, Params]:
    """The command's arguments and the params its stage runs with (its --params file, relative to `cwd`, with its
    --set items and shorthand flags), as the stage itself resolves them."""
    args = parsed(command)
    module = sys.modules[args.run.__module__]
    args.params = str(cwd / args.params)
    return args, stage_params(args, getattr(module, "SHORTHANDS", ()))


def test_suite_commands_parse_with_the_real_cli_and_carry_the_params(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml")
    plan = DatasetPlan("a", "raw/a", "tiny")
    overrides = ["train.max_steps=3"]
    per_dataset = suite_path.dataset_commands(plan, [30, 300], "params.yaml", overrides)
    per_run = suite_path.run_commands(plan, 30, "params.yaml", overrides, with_baseline=True)
    no_baseline = suite_path.run_commands(plan, 300, "params.yaml", [], with_baseline=False)

    # the layout of the DVC suites (suites/<suite>/dvc.yaml); every stage gets the params file and the overrides
    validate, params = resolved(per_dataset["validate"], tmp_path)
    assert (validate.out, validate.report) == (Path("data/suites/tiny/a/clean"), Path("reports/tiny/a/validate.json"))
    assert params.validate.fewshot_seeds == [] and params.train.max_steps == 3  # not a few-shot suite
    preprocess, params = resolved(per_dataset["preprocess"], tmp_path)
    assert (str(preprocess.dataset_dir), preprocess.out, params.preprocess.size) == (
        "data/suites/tiny/a/clean",
        Path("data/suites/tiny/a/preprocessed"),
        IMAGE_SIZE,
    )
    negatives, params = resolved(per_dataset["negatives"], tmp_path)
    assert (params.negatives.strategies, params.negatives.per_image, params.model.source) == ("absent", 30, "tiny")
    assert negatives.out == Path("data/suites/tiny/a/negatives.json")
    train, params = resolved(per_run["train"], tmp_path)
    assert train.run_dir == Path("runs/tiny/a/seed30") and train.negatives == "data/suites/tiny/a/negatives.json"
    assert train.overrides == ["train.max_steps=3", "train.seed=30"]  # the seed is applied last
    assert (params.train.seed, params.train.max_steps) == (30, 3)
    assert train.train_annotations == ANNOTATIONS_FILE
    # the feature cache: one per dataset, shared by the seeds, built with train's params file and overrides
    cache, params = resolved(suite_path.cache_command(plan, 30, "params.yaml", overrides), tmp_path)
    assert (str(cache.dataset), cache.out, cache.params) == (
        "data/suites/tiny/a/preprocessed",
        Path("data/suites/tiny/a/features"),
        str(tmp_path / "params.yaml"),
    )
    assert cache.overrides == ["train.max_steps=3"] and cache.negatives == Path("data/suites/tiny/a/negatives.json")
    assert cache.train_annotations == ANNOTATIONS_FILE
    assert train.feature_cache == "data/suites/tiny/a/features" == plan.layout(300).features
    evaluate, params = resolved(per_run["evaluate"], tmp_path)
    assert evaluate.model == "runs/tiny/a/seed30/model"
    assert evaluate.out == Path("reports/tiny/a/seed30/metrics.json")
    assert evaluate.gt_original == Path("data/suites/tiny/a/clean")  # its test split's file, before preprocessing
    assert params.evaluate.baseline == "tiny"
    assert resolved(no_baseline["evaluate"], tmp_path)[1].evaluate.baseline is None


def test_odinw13_validate_completes_the_seeds_fewshot_files_and_train_reads_its_seeds(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml")
    plan = DatasetPlan("Aquarium", "raw/Aquarium", "odinw13")
    _, params = resolved(suite_path.dataset_commands(plan, [3, 30], "params.yaml", [])["validate"], tmp_path)
    assert (params.validate.fewshot_k, params.validate.fewshot_seeds) == (10, [3, 30])
    for seed in (3, 30):
        train = parsed(suite_path.run_commands(plan, seed, "params.yaml", [], with_baseline=False)["train"])
        assert train.train_annotations == f"fewshot_train_shot10_seed{seed}.json"
        assert train.run_dir == Path(f"runs/odinw13/Aquarium/seed{seed}")
        # a cache is keyed by its annotation file: one per seed, built on the seed's few-shot file as train reads it
        cache = parsed(suite_path.cache_command(plan, seed, "params.yaml", []))
        assert cache.train_annotations == train.train_annotations
        assert str(cache.out) == train.feature_cache == f"data/suites/odinw13/Aquarium/features/seed{seed}"


def test_the_dvc_path_runs_cache_features_between_negatives_and_train_in_dvc_yaml_order() -> None:
    assert [task.name for task in tasks.DVC_STAGE_TASKS] == list(tasks.DVC_STAGES)
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    assert [s for s in stages if s in tasks.DVC_STAGES] == [s for s in tasks.DVC_STAGES if s in stages]
    assert tasks.DVC_STAGES.index("negatives") + 1 == tasks.DVC_STAGES.index("cache_features")
    assert tasks.DVC_STAGES.index("cache_features") + 1 == tasks.DVC_STAGES.index("train")
    assert tasks.TRAIN_TAG in tasks.cache_features.tags  # the accelerators: one job at a time with the trainings


def test_plan_suite_rejects_clashing_names_and_bad_suite_names() -> None:
    assert suite_path.plan_suite("s", ["x/a", "y/b"])[1] == DatasetPlan("b", "y/b", "s")
    with pytest.raises(ConfigError, match=r"datasets \['a'\] appear twice"):
        suite_path.plan_suite("s", ["x/a", "y/a"])
    with pytest.raises(ConfigError, match="suite '../up'"):
        suite_path.plan_suite("../up", ["x/a"])


def test_find_datasets_under_a_root_leaves_out_and_names_folders_without_splits(tmp_path: Path) -> None:
    shapes_datasets(tmp_path / "root", ["b", "a"])
    (tmp_path / "root" / "notes").mkdir()
    assert suite_path.find_datasets(tmp_path, None, "root") == (["root/a", "root/b"], ["notes"])
    with pytest.raises(DataError, match="no split found"):
        suite_path.find_datasets(tmp_path, ["root/notes"], None)


def test_dvc_locked_model_reads_the_train_stage_model_out(tmp_path: Path) -> None:
    lock = {
        "schema": "2.0",
        "stages": {
            "train": {
                "outs": [
                    {"path": "runs/demo/checkpoints", "md5": "c.dir"},
                    {"path": "runs/demo/model", "md5": "m.dir"},
                ]
            }
        },
    }
    assert dvc_path.dvc_locked_model(tmp_path) is None
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    assert dvc_path.dvc_locked_model(tmp_path) == ("runs/demo/model", "m.dir")


def test_the_vos_runs_of_a_suite_are_the_datasets_its_params_list(tmp_path: Path) -> None:
    """One row per dataset of the matrix, at the stages' paths; a listed dataset without results has no summary yet,
    and an earlier run's summary of a dataset no longer listed is not read."""
    suite = tmp_path / "suites" / "mose"
    suite.mkdir(parents=True)
    (suite / "params.yaml").write_text(yaml.safe_dump({"mose": {"root": "data/raw", "datasets": ["a", "b"]}}))
    for name in ("a", "gone"):
        (tmp_path / "reports" / "mose" / name).mkdir(parents=True)
        (tmp_path / "reports" / "mose" / name / "vos_summary.json").write_text('{"J&F": 0.5}')
    runs = dvc_path._vos_runs(tmp_path, "suites/mose/dvc.yaml")
    assert [(name, layout.summary, layout.model) for name, layout in runs] == [
        ("a", "reports/mose/a/vos_summary.json", "runs/mose/a/model"),
        ("b", "reports/mose/b/vos_summary.json", "runs/mose/b/model"),
    ]
    (suite / "params.yaml").write_text(yaml.safe_dump({"mose": {"root": "data/raw", "datasets": []}}))
    assert dvc_path._vos_runs(tmp_path, "suites/mose/dvc.yaml") == []


def test_metrics_markdown_lists_runs_and_the_mean_of_defined_values() -> None:
    rows = [
        MetricRow("a", 0, 0.5, "runs/s/a/seed0/metrics.json", "m"),
        MetricRow("a", 1, 0.25, "runs/s/a/seed1/metrics.json", "m"),
        MetricRow("b", 0, None, "runs/s/b/seed0/metrics.json", "m"),
    ]
    text = report.metrics_markdown("t", "bbox_AP", rows, ["stage x skipped"])
    assert "| a | 1 | 0.2500 | runs/s/a/seed1/metrics.json |" in text
    assert "| b | 0 | n/a |" in text
    assert "Mean bbox_AP over 2 of 3 runs: 0.3750" in text  # (0.5 + 0.25) / 2
    assert text.endswith("- stage x skipped\n")


def test_summarise_suite_adds_the_odinw13_summary_over_seeds(tmp_path: Path) -> None:
    plans = suite_path.plan_suite("odinw13", ["raw/Aquarium", "raw/Raccoon", "raw/pothole"])
    values = {("Aquarium", 3): 0.6, ("Aquarium", 30): 0.4, ("Raccoon", 3): 0.2, ("Raccoon", 30): 0.0}
    for (name, seed), value in values.items():  # pothole has no run
        path = tmp_path / "reports/odinw13" / name / f"seed{seed}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"bbox_AP": value}), encoding="utf-8")

    rows, notes = suite_path.summarise_suite.fn(str(tmp_path), "odinw13", plans, [3, 30], "bbox_AP")
    assert [(r.dataset, r.seed, r.value) for r in rows] == [
        ("Aquarium", 3, 0.6), ("Aquarium", 30, 0.4), ("Raccoon", 3, 0.2), ("Raccoon", 30, 0.0),
        ("pothole", 3, None), ("pothole", 30, None),
    ]  # fmt: skip
    assert notes == ["no metrics file: pothole seed 3, pothole seed 30"]
    summary = json.loads((tmp_path / "reports/odinw13/summary.json").read_text())["odinw13"]
    # seed 3: (0.6 + 0.2) / 2 = 0.4; seed 30: (0.4 + 0.0) / 2 = 0.2; mean 0.3; sample std sqrt(2 * 0.1^2 / 1) = 0.1414
    assert summary["seeds"]["3"]["mean"] == pytest.approx(0.4) and summary["seeds"]["30"]["mean"] == pytest.approx(0.2)
    assert summary["mean"] == pytest.approx(0.3) and summary["std"] == pytest.approx(math.sqrt(0.02))
    markdown = (tmp_path / "reports/odinw13/summary.md").read_text()
    assert "| pothole | 3 | n/a |" in markdown and "# ODinW13: bbox_AP (x100)" in markdown


# --- running commands -----------------------------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_run_command_logs_every_line_and_runs_the_venv_python(tmp_path: Path) -> None:
    logger = logging.getLogger("test_flows.run_command")
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    script = "import shutil, sys; print(shutil.which('python')); print('err', file=sys.stderr)"
    commands.run_command([sys.executable, "-c", script], tmp_path, logger)
    assert handler.lines[1:] == [str(Path(sys.executable).parent / "python"), "err"]  # stage PATH: venv first

    with pytest.raises(StageFailed) as failure:
        commands.run_command(
            [sys.executable, "-c", "print('error: bad.json: no images'); raise SystemExit(2)"], tmp_path, logger
        )
    assert failure.value.returncode == 2 and failure.value.tail == ["error: bad.json: no images"]
    assert failure.value.user_error


def retry_probe_command(counter: Path, fail_times: int, message: str) -> list[str]:
    """A command that counts its attempts in `counter` and fails (printing `message`) its first `fail_times`."""
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x' * (n + 1)); "
        "sys.exit(0) if n >= int(sys.argv[2]) else (print(sys.argv[3]), sys.exit(1))"
    )
    return [sys.executable, "-c", script, str(counter), str(fail_times), message]


@pytest.mark.slow
def test_io_stages_retry_transient_failures_but_not_user_errors(tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    quick = tasks.validate.with_options(retry_delay_seconds=0)  # the task's retries and condition, no waiting

    @flow
    def probe() -> tuple:
        transient = quick(retry_probe_command(tmp_path / "t", 2, "disk hiccup"), str(tmp_path), "t", return_state=True)
        user = quick(
            retry_probe_command(tmp_path / "u", 9, "error: x.json: bad"), str(tmp_path), "u", return_state=True
        )
        return transient, user

    with prefect_test_harness():
        transient, user = probe()
    assert tasks.validate.retries == 2
    assert transient.is_completed() and (tmp_path / "t").read_text() == "xxx"  # failed twice, third try succeeded
    assert user.is_failed() and (tmp_path / "u").read_text() == "x"  # "error: ..." from the CLI: tried once


# --- deployments ----------------------------------------------------------------------------------------------------


def test_deployments_are_the_six_with_a_timezoned_cron_on_retrain() -> None:
    deployments = {d.name: d for d in flows_flow.deployments()}
    assert list(deployments) == ["demo", "rf100", "odinw13", "vos", "mose", "retrain"]
    # the video deployments run the VOS stages of a dvc.yaml through DVC, judged on J&F
    assert deployments["mose"].parameters == {"suite": "mose", "vos_dvc_file": "suites/mose/dvc.yaml", "metric": "J&F"}
    assert deployments["vos"].parameters == {"suite": "vos", "vos_dvc_file": "dvc.yaml", "metric": "J&F"}
    assert {d.flow_name for d in deployments.values()} == {"finetune"}
    retrain = deployments["retrain"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [("0 3 * * 1", "Europe/Paris")]
    assert retrain.parameters == {"suite": "retrain", "promote": True}
    assert deployments["odinw13"].parameters["seeds"] == [3, 30, 300]
    assert all(not d.schedules for name, d in deployments.items() if name != "retrain")
    assert all(d.paused is False for d in deployments.values())  # serving again resumes a paused schedule


# --- the flow on a suite --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_suite_of_3_datasets_x_2_seeds(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    names = ["alpha", "beta", "gamma"]
    shapes_datasets(tmp_path / "raw", names)
    write_params(tmp_path / "params.yaml")  # cache.enabled false: the overrides turn it on for this suite
    with prefect_test_harness(server_startup_timeout=120):
        state = flows_flow.finetune(
            suite="tiny",
            datasets=[f"raw/{name}" for name in names],
            seeds=[0, 1],
            overrides=["train.max_steps=3", "cache.enabled=true", "train.freeze=vision"],
            repo=str(tmp_path),
            return_state=True,
        )
        assert state.is_completed(), state.message
        result = state.result()
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifacts = {
                a.key: a
                for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        key=ArtifactFilterKey(any_=["finetune-tiny-metrics", "finetune-tiny-summary"])
                    )
                )
            }
            limit = client.read_global_concurrency_limit_by_name("tag:train")
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    # one row per dataset and seed, each the value its metrics file holds
    rows = result["rows"]
    assert [(r["dataset"], r["seed"]) for r in rows] == [(n, s) for n in names for s in (0, 1)]
    for row in rows:
        metrics = json.loads((tmp_path / row["metrics_file"]).read_text())
        assert row["value"] == metrics["bbox_AP"] and 0.0 <= row["value"] <= 1.0
        assert (tmp_path / row["model"] / "config.json").is_file()
        params = yaml.safe_load((tmp_path / row["model"]).parent.joinpath("params.yaml").read_text())
        assert (params["train"]["seed"], params["train"]["max_steps"]) == (row["seed"], 3)
        assert params["cache"]["enabled"]  # so train read the features (it stops when it has no cache to read)
    assert json.loads(artifacts["finetune-tiny-metrics"].data) == rows
    summary = artifacts["finetune-tiny-summary"].data
    for row in rows:
        assert f"| {row['dataset']} | {row['seed']} | {row['value']:.4f} | {row['metrics_file']} |" in summary
    assert json.loads((tmp_path / "reports/tiny/summary.json").read_text())["runs"] == rows

    # one feature cache per dataset, built from the overrides (cache on) on all 4 training images, shared by the seeds
    caches = sorted(t.name for t in task_runs if t.name.startswith("cache_features "))
    assert caches == [f"cache_features {name}" for name in names]
    for name in names:
        manifest = json.loads((tmp_path / f"data/suites/tiny/{name}/features/manifest.json").read_text())
        assert manifest["enabled"] and len(manifest["splits"]["train"]) == 4

    # the "train" tag's limit: created at 1, and no two accelerator jobs (cache builds, trainings) overlapped
    assert limit.limit == 1
    trainings = [t for t in task_runs if t.name.startswith("train ")]
    assert len(trainings) == 6 and all(t.state.is_completed() for t in trainings)
    on_accelerators = [t for t in task_runs if t.name.split()[0] in ("train", "cache_features")]
    jobs = sorted(on_accelerators, key=lambda t: t.start_time)
    assert all(later.start_time >= earlier.end_time for earlier, later in itertools.pairwise(jobs))


@pytest.mark.slow
def test_a_broken_dataset_fails_the_flow_naming_its_stages_without_retrying(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    shapes_datasets(tmp_path / "raw", ["broken"])
    (tmp_path / "raw/broken/train/_annotations.coco.json").write_text("{not json", encoding="utf-8")
    write_params(tmp_path / "params.yaml")
    with prefect_test_harness(server_startup_timeout=120):
        state = flows_flow.finetune(
            suite="bad", datasets=["raw/broken"], seeds=[0], repo=str(tmp_path), return_state=True
        )
        with get_client(sync_client=True) as client:
            table = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-bad-metrics"]))
            )
            flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            task_runs = {t.name: t for t in client.read_task_runs(flow_run_filter=flow_run)}

    assert state.is_failed()
    assert state.message.endswith(
        "6 stage runs did not complete: validate broken, preprocess broken, negatives broken, cache_features broken, "
        "train broken seed 0, evaluate broken seed 0"
    )
    assert task_runs["validate broken"].run_count == 1  # the CLI said "error: ...": the data is wrong, no retry
    assert task_runs["train broken seed 0"].state.name == "NotReady"  # never started
    assert json.loads(table[0].data) == [
        {
            "dataset": "broken",
            "seed": 0,
            "value": None,
            "metrics_file": "reports/bad/broken/seed0/metrics.json",
            "model": "runs/bad/broken/seed0/model",
        }
    ]
