"""`python -m pipeline dvc-yaml [--check]`: write dvc.yaml and suites/<suite>/dvc.yaml from `pipeline.stages`.

The three files are generated, never edited by hand: each stage's command comes from `pipeline.stages`, its params
from the sections the stage reads (`READS`), and its code dependencies from the import closure of the stage's module
(`pipeline.code_deps`), so that a change to any file a stage runs re-runs it. `--check` only compares and exits 1
naming the files that differ (tests/pipeline/test_stage_deps.py runs the same comparison).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import stages
from pipeline.aggregate import METRICS_FILE
from pipeline.code_deps import REPO_ROOT, code_closure
from pipeline.evaluate import PER_CATEGORY_PLOT, PR_CURVE_PLOT, PREDICTIONS_FILE, REPORT_FILE
from pipeline.stage_args import DEFAULT_PARAMS_FILE as PARAMS_FILE
from pipeline.stages import Layout
from pipeline.suites import FEWSHOT_SUITES
from sam3.io import write_text

SUITES = ("rf100vl", "odinw13")
# The stage module whose import closure is each stage's code, and the params.yaml sections / keys it reads.
MODULES = {
    "demo_data": "pipeline.shapes_data",
    "check": "pipeline.check",
    "validate": "pipeline.validate",
    "preprocess": "pipeline.preprocess",
    "negatives": "pipeline.negatives",
    "cache_features": "pipeline.cache_features",
    "train": "pipeline.train",
    "evaluate": "pipeline.evaluate",
    "aggregate": "pipeline.aggregate",
    "vos_data": "pipeline.vos_shapes",
    "vos_check": "pipeline.check",
    "vos_validate": "pipeline.vos_validate",
    "vos_preprocess": "pipeline.vos_preprocess",
    "vos_train": "pipeline.vos_train",
    "vos_evaluate": "pipeline.vos_evaluate",
}
READS = {
    # every section: check loads the whole file (and a misspelt key anywhere is its business)
    "check": [
        "dataset",
        "validate",
        "preprocess",
        "negatives",
        "model",
        "train",
        "optim",
        "loss",
        "guard",
        "ddp",
        "launcher",
        "evaluate",
        "cache",
        "adapter",
    ],  # fmt: skip
    "validate": ["validate"],
    "preprocess": ["preprocess"],
    "negatives": ["negatives", "model.source"],
    "cache_features": ["model", "cache", "train.freeze"],
    "train": ["model", "train", "cache", "optim", "loss", "guard", "ddp", "launcher", "adapter"],
    "evaluate": ["model.mode", "model.image_size", "evaluate"],
    "vos_check": ["vos"],  # the whole section, as check reads it all
    "vos_validate": ["validate.max_pixels"],
    "vos_preprocess": ["vos.preprocess"],
    "vos_train": ["vos.model", "vos.clip", "vos.prompts", "vos.loss", "vos.optim", "vos.train"],
    "vos_evaluate": ["vos.model", "vos.evaluate"],
}


@dataclass
class Stage:
    """One dvc.yaml stage before rendering."""

    name: str
    cmd: list[str]
    deps: list[str]  # data; the code deps are added from MODULES[name]
    outs: list[Any]
    params: list[Any] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    plots: list[Any] = field(default_factory=list)
    matrix: dict[str, str] | None = None
    comment: str = ""

    def body(self, wdir: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.matrix:
            body["matrix"] = dict(self.matrix)
        if wdir:
            body["wdir"] = wdir
        body["cmd"] = Folded(" ".join(self.cmd))
        body["deps"] = self.deps + code_closure(MODULES[self.name])
        if self.params:
            body["params"] = self.params
        body["outs"] = self.outs
        if self.metrics:
            body["metrics"] = self.metrics
        if self.plots:
            body["plots"] = self.plots
        return body


def _uncached(path: str) -> dict[str, Any]:
    return {path: {"cache": False}}


# DVC's built-in templates (`dvc plots templates`): bars for the categories, a line for the PR curve
_PLOT_SPECS = {
    PER_CATEGORY_PLOT: {"x": "AP", "y": "category", "template": "bar_horizontal_sorted"},
    PR_CURVE_PLOT: {"x": "recall", "y": "precision", "template": "linear"},
}


def _plots(results: str) -> list[Any]:
    """evaluate's plots: the JSON data with their templates, and the PNGs (shown as images, no renderer needed)."""
    folder = f"{results}/{stages.PLOTS_FOLDER}"
    data = [{f"{folder}/{name}": {"cache": False, **_PLOT_SPECS[name]}} for name in stages.PLOT_FILES]
    return data + [_uncached(f"{folder}/{name}") for name in stages.PLOT_IMAGES]


