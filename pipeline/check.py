"""Stage `check`: the parameters and inputs a pipeline run needs, checked before any stage replaces its outputs.

    python -m pipeline check [--dataset DIR] [--out reports/<name>/check.json] [--params FILE] [--set K=V ...]

DVC deletes a stage's outputs just before it runs the stage's command, so a mistake that a stage finds itself (a
misspelt key, a model folder that is not there) costs what that stage had made. This stage comes first: every
other dataset stage of dvc.yaml depends on its output, and it only reads:
- params: every section loads, every key is known and every value has its type and range (`pipeline.params`);
- model.source and evaluate.baseline: "tiny", "full", or a folder holding a SAM 3 config.json and its weights
  (`sam3.model.check_model_source`: nothing is loaded);
- the dataset (`--dataset`, default dataset.raw): a folder holding the train split and the split evaluate scores
  (`evaluate.split`);
- evaluate.retention_dataset, when set: a folder holding that split too (`pipeline.retention`).
With `--vos` (the vos_check stage, before the video stages) it checks the `vos:` section instead: vos.model.source
("tiny-sam2.1", "tiny-sam3", or a folder holding a tracker's config.json and weights) and the VOS dataset (`--dataset`,
default vos.dataset.raw): train/ holding JPEGImages/ and Annotations/, and vos.evaluate.split holding both.
Every problem is reported (one line each), not only the first; exit 2 when there is any. When all hold, it writes
`--out` with the list of what it checked: the same bytes whenever nothing changed, so the stages after it do not
re-run because of it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.params import Params, load_params
from pipeline.stage_args import add_params_arguments, overrides_of, params_file_of
from sam3.coco import split_annotation_path
from sam3.errors import ConfigError, Sam3Error
from sam3.io import write_json

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=Path, help="the raw dataset the stages read (default: dataset.raw)")
    parser.add_argument("--out", type=Path, help="write the list of checks here when everything holds")
    parser.add_argument("--vos", action="store_true", help="check the vos: section and a VOS dataset instead")
    add_params_arguments(parser, ())


def _model(key: str, source: str) -> Callable[[], str]:
    def check() -> str:
        from sam3.model_files import check_model_source

        check_model_source(source, key)
        return f"{key}: {source}"

    return check


def _split(dataset: Path, split: str) -> Callable[[], str]:
    def check() -> str:
        path = split_annotation_path(dataset, split)
        if not path.is_file():
            raise ConfigError(
                f"{path} not found; the pipeline needs the {split} split of the dataset {dataset} (Roboflow COCO "
                "layout: {train,valid,test}/_annotations.coco.json)"
            )
        return f"dataset: {split} split"

    return check


def _retention_dataset(dataset: Path, split: str) -> Callable[[], str]:
    def check() -> str:
        path = split_annotation_path(dataset, split)
        if not path.is_file():
            raise ConfigError(
                f"evaluate.retention_dataset = {dataset}: {path} not found; give a COCO dataset folder with a {split} "
                "split (Roboflow COCO layout), or null"
            )
        return f"evaluate.retention_dataset: {dataset} ({split} split)"

    return check


def checks_of(params: Params, dataset: Path | None = None) -> list[Callable[[], str]]:
    """The checks of a loaded params file (`dataset`: None for dataset.raw), each returning what it checked or
    raising a Sam3Error."""
    found = [_model("model.source", params.model.source)]
    if params.evaluate.baseline is not None:
        found.append(_model("evaluate.baseline", params.evaluate.baseline))
    for split in dict.fromkeys((TRAIN_SPLIT, params.evaluate.split)):
        found.append(_split(dataset or Path(params.dataset.raw), split))
    if params.evaluate.retention_dataset is not None:
        found.append(_retention_dataset(Path(params.evaluate.retention_dataset), params.evaluate.split))
    return found


def _vos_model(source: str) -> Callable[[], str]:
    def check() -> str:
        from pipeline.vos_train import check_tracker_source

        check_tracker_source(source)
        return f"vos.model.source: {source}"

    return check


def _vos_split(dataset: Path, split: str) -> Callable[[], str]:
    def check() -> str:
        folder = dataset / split
        for name in ("JPEGImages", "Annotations"):
            if not (folder / name).is_dir():
                raise ConfigError(
                    f"{folder / name} not found; the VOS stages need the {split} split of {dataset} (MOSE layout: "
                    "train/ and valid/, each JPEGImages/<video>/ + Annotations/<video>/)"
                )
        return f"vos dataset: {split} split"

    return check


def vos_checks_of(params: Params, dataset: Path | None = None) -> list[Callable[[], str]]:
    """The checks of the `vos:` section (`dataset`: None for vos.dataset.raw)."""
    vos = params.vos
    found = [_vos_model(vos.model.source)]
    for split in dict.fromkeys((TRAIN_SPLIT, vos.evaluate.split)):
        found.append(_vos_split(dataset or Path(vos.dataset.raw), split))
    return found


def run_checks(
    params_file: str | Path | None, overrides: list[str], dataset: Path | None = None, vos: bool = False
) -> tuple[list[str], list[str]]:
    """(what passed, the problems): loading the params first (a params problem stops there: nothing else can be
    read without them), then every input check."""
    source = str(params_file) if params_file else "params"
    try:
        params = load_params(params_file, overrides)
    except Sam3Error as err:
        return [], [str(err)]
    passed, problems = [f"params: {source}"], []
    for check in (vos_checks_of if vos else checks_of)(params, dataset):
        try:
            passed.append(check())
        except Sam3Error as err:
            problems.append(str(err))
    return passed, problems


def run(args: argparse.Namespace) -> int:
    passed, problems = run_checks(params_file_of(args), overrides_of(args), args.dataset, args.vos)
    for problem in problems:  # as the CLI prints one error: one line each, on stderr
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"error: check: {len(problems)} problem(s); no stage ran, nothing was replaced", file=sys.stderr)
        return 2
    if args.out is not None:
        write_json(args.out, {"ok": True, "checked": passed})
    log.info("check: %s", "; ".join(passed))
    return 0
