"""Stage `suite-params`: list the datasets of a benchmark suite found on disk in its DVC params file.

    python -m pipeline suite-params rf100vl|odinw13 --root DIR [--domains FILE] [--params params.yaml]

`suites/<suite>/dvc.yaml` runs validate -> preprocess -> negatives -> train -> evaluate as DVC `matrix` stages over
the datasets of `suites/<suite>/params.yaml` (ODinW13: datasets x seeds), then an aggregate stage. That file keeps
every list empty in git, so that a machine without the suite's data has no suite stage at all (`dvc status` and the
root `dvc repro` stay clean); this command fills it from what is on disk:

    root       DIR as given (relative to the repository when inside it)
    datasets   every folder DIR/<name> in the Roboflow layout with the splits training and evaluation read
               (train/ and params.yaml's evaluate.split, with _annotations.coco.json), sorted; folders without them,
               and names a shell command would split, are left out and listed with the reason
    aggregate  [<suite>] when datasets is not empty, else []: the aggregate stage is a matrix over this list, so it
               exists only when there is something to aggregate
The other keys (validate_flags, train_flags, aggregate_flags) are kept as the file has them; `--domains FILE` sets
RF100-VL's aggregate_flags to {domains: FILE} (the domain list when the rf100vl package is not installed).
The file is written whole from `render`, so it always has the same layout and comments.

ODinW13 trains seed S on `fewshot_train_shot{K}_seed{S}.json` of the dataset's train folder. Files the dataset has
are used as they are; the validate stage draws the missing ones from the clean train split (`--fewshot-seeds`,
GLIP-style) and says so. This command lists, per dataset, which are found and which validate will draw.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.fewshot import FEWSHOT_SPLIT, fewshot_file_name
from pipeline.params import read_yaml
from pipeline.suites import ODINW13_DATASETS, ODINW13_SEEDS, ODINW13_SHOTS, rf100vl_domains
from sam3.coco import ANNOTATIONS_FILE, split_annotation_path
from sam3.errors import ConfigError, DataError
from sam3.io import write_text

SUITES_DIR = Path("suites")  # suites/<suite>/{dvc.yaml,params.yaml}, relative to the repository
SUITE_NAMES: tuple[str, ...] = ("rf100vl", "odinw13")
# A name that goes into stage commands unquoted (DVC interpolates `${...}` as text): no spaces or shell characters.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SAFE_PATH = re.compile(r"[A-Za-z0-9_./-]+")
SAFE_FLAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # an option name: `--<name>`
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:/=+@%\[\]-]+")  # an option value, e.g. train.max_steps=null
# The recipe's settings per suite over params.yaml (docs/RECIPE.md sections 4-5): epochs decide (max_steps off), the
# IABCE pos_weight, and RF100-VL's seeded subset of 100 training images. The Prefect deployments use them too.
RF100VL_RECIPE: tuple[str, ...] = (
    "train.max_steps=null",
    "train.epochs=20",
    "train.subset_images=100",
    "loss.pos_weight=10.0",
)
ODINW13_RECIPE: tuple[str, ...] = ("train.max_steps=null", "train.epochs=40", "loss.pos_weight=5.0")
FEWSHOT_K_FLAG, FEWSHOT_SEEDS_FLAG = "fewshot-k", "fewshot-seeds"  # validate's options, as validate_flags keys


@dataclass
class SuiteParams:
    """One suite's section of suites/<suite>/params.yaml. The *_flags mappings become stage options through DVC's
    dictionary unpacking ({set: [a, b]} -> `--set a b`; {fewshot-k: 10} -> `--fewshot-k 10`)."""

    root: str
    datasets: list[str] = field(default_factory=list)
    aggregate: list[str] = field(default_factory=list)
    validate_flags: dict[str, Any] = field(default_factory=dict)
    train_flags: dict[str, Any] = field(default_factory=dict)
    aggregate_flags: dict[str, Any] = field(default_factory=dict)

    def seeds(self) -> list[int]:
        """The few-shot seeds (ODinW13), [] when the suite has none."""
        return list(self.validate_flags.get(FEWSHOT_SEEDS_FLAG, []))


def default_params(suite: str) -> SuiteParams:
    """What git holds: no dataset, the recipe's settings."""
    if suite == "rf100vl":
        return SuiteParams(root="data/raw/rf100vl", train_flags={"set": list(RF100VL_RECIPE)})
    if suite == "odinw13":
        fewshot = {FEWSHOT_K_FLAG: ODINW13_SHOTS, FEWSHOT_SEEDS_FLAG: list(ODINW13_SEEDS)}
        return SuiteParams(root="data/raw/odinw13", validate_flags=fewshot, train_flags={"set": list(ODINW13_RECIPE)})
    raise ConfigError(f"unknown suite {suite!r}; choose one of {', '.join(SUITE_NAMES)}")


def params_path(suite: str, repo: Path = Path(".")) -> Path:
    return repo / SUITES_DIR / suite / "params.yaml"