# The dataset stages' command builders, in pipeline order (READS lists what each reads).
COMMANDS = {
    "check": stages.check,
    "validate": stages.validate,
    "preprocess": stages.preprocess,
    "negatives": stages.negatives,
    "cache_features": stages.cache_features,
    "train": stages.train,
    "evaluate": stages.evaluate,
}


@dataclass(frozen=True)
class Variant:
    """What differs between the root pipeline's dataset stages and a suite's, per stage name."""

    extra: dict[str, list[str]] = field(default_factory=dict)  # arguments after the params (a suite's flags)
    sets: dict[str, list[str]] = field(default_factory=dict)  # `--set` items
    root_keys: dict[str, list[str]] = field(default_factory=dict)  # params.yaml keys that name its paths
    suite_file: str | None = None  # the suite's params file
    suite_keys: dict[str, list[str]] = field(default_factory=dict)  # keys of suite_file it reads


def dataset_stages(layout: Layout, variant: Variant) -> list[Stage]:
    """validate ... evaluate over one layout."""

    def params(name: str) -> list[Any]:
        listed: list[Any] = [*variant.root_keys.get(name, []), *READS[name]]
        suite_keys = variant.suite_keys.get(name)
        return listed + ([{variant.suite_file: suite_keys}] if suite_keys else [])

    command = {
        name: build(layout, PARAMS_FILE, variant.sets.get(name, []), variant.extra.get(name, []))
        for name, build in COMMANDS.items()
    }
    evaluate_outs: list[Any] = [
        f"{layout.results}/{PREDICTIONS_FILE}",
        _uncached(f"{layout.results}/{METRICS_FILE}"),  # every detail; not a DVC metric (the summary is)
        _uncached(f"{layout.results}/{REPORT_FILE}"),
    ]
    checked = f"{layout.reports}/{stages.CHECK_FILE}"
    return [
        Stage(
            "check", command["check"], [layout.raw], [_uncached(checked)], params("check"),
            comment="reads only: a misspelt key or a missing model/dataset stops the run before any output is replaced",
        ),
        Stage(
            "validate", command["validate"], [checked, layout.raw],
            [layout.clean, _uncached(f"{layout.reports}/{stages.VALIDATE_REPORT}")], params("validate"),
        ),
        Stage(
            "preprocess", command["preprocess"], [checked, layout.clean], [layout.preprocessed], params("preprocess")
        ),
        Stage(
            "negatives", command["negatives"], [checked, layout.preprocessed], [layout.negatives], params("negatives")
        ),
        Stage(
            "cache_features", command["cache_features"], [checked, layout.preprocessed, layout.negatives],
            [{layout.features: {"persist": True}}] if variant.suite_file else [layout.features],
            params("cache_features"),
            comment=CACHE_COMMENT,
        ),
        Stage(
            "train", command["train"], [checked, layout.preprocessed, layout.negatives, layout.features],
            [layout.model, f"{layout.run}/params.yaml"],
            params("train"),
            plots=[_uncached(f"{layout.run}/{stages.TRAINING_PLOT}")],
            comment="DVC versions the exported model, not the checkpoints: runs/<name>/checkpoints is no output (DVC "
            "would hash and copy every GB-sized checkpoint into its cache), so it stays between runs: an interrupted "
            "`dvc repro` resumes from the newest one, and a longer train.max_steps goes on from it. The logs "
            "(tensorboard/, train_stats.jsonl) are not outputs either: they hold timings, which differ from machine "
            "to machine",
        ),
        Stage(
            "evaluate", command["evaluate"],
            [checked, layout.model, layout.preprocessed, layout.clean],
            evaluate_outs, params("evaluate"),
            metrics=[_uncached(layout.summary)],
            plots=_plots(layout.results),
        ),
    ]  # fmt: skip


CACHE_COMMENT = (
    "cache.enabled false (the default): writes only a manifest saying the cache is off (no model, about a second), "
    "so train's input stays the same. true: the frozen encoders' outputs, which train then reads instead of pixels."
)


