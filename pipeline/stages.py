"""The single source of every stage's command line, for DVC (`dvc.yaml`, the suites) and for Prefect.

The stage contract (`pipeline.stage_args`): a stage command takes its paths, plus `--params FILE [--set K=V ...]`,
and reads its own sections of the params. So a command line holds paths and overrides only, and where a dataset's
files live is all that differs between the root pipeline, the DVC suites and the Prefect suite path. A `Layout`
says where; each function below turns a layout into one stage's command:

    check           raw + params -> reports/check.json (read only; every other dataset stage depends on it)
    validate        raw         -> clean/ + reports/validate.json
    preprocess      clean       -> preprocessed/
    negatives       preprocessed -> negatives.json
    cache_features  preprocessed + negatives.json -> features/
    train           preprocessed + negatives.json + features/ -> run/{model,checkpoints,...}
    evaluate        run/model + preprocessed + clean (+ run/train_stats.jsonl) ->
                    results/{metrics.json,predictions.json,report.md,plots/} + the run's summary.json
    aggregate       reports/<suite>/ -> reports/<suite>.{json,md}

`pipeline.dvc_yaml` renders the committed dvc.yaml files from these (with `${...}` paths, which DVC fills in) and a
test checks that they agree; `pipeline.flows` runs the same functions with concrete paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.aggregate import METRICS_FILE
from pipeline.evaluate import PER_CATEGORY_PLOT, PR_CURVE_PLOT, PREDICTIONS_FILE
from pipeline.plots import MOSAIC_PNG, PER_CATEGORY_PNG, PR_CURVE_PNG, TRAINING_PNG
from pipeline.train import PLOTS_FOLDER as RUN_PLOTS
from sam3.config import TRAIN_STATS_FILE

PIPELINE = ("python", "-m", "pipeline")  # the Prefect flow swaps "python" for its own interpreter
MODEL_FOLDER = "model"  # sam3.trainer.train exports the fine-tuned model to <run dir>/model
VALIDATE_REPORT = "validate.json"
PLOTS_FOLDER = "plots"
PLOT_FILES = (PER_CATEGORY_PLOT, PR_CURVE_PLOT)  # evaluate's plot data, in PLOTS_FOLDER
PLOT_IMAGES = (PR_CURVE_PNG, PER_CATEGORY_PNG, MOSAIC_PNG)  # evaluate's figures, in PLOTS_FOLDER
TRAINING_PLOT = f"{RUN_PLOTS}/{TRAINING_PNG}"  # train's figure, in the run folder
CHECK_FILE = "check.json"
SUMMARY_FILE = "summary.json"
NO_BASELINE = "evaluate.baseline=null"  # the `--set` that skips the baseline evaluation


@dataclass(frozen=True)
class Layout:
    """Where one dataset's stages (and one seed's run) read and write, as paths relative to the repository root
    (or DVC templates such as `data/clean/${dataset.name}`)."""

    raw: str  # the dataset as given (Roboflow COCO layout)
    clean: str  # validate's clean copy (and _quarantine/)
    preprocessed: str
    negatives: str  # the negatives file
    features: str  # the feature cache folder this run reads
    run: str  # the training run folder
    reports: str  # validate.json's folder
    results: str  # evaluate's folder: metrics.json, predictions.json, report.md, plots/
    summary: str  # the run's headline metrics (DVC metrics): a path without the dataset's name in the root pipeline
    train_annotations: str | None = None  # a file of the train split to train on (few-shot), else the split's own

    @property
    def model(self) -> str:
        return f"{self.run}/{MODEL_FOLDER}"


def root_layout(name: str = "${dataset.name}", raw: str = "${dataset.raw}") -> Layout:
    """The root pipeline's layout (dvc.yaml over params.yaml's dataset)."""
    return Layout(
        raw=raw,
        clean=f"data/clean/{name}",
        preprocessed=f"data/preprocessed/{name}",
        negatives=f"data/negatives/{name}.json",
        features=f"data/features/{name}",
        run=f"runs/{name}",
        reports=f"reports/{name}",
        results=f"reports/{name}",
        summary=f"reports/{SUMMARY_FILE}",  # one run per workspace: `dvc metrics diff` compares any two
    )


def suite_layout(
    suite: str, name: str, raw: str, seed: str | int | None = None, train_annotations: str | None = None
) -> Layout:
    """A suite dataset's layout: data/suites/<suite>/<name>/{clean,preprocessed,negatives.json,features},
    runs/<suite>/<name>[/seed<seed>], reports/<suite>/<name>[/seed<seed>]. With `train_annotations` (a few-shot
    suite) the feature cache is per seed too, as a cache is keyed by the annotation file it was built on."""
    data = f"data/suites/{suite}/{name}"
    per_seed = "" if seed is None else f"/seed{seed}"
    return Layout(
        raw=raw,
        clean=f"{data}/clean",
        preprocessed=f"{data}/preprocessed",
        negatives=f"{data}/negatives.json",
        features=f"{data}/features" + (per_seed if train_annotations else ""),
        run=f"runs/{suite}/{name}{per_seed}",
        reports=f"reports/{suite}/{name}",
        results=f"reports/{suite}/{name}{per_seed}",
        summary=f"reports/{suite}/{name}{per_seed}/{SUMMARY_FILE}",
        train_annotations=train_annotations,
    )


def _params(params_file: str, sets: list[str]) -> list[str]:
    return ["--params", params_file, *(["--set", *sets] if sets else [])]


def _train_file(layout: Layout) -> list[str]:
    return ["--train-annotations", layout.train_annotations] if layout.train_annotations else []


def check(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    """Reads the params and the inputs only; fails before any stage replaces an output."""
    return [
        *PIPELINE, "check", "--dataset", layout.raw, "--out", f"{layout.reports}/{CHECK_FILE}",
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def validate(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "validate", layout.raw, "--out", layout.clean,
        "--report", f"{layout.reports}/{VALIDATE_REPORT}", *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def preprocess(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "preprocess", layout.clean, "--out", layout.preprocessed, *_params(params_file, list(sets)), *extra
    ]  # fmt: skip


def negatives(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "negatives", layout.preprocessed, "--out", layout.negatives, *_params(params_file, list(sets)),
        *extra,
    ]  # fmt: skip


def cache_features(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    """The cache the run reads, built with the run's own params and overrides (a model or cache setting among them
    reaches the cache; with cache.enabled false it writes only an "off" manifest)."""
    return [
        *PIPELINE, "cache-features", layout.preprocessed, "--out", layout.features, "--negatives", layout.negatives,
        *_train_file(layout), *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def train(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "train", "--run-dir", layout.run, "--dataset", layout.preprocessed, *_train_file(layout),
        "--negatives", layout.negatives, "--feature-cache", layout.features, *_params(params_file, list(sets)),
        *extra,
    ]  # fmt: skip


def evaluate(layout: Layout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    """Scored against the clean copy's split (exact masks, from before preprocessing)."""
    return [
        *PIPELINE, "evaluate", "--model", layout.model, "--dataset", layout.preprocessed,
        "--gt-original", layout.clean, "--out", f"{layout.results}/{METRICS_FILE}",
        "--predictions", f"{layout.results}/{PREDICTIONS_FILE}", "--plots-dir", f"{layout.results}/{PLOTS_FOLDER}",
        "--summary", layout.summary, "--train-stats", f"{layout.run}/{TRAIN_STATS_FILE}",
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def aggregate(suite: str, extra: list[str] = ()) -> list[str]:
    """The suite table over every run's metrics.json under reports/<suite>/ (reads no parameter)."""
    return [
        *PIPELINE, "aggregate", "--suite", suite, "--results", f"reports/{suite}",
        "--out-json", f"reports/{suite}.json", "--out-md", f"reports/{suite}.md", *extra,
    ]  # fmt: skip


DEMO_IMAGES = 400  # training images of the demo's shapes (and 80 valid, 80 test)


def demo_data(out: str = "data/raw/demo") -> list[str]:
    """The demo dataset: generated shapes ("red circle", ...), where the tiny model learns in minutes on a CPU."""
    return [*PIPELINE, "shapes-data", "--out", out, "--n", str(DEMO_IMAGES), "--seed", "0"]


# ---- video object segmentation (VOS): vos_data -> vos_validate -> vos_preprocess -> vos_train -> vos_evaluate ----

VOS_SUMMARY_FILE = "vos_summary.json"
VOS_CHECK_FILE = "vos_check.json"
VOS_RESULTS = "vos"  # vos-evaluate's folder inside the dataset's reports folder
VOS_DEMO_ARGS = ("--train-videos", "24", "--valid-videos", "8", "--frames", "16", "--size", "128", "--seed", "0")


@dataclass(frozen=True)
class VosLayout:
    """Where one VOS dataset's stages read and write (paths relative to the repository root, or DVC templates)."""

    raw: str  # MOSE-style root as given: train/ and valid/, each JPEGImages/ + Annotations/
    clean: str  # vos-validate's clean copy (and _quarantine/)
    preprocessed: str
    run: str
    reports: str  # validate.json's folder
    results: str  # vos-evaluate's folder: metrics.json, report.md, predictions/, plots/
    summary: str  # the headline numbers (DVC metrics)

    @property
    def model(self) -> str:
        return f"{self.run}/{MODEL_FOLDER}"


def vos_root_layout(name: str = "${vos.dataset.name}", raw: str = "${vos.dataset.raw}") -> VosLayout:
    """The root pipeline's VOS layout (dvc.yaml over params.yaml's vos.dataset)."""
    return VosLayout(
        raw=raw,
        clean=f"data/clean/{name}",
        preprocessed=f"data/preprocessed/{name}",
        run=f"runs/{name}",
        reports=f"reports/{name}",
        results=f"reports/{name}/{VOS_RESULTS}",
        summary=f"reports/{VOS_SUMMARY_FILE}",
    )


def vos_suite_layout(suite: str, name: str, raw: str) -> VosLayout:
    """A VOS suite dataset's layout (suites/mose): data/suites/<suite>/<name>/{clean,preprocessed},
    runs/<suite>/<name>, reports/<suite>/<name>/{validate.json,vos/,vos_summary.json}."""
    data = f"data/suites/{suite}/{name}"
    return VosLayout(
        raw=raw,
        clean=f"{data}/clean",
        preprocessed=f"{data}/preprocessed",
        run=f"runs/{suite}/{name}",
        reports=f"reports/{suite}/{name}",
        results=f"reports/{suite}/{name}/{VOS_RESULTS}",
        summary=f"reports/{suite}/{name}/{VOS_SUMMARY_FILE}",
    )


def vos_data(out: str = "data/raw/vos_shapes") -> list[str]:
    """The generated VOS dataset: moving, occluding, deforming shapes, where the tiny tracker learns on a CPU."""
    return [*PIPELINE, "vos-shapes-data", "--out", out, *VOS_DEMO_ARGS]


def vos_check(layout: VosLayout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    """Reads the params' vos: section and the dataset only; fails before any VOS stage replaces an output."""
    return [
        *PIPELINE, "check", "--vos", "--dataset", layout.raw, "--out", f"{layout.reports}/{VOS_CHECK_FILE}",
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def vos_validate(layout: VosLayout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "vos-validate", "--in", layout.raw, "--out", layout.clean,
        "--report", f"{layout.reports}/{VALIDATE_REPORT}", *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def vos_preprocess(layout: VosLayout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "vos-preprocess", "--in", layout.clean, "--out", layout.preprocessed,
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def vos_train(layout: VosLayout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "vos-train", "--run-dir", layout.run, "--dataset", layout.preprocessed,
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip


def vos_evaluate(layout: VosLayout, params_file: str, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [
        *PIPELINE, "vos-evaluate", "--model", layout.model, "--dataset", layout.preprocessed,
        "--out", layout.results, "--summary", layout.summary, "--train-stats", f"{layout.run}/{TRAIN_STATS_FILE}",
        *_params(params_file, list(sets)), *extra,
    ]  # fmt: skip