# -------------------------------------------------------------------------------------------------- the file

_COMMENTS = {
    "root": "the suite's dataset folders, Roboflow layout: <root>/<dataset>/{{train,valid,test}}/",
    "datasets": "the matrix: one validate ... evaluate chain per dataset (empty: no suite stage)",
    "aggregate": "[{suite}] when datasets is not empty: the aggregate stage exists only then",
    "validate_flags": "validate options (ODinW13: the few-shot files to complete, drawn when missing)",
    "train_flags": "train options: the recipe's settings over params.yaml (`--set`, docs/RECIPE.md section 4-5)",
    "aggregate_flags": "aggregate options (RF100-VL: {{domains: FILE}} without the rf100vl package)",
}


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def render(suite: str, params: SuiteParams) -> str:
    """The whole params file: a header, then `<suite>:` with each key and its comment; mappings one key a line."""
    lines = [
        f"# Suite {suite}: `dvc repro suites/{suite}/dvc.yaml` runs the stages of suites/{suite}/dvc.yaml over these",
        "# datasets; every other parameter comes from the root params.yaml. Written by",
        f"# `python -m pipeline suite-params {suite} --root DIR`, which lists the datasets found under DIR and keeps",
        "# the other values as they are here.",
        f"{suite}:",
    ]
    for key, value in asdict(params).items():
        if isinstance(value, dict) and value:
            lines.append(f"  {key}:  # {_COMMENTS[key].format(suite=suite)}")
            lines += [f"    {name}: {_flow(item)}" for name, item in value.items()]
        else:
            lines.append(f"  {key}: {_flow(value)}  # {_COMMENTS[key].format(suite=suite)}")
    return "\n".join(lines) + "\n"


def _check(suite: str, params: SuiteParams, where: str) -> SuiteParams:
    """ConfigError naming the key when a value has the wrong type or cannot go into a stage command."""
    if not isinstance(params.root, str) or not SAFE_PATH.fullmatch(params.root):
        raise ConfigError(f"{where}: {suite}.root = {params.root!r}: a path of letters, digits and _ . / - only")
    if not isinstance(params.datasets, list) or not all(
        isinstance(d, str) and SAFE_NAME.fullmatch(d) for d in params.datasets
    ):
        raise ConfigError(f"{where}: {suite}.datasets must be a list of folder names (letters, digits, _ . -)")
    if params.aggregate not in ([], [suite]):
        raise ConfigError(f"{where}: {suite}.aggregate must be [] or [{suite}], got {params.aggregate!r}")
    for key in ("validate_flags", "train_flags", "aggregate_flags"):
        flags = getattr(params, key)
        if not isinstance(flags, dict):
            raise ConfigError(f"{where}: {suite}.{key} must be a mapping of option name to value ({{}} for none)")
        for name, value in flags.items():
            values = value if isinstance(value, list) else [value]
            if not isinstance(name, str) or not SAFE_FLAG.fullmatch(name):
                raise ConfigError(f"{where}: {suite}.{key}: option name {name!r} (letters, digits, _ -)")
            if not all(isinstance(v, str | int | float) and SAFE_VALUE.fullmatch(str(v)) for v in values):
                raise ConfigError(
                    f"{where}: {suite}.{key}.{name} = {value!r}: values go into the stage command unquoted; use "
                    "numbers or text without spaces and shell characters"
                )
    seeds = params.seeds()
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: {suite}.validate_flags.{FEWSHOT_SEEDS_FLAG} must be a list of integers")
    missing = [f for f in default_params(suite).validate_flags if f not in params.validate_flags]
    if missing:  # dvc.yaml reads them (the seed matrix, the few-shot file name)
        raise ConfigError(f"{where}: {suite}.validate_flags needs {', '.join(missing)}")
    return params


def load(suite: str, path: Path) -> SuiteParams:
    """The suite's section of `path`; ConfigError for an unknown suite or key, a wrong type, invalid YAML."""
    if suite not in SUITE_NAMES:
        raise ConfigError(f"unknown suite {suite!r}; choose one of {', '.join(SUITE_NAMES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: suite params file not found; restore it (git checkout {path}) or write it anew")
    data = read_yaml(path)
    section = data.get(suite) if isinstance(data, dict) else None
    if not isinstance(section, dict) or set(data) != {suite}:
        raise ConfigError(f"{path}: expected one top-level key {suite!r} holding the suite's values")
    known = list(asdict(default_params(suite)))
    unknown = sorted(set(section) - set(known))
    if unknown or "root" not in section:
        raise ConfigError(f"{path}: {suite} has unknown keys {unknown} or no root; valid keys: {', '.join(known)}")
    return _check(suite, SuiteParams(**section), str(path))


def save(suite: str, params: SuiteParams, path: Path) -> None:
    _check(suite, params, str(path))
    write_text(path, render(suite, params))  # atomic: DVC never reads half a file


# ------------------------------------------------------------------------------------------- finding datasets