def root_document() -> tuple[str, dict[str, Stage]]:
    demo = Stage("demo_data", stages.demo_data(), [], ["data/raw/demo"])
    # the params that name a stage's paths (check reads the whole dataset section anyway)
    named_by = {name: ["dataset.name"] for name in COMMANDS if name != "check"}
    named_by["validate"] = ["dataset.raw", "dataset.name"]
    found = dataset_stages(stages.root_layout(), Variant(root_keys=named_by))
    vos_demo = Stage("vos_data", stages.vos_data(), [], ["data/raw/vos_shapes"])
    vos_named_by = {name: ["vos.dataset.name"] for name in VOS_COMMANDS}
    vos_named_by["vos_check"] = []  # it reads the whole vos section
    vos_named_by["vos_validate"] = ["vos.dataset.raw", "vos.dataset.name"]
    vos_found = vos_stages(stages.vos_root_layout(), vos_named_by)
    return ROOT_HEADER, {s.name: s for s in [demo, *found, vos_demo, *vos_found]}


VOS_COMMANDS = {
    "vos_check": stages.vos_check,
    "vos_validate": stages.vos_validate,
    "vos_preprocess": stages.vos_preprocess,
    "vos_train": stages.vos_train,
    "vos_evaluate": stages.vos_evaluate,
}


def vos_stages(
    layout: stages.VosLayout,
    root_keys: dict[str, list[str]],
    extra: dict[str, list[str]] | None = None,
    suite_file: str | None = None,
    suite_keys: dict[str, list[str]] | None = None,
) -> list[Stage]:
    """vos_check -> vos_validate -> vos_preprocess -> vos_train -> vos_evaluate over one VOS layout. `extra`:
    arguments after the params (a suite's flags); `suite_keys`: the keys of the suite's params file each reads."""
    extra, suite_keys = extra or {}, suite_keys or {}

    def params(name: str) -> list[Any]:
        listed: list[Any] = [*root_keys.get(name, []), *READS[name]]
        return listed + ([{suite_file: suite_keys[name]}] if suite_file and name in suite_keys else [])

    command = {name: build(layout, PARAMS_FILE, [], extra.get(name, [])) for name, build in VOS_COMMANDS.items()}
    plots = f"{layout.results}/{stages.PLOTS_FOLDER}"
    checked = f"{layout.reports}/{stages.VOS_CHECK_FILE}"
    return [
        Stage(
            "vos_check", command["vos_check"], [layout.raw], [_uncached(checked)], params("vos_check"),
            comment="reads only: a misspelt vos key, a missing tracker folder or dataset split stops the VOS stages "
            "before any output is replaced",
        ),
        Stage(
            "vos_validate", command["vos_validate"], [checked, layout.raw],
            [layout.clean, _uncached(f"{layout.reports}/{stages.VALIDATE_REPORT}")], params("vos_validate"),
            comment="VOS: bad videos (unreadable or missing frames, size mismatches, non-palette masks, empty) go to "
            "the clean copy's _quarantine/ with their reasons",
        ),
        Stage(
            "vos_preprocess", command["vos_preprocess"], [checked, layout.clean], [layout.preprocessed],
            params("vos_preprocess"),
        ),
        Stage(
            "vos_train", command["vos_train"], [checked, layout.preprocessed],
            [layout.model, f"{layout.run}/params.yaml"],
            params("vos_train"),
            comment="as train: the checkpoints (runs/<name>/checkpoints) and logs are no outputs, so an interrupted "
            "run resumes from the newest checkpoint",
        ),
        Stage(
            "vos_evaluate", command["vos_evaluate"], [checked, layout.model, layout.preprocessed],
            [
                f"{layout.results}/predictions", f"{layout.results}/baseline_predictions",
                _uncached(f"{layout.results}/metrics.json"), _uncached(f"{layout.results}/report.md"),
            ],
            params("vos_evaluate"),
            metrics=[_uncached(layout.summary)],
            plots=[_uncached(f"{plots}/per_video_jf.png"), _uncached(f"{plots}/strips")],
        ),
    ]  # fmt: skip


SUITE_KEY = "mose"


def mose_document() -> tuple[str, dict[str, Stage]]:
    """suites/mose/dvc.yaml: the VOS stages as a `matrix` over ${mose.datasets} (folders under ${mose.root}), with the
    recipe's settings (${mose.flags}). The list is empty in git: no stage (and a clean `dvc status`) until a user
    names a dataset."""
    layout = stages.vos_suite_layout(SUITE_KEY, "${item.dataset}", f"${{{SUITE_KEY}.root}}/${{item.dataset}}")
    flags = [f"${{{SUITE_KEY}.flags}}"]
    extra = {"vos_check": flags, "vos_preprocess": flags, "vos_train": flags, "vos_evaluate": flags}
    root, flags_key = f"{SUITE_KEY}.root", f"{SUITE_KEY}.flags"
    suite_keys = {name: [flags_key] for name in extra} | {"vos_check": [root, flags_key], "vos_validate": [root]}
    found = vos_stages(layout, {}, extra, f"suites/{SUITE_KEY}/{PARAMS_FILE}", suite_keys)
    for stage in found:
        stage.matrix = {"dataset": f"${{{SUITE_KEY}.datasets}}"}
    return MOSE_HEADER, {s.name: s for s in found}


def suite_document(suite: str) -> tuple[str, dict[str, Stage]]:
    """suites/<suite>/dvc.yaml: the dataset stages as a `matrix` over ${<suite>.datasets} (x seeds in a few-shot
    suite), then the aggregate stage."""
    fewshot = suite in FEWSHOT_SUITES
    item_seed = "${item.seed}" if fewshot else None
    k = f"${{{suite}.validate_flags.fewshot-k}}"
    train_file = f"fewshot_train_shot{k}_seed${{item.seed}}.json" if fewshot else None
    layout = stages.suite_layout(
        suite, "${item.dataset}", f"${{{suite}.root}}/${{item.dataset}}", item_seed, train_file
    )
    flags = {name: f"${{{suite}.{name}_flags}}" for name in ("validate", "train", "aggregate")}
    extra = {
        "validate": [flags["validate"]],
        "cache_features": [flags["train"]],
        "train": [flags["train"], *(["--set", "train.seed=${item.seed}"] if fewshot else [])],
    }
    suite_file = f"suites/{suite}/{PARAMS_FILE}"
    variant = Variant(
        extra=extra,
        sets={"evaluate": [stages.NO_BASELINE]},
        suite_file=suite_file,
        suite_keys={
            "validate": [f"{suite}.root", f"{suite}.validate_flags"],
            "cache_features": [f"{suite}.train_flags"],
            "train": [f"{suite}.train_flags"],
        },
    )
    per_dataset = {"dataset": f"${{{suite}.datasets}}"}
    per_run = {**per_dataset, "seed": f"${{{suite}.validate_flags.fewshot-seeds}}"} if fewshot else per_dataset
    found = dataset_stages(layout, variant)
    for stage in found:
        stage.matrix = per_run if stage.name in ("cache_features", "train", "evaluate") else per_dataset
    aggregate = Stage(
        "aggregate",
        stages.aggregate("${item.suite}", [flags["aggregate"]]),
        ["reports/${item.suite}"],
        [_uncached("reports/${item.suite}.md")],
        [{suite_file: [f"{suite}.aggregate_flags"]}],
        metrics=[_uncached("reports/${item.suite}.json")],
        matrix={"suite": f"${{{suite}.aggregate}}"},
        comment=f"one stage once datasets are listed ({suite}.aggregate: [{suite}]), none while the list is empty",
    )
    return SUITE_HEADERS[suite], {s.name: s for s in [*found, aggregate]}