@dataclass(frozen=True)
class Found:
    """The dataset folders under a root: usable ones, and the others with why they were left out."""

    datasets: list[str]
    left_out: dict[str, str]


def find_datasets(root: Path, splits: tuple[str, ...]) -> Found:
    """Sub-folders of `root` (sorted) holding every split of `splits`, named so that a stage command can use them."""
    if not root.is_dir():
        raise DataError(f"{root}: suite root does not exist; put the suite's dataset folders there (Roboflow layout)")
    datasets, left_out = [], {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        missing = [f"{s}/{ANNOTATIONS_FILE}" for s in splits if not split_annotation_path(folder, s).is_file()]
        if missing:
            left_out[folder.name] = f"no {', '.join(missing)}"
        elif not SAFE_NAME.fullmatch(folder.name):
            left_out[folder.name] = "name has characters a stage command would split; link it under a plain name"
        else:
            datasets.append(folder.name)
    return Found(datasets, left_out)


def fewshot_plan(train_dir: Path, k: int, seeds: list[int]) -> tuple[list[str], list[str]]:
    """(few-shot files of `seeds` in `train_dir`, those validate will draw because they are absent)."""
    names = [fewshot_file_name(k, seed) for seed in seeds]
    return [n for n in names if (train_dir / n).is_file()], [n for n in names if not (train_dir / n).is_file()]


def _suite_list(suite: str, domains_file: str | None) -> tuple[list[str] | None, str]:
    """The suite's own dataset names (None when unknown) and where they come from."""
    if suite == "odinw13":
        return list(ODINW13_DATASETS), "pipeline.suites.ODINW13_DATASETS"
    domains, source = rf100vl_domains(domains_file)
    return (sorted(domains) if domains is not None else None), source


def _relative(path: Path) -> str:
    """`path` relative to the working directory (the repository) when inside it, else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def fill(suite: str, root: Path, file: Path, evaluate_split: str, domains_file: str | None = None) -> SuiteParams:
    """Find the datasets under `root`, write them into `file` and print what was found; DataError when none is."""
    params = load(suite, file)
    splits = tuple(dict.fromkeys((FEWSHOT_SPLIT, evaluate_split)))
    found = find_datasets(root, splits)
    for name, reason in found.left_out.items():
        print(f"  left out {root / name}: {reason}")
    if not found.datasets:
        raise DataError(
            f"{root}: no dataset folder with {' and '.join(f'{s}/{ANNOTATIONS_FILE}' for s in splits)}; "
            f"{file} is unchanged"
        )
    names, source = _suite_list(suite, domains_file)
    if names is not None:
        outside = [d for d in found.datasets if d not in names]
        absent = [d for d in names if d not in found.datasets]
        print(f"  {len(found.datasets) - len(outside)} of the {len(names)} {suite} datasets ({source}) found")
        if outside:
            print(f"  not {suite} datasets (they run; the aggregate lists them apart): {', '.join(outside)}")
        if absent:
            print(f"  absent: {', '.join(absent)}")
    new = copy.deepcopy(params)
    new.root, new.datasets, new.aggregate = _relative(root), found.datasets, [suite]
    if domains_file is not None:
        new.aggregate_flags = {**new.aggregate_flags, "domains": _relative(Path(domains_file))}
    seeds = new.seeds()
    if seeds:
        k = new.validate_flags.get(FEWSHOT_K_FLAG, ODINW13_SHOTS)
        for dataset in found.datasets:
            present, drawn = fewshot_plan(root / dataset / FEWSHOT_SPLIT, k, seeds)
            print(
                f"  {dataset}: few-shot files found: {', '.join(present) or 'none'}; "
                f"drawn by validate: {', '.join(drawn) or 'none'}"
            )
    save(suite, new, file)
    runs = f"{len(found.datasets)} datasets" + (f" x seeds {', '.join(map(str, seeds))}" if seeds else "")
    print(f"wrote {file}: {runs}; run them with `dvc repro {file.parent / 'dvc.yaml'}`")
    return new


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=SUITE_NAMES, help="benchmark suite whose params file to fill")
    parser.add_argument("--root", required=True, type=Path, help="folder of the suite's datasets (Roboflow layout)")
    parser.add_argument(
        "--file", type=Path, help="suite params file to write (default: suites/<suite>/params.yaml)", default=None
    )
    parser.add_argument("--params", default="params.yaml", help="root params (for evaluate.split; default params.yaml)")
    parser.add_argument("--domains", help="rf100vl: JSON {dataset: domain} for the aggregate (no rf100vl package)")


def run(args: argparse.Namespace) -> int:
    from pipeline.params import load_params

    if args.domains is not None and args.suite != "rf100vl":
        raise ConfigError("--domains gives RF100-VL domains; leave it out for odinw13")
    split = load_params(args.params).evaluate.split
    fill(args.suite, args.root, args.file or params_path(args.suite), split, args.domains)
    return 0