class Folded(str):
    """A command line, written as a folded YAML block (`>-`) wrapped at the line width."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key, as people write dvc.yaml


_Dumper.add_representer(Folded, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style=">"))


def render(header: str, stage_map: dict[str, Stage], wdir: str | None = None, vars_file: str | None = None) -> str:
    """The dvc.yaml text: the header comment, optional `vars`, then each stage (its comment above it)."""
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    if vars_file:
        lines += ["vars:", f"  - {vars_file}", ""]
    lines.append("stages:")
    for stage in stage_map.values():
        text = yaml.dump({stage.name: stage.body(wdir)}, Dumper=_Dumper, sort_keys=False, width=116, indent=2)
        if stage.comment:
            lines += [f"  # {line}" for line in _wrap(stage.comment, 114)]
        lines += [f"  {line}" for line in text.rstrip().splitlines()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def documents() -> dict[Path, str]:
    """{path relative to the repository: the generated text} of every dvc.yaml."""
    header, root = root_document()
    files = {Path("dvc.yaml"): render(header, root)}
    for suite in SUITES:
        header, found = suite_document(suite)
        files[Path("suites") / suite / "dvc.yaml"] = render(header, found, wdir="../..", vars_file="../../params.yaml")
    header, found = mose_document()
    files[Path("suites") / SUITE_KEY / "dvc.yaml"] = render(header, found, wdir="../..", vars_file="../../params.yaml")
    return files


def stale_files(root: Path = REPO_ROOT) -> list[Path]:
    """The dvc.yaml files under `root` whose text differs from the generated one (or that are missing)."""
    return [
        path
        for path, text in documents().items()
        if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 naming the files that differ")


def run(args: argparse.Namespace) -> int:
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"{path} differs from `python -m pipeline dvc-yaml`'s output (regenerate it)")
        return 1 if stale else 0
    for path, text in documents().items():
        write_text(REPO_ROOT / path, text)
    print(f"wrote {', '.join(str(p) for p in documents())}" + (f" ({len(stale)} changed)" if stale else " (unchanged)"))
    return 0


ROOT_HEADER = """
Generated by `python -m pipeline dvc-yaml` from pipeline/stages.py: edit that, not this file.
The pipeline's stages over params.yaml's dataset: validate -> preprocess -> negatives -> cache_features -> train ->
evaluate (demo_data builds the demo dataset). Every stage command takes its paths plus `--params params.yaml` and
reads its own sections; `params` lists those sections, `deps` the data and every source file the stage imports
(its import closure), so a change to a parameter, the data or the code re-runs exactly the stages it affects.
"""

MOSE_HEADER = """
Generated by `python -m pipeline dvc-yaml` from pipeline/stages.py: edit that, not this file.
MOSE (or any MOSE-layout VOS dataset) as DVC stages: per dataset vos_check -> vos_validate -> vos_preprocess ->
vos_train -> vos_evaluate over ${mose.root}/<dataset> (train/ and valid/, each JPEGImages/ + Annotations/), with SAM
2.1's MOSE recipe as `--set` items over the root params.yaml's vos: section (${mose.flags} in suites/mose/params.yaml:
the model folder to start from, 1024 px, 40 epochs). ${mose.datasets} is empty in git (no stage); name the folders,
e.g. [mose]. MOSE's own valid split has first-frame masks only (its scores come from the challenge server): give a
root whose valid/ holds held-out videos with every frame annotated.
  dvc repro suites/mose/dvc.yaml
Commands run at the repository root (wdir).
"""

SUITE_HEADERS = {
    "rf100vl": """
Generated by `python -m pipeline dvc-yaml` from pipeline/stages.py: edit that, not this file.
RF100-VL as DVC stages: per dataset validate -> preprocess -> negatives -> cache_features -> train -> evaluate, then
the aggregate table (mean over datasets and per domain). train_flags (suites/rf100vl/params.yaml) hold the recipe's
settings as `--set` items, among them the seeded 100-image subset (train.subset_images); the cache covers every
training image, so one cache serves any subset and seed.
  python -m pipeline fetch rf100vl --root data/raw/rf100vl          # downloads it (rf100vl package + API key)
  python -m pipeline suite-params rf100vl --root data/raw/rf100vl   # lists the datasets found in params.yaml here
  dvc repro suites/rf100vl/dvc.yaml
Values: ${rf100vl.*} from params.yaml in this folder (empty lists in git: no stage at all), the rest from the root
params.yaml. Commands run at the repository root (wdir). The baseline model is not evaluated here.
""",
    "odinw13": """
Generated by `python -m pipeline dvc-yaml` from pipeline/stages.py: edit that, not this file.
ODinW13 10-shot as DVC stages: per dataset validate -> preprocess -> negatives, per dataset x seed cache_features ->
train (both on the seed's few-shot file, train.seed = the seed) -> evaluate, then the aggregate table (mean per
seed, mean and spread over seeds). validate_flags name the few-shot files to check and carry along, drawn when the
dataset lacks them.
  python -m pipeline suite-params odinw13 --root data/raw/odinw13   # lists the datasets found in params.yaml here
  dvc repro suites/odinw13/dvc.yaml
Values: ${odinw13.*} from params.yaml in this folder (empty lists in git: no stage at all), the rest from the root
params.yaml. Commands run at the repository root (wdir). The baseline model is not evaluated here.
""",
}
