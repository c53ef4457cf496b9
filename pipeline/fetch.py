"""Stage `fetch`: get a benchmark suite's data into ROOT, or say exactly what is missing and how to get it.

    python -m pipeline fetch rf100vl --root DIR [--domains-file FILE]
    python -m pipeline fetch odinw13 --root DIR [--fewshot-k 10]
    python -m pipeline fetch roboflow --workspace W --project P --version V [--out DIR]
    python -m pipeline fetch roboflow --from-zip FILE [--out DIR]

rf100vl  Layout ROOT/<dataset>/{train,valid,test}/_annotations.coco.json. The dataset list comes from the installed
         `rf100vl` package (or `--domains-file`, the same {dataset: domain} JSON). Datasets already complete are
         kept; the others are downloaded with `rf100vl.get_rf100vl_projects` when the package is installed,
         ROBOFLOW_API_KEY is set and the network answers. Otherwise the stage prints what to install and export,
         the layout and which datasets are present / missing, and exits 2 (ConfigError / DataError).
         Exit 0 when every dataset of the list is complete.
odinw13  Cannot be downloaded here (GLIP's download). Checks each of the 13 training folders (docs/RECIPE.md
         section 5, names with spaces) and, in each present one, the few-shot files
         `fewshot_train_shot{k}_seed{3,30,300}.json`: present ones are used as they are; missing ones are generated
         by `pipeline.fewshot.make_fewshot` from the folder's full training annotations, and the output says so.
         Exit 0 when at least one dataset is ready (the missing ones are listed with their exact expected paths, as
         a warning: the suite then runs on the ready ones); exit 2 (DataError) when none is.
roboflow One project version of your own, downloaded, or an export zip already downloaded (`pipeline.roboflow`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.fewshot import FEWSHOT_FILE_TEMPLATE, fewshot_file_name, make_fewshot, shortfall
from pipeline.suites import ODINW13_SEEDS, ODINW13_SHOTS, RF100VL_PACKAGE, rf100vl_domains
from sam3.coco import ANNOTATIONS_FILE, SPLITS, load_coco, save_coco, split_annotation_path
from sam3.errors import ConfigError, DataError

SUITES: tuple[str, ...] = ("rf100vl", "odinw13")
SOURCES: tuple[str, ...] = (*SUITES, "roboflow")
DEFAULT_FEWSHOT_K = ODINW13_SHOTS
API_KEY_VARIABLE = "ROBOFLOW_API_KEY"
GLIP_ODINW_DOWNLOAD = "GLIP's ODinW download (github.com/microsoft/GLIP, odinw/download_datasets.py)"
# GLIP's full training annotations; Roboflow's own export name is the fallback.
ODINW_FULL_ANNOTATIONS: tuple[str, ...] = ("annotations_without_background.json", ANNOTATIONS_FILE)


@dataclass(frozen=True)
class OdinwTrainFolder:
    """Where one ODinW13 dataset's training files live under the ODinW root (GLIP's layout)."""

    dataset: str
    folder: str  # relative to ROOT; may contain spaces
    full_annotations: tuple[str, ...] = ODINW_FULL_ANNOTATIONS  # candidates in that folder, first found is used


ODINW13_TRAIN_FOLDERS: tuple[OdinwTrainFolder, ...] = (
    OdinwTrainFolder("AerialMaritimeDrone_large", "AerialMaritimeDrone/large/train"),
    OdinwTrainFolder("Aquarium", "Aquarium/Aquarium Combined.v2-raw-1024.coco/train"),
    OdinwTrainFolder("CottontailRabbits", "CottontailRabbits/train"),
    OdinwTrainFolder("EgoHands_generic", "EgoHands/generic/train"),
    OdinwTrainFolder("NorthAmericaMushrooms", "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/train"),
    OdinwTrainFolder("Packages", "Packages/Raw/train"),
    OdinwTrainFolder("PascalVOC", "PascalVOC/train"),
    OdinwTrainFolder("Raccoon", "Raccoon/Raccoon.v2-raw.coco/train"),
    OdinwTrainFolder("ShellfishOpenImages", "ShellfishOpenImages/raw/train"),
    OdinwTrainFolder("VehiclesOpenImages", "VehiclesOpenImages/416x416/train"),
    # pistols keeps every split in one folder, files prefixed by split (its test file: test_annotations_...).
    OdinwTrainFolder("pistols", "pistols/export", ("train_annotations_without_background.json",)),
    OdinwTrainFolder("pothole", "pothole/train"),
    OdinwTrainFolder("thermalDogsAndPeople", "thermalDogsAndPeople/train"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=SOURCES, help="benchmark suite to fetch or check, or roboflow (your project)")
    parser.add_argument("--root", type=Path, help="rf100vl, odinw13: folder that holds (or will hold) the suite's data")
    parser.add_argument(
        "--fewshot-k", type=int, default=DEFAULT_FEWSHOT_K, help="odinw13: instances per category of the few-shot files"
    )
    parser.add_argument(
        "--domains-file", type=Path, default=None, help="rf100vl: {dataset: domain} JSON when the package is absent"
    )
    roboflow = parser.add_argument_group("roboflow")
    roboflow.add_argument("--workspace", help="Roboflow workspace (the URL's first part)")
    roboflow.add_argument("--project", help="Roboflow project")
    roboflow.add_argument("--version", type=int, help="project version number")
    roboflow.add_argument("--from-zip", type=Path, help="a COCO export zip already downloaded (no key, no network)")
    roboflow.add_argument("--out", type=Path, help="dataset folder to create (default data/raw/<project or zip name>)")


def run(args: argparse.Namespace) -> int:
    if args.suite == "roboflow":
        return _run_roboflow(args)
    if args.root is None:
        raise ConfigError(f"fetch {args.suite} needs --root DIR (the folder that holds the suite's data)")
    if args.suite == "rf100vl":
        return fetch_rf100vl(args.root, args.domains_file)
    return fetch_odinw13(args.root, args.fewshot_k)


def _run_roboflow(args: argparse.Namespace) -> int:
    from pipeline import roboflow

    if args.from_zip is not None:
        roboflow.from_zip(args.from_zip, args.out)
        return 0
    missing = [f"--{name}" for name in ("workspace", "project", "version") if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"fetch roboflow needs --from-zip FILE, or {', '.join(missing)} (missing)")
    roboflow.download(args.workspace, args.project, args.version, args.out)
    return 0


# --------------------------------------------------------------------------------------------------- RF100-VL


@dataclass(frozen=True)
class LayoutStatus:
    """Which datasets of a list are complete (all splits), partial (some) or missing (none) under a root."""

    complete: list[str]
    partial: dict[str, list[str]]  # dataset -> its missing splits
    missing: list[str]


def roboflow_layout_status(root: Path, names: list[str]) -> LayoutStatus:
    """Check ROOT/<name>/{train,valid,test}/_annotations.coco.json for each name."""
    complete, partial, missing = [], {}, []
    for name in names:
        absent = [s for s in SPLITS if not split_annotation_path(root / name, s).is_file()]
        if not absent:
            complete.append(name)
        elif len(absent) == len(SPLITS):
            missing.append(name)
        else:
            partial[name] = absent
    return LayoutStatus(complete, partial, missing)


def _found_dataset_folders(root: Path) -> list[str]:
    """Folders under ROOT holding at least one split (used when the dataset list is unknown)."""
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if any(split_annotation_path(d, s).is_file() for s in SPLITS))


def _print_rf100vl_status(root: Path, names: list[str] | None, source: str) -> LayoutStatus | None:
    layout = f"{root}/<dataset>/{{{','.join(SPLITS)}}}/{ANNOTATIONS_FILE}"
    print(f"RF100-VL layout expected: {layout}")
    if names is None:
        found = _found_dataset_folders(root)
        print(
            f"dataset list unknown (no {RF100VL_PACKAGE!r} package, no --domains-file); "
            f"{len(found)} dataset folder(s) found: {', '.join(found) or 'none'}"
        )
        return None
    status = roboflow_layout_status(root, names)
    print(f"dataset list: {len(names)} datasets from {source}")
    print(f"present ({len(status.complete)}): {', '.join(status.complete) or 'none'}")
    for name, absent in status.partial.items():
        print(f"incomplete: {root / name} lacks {', '.join(f'{s}/{ANNOTATIONS_FILE}' for s in absent)}")
    print(f"missing ({len(status.missing)}): {', '.join(status.missing) or 'none'}")
    return status


def _how_to_download(root: Path) -> str:
    return (
        f"to download: pip install {RF100VL_PACKAGE}; export {API_KEY_VARIABLE}=<your Roboflow API key>; "
        f"python -m pipeline fetch rf100vl --root {root}  "
        f"(or place each dataset at {root}/<dataset>/{{{','.join(SPLITS)}}}/{ANNOTATIONS_FILE})"
    )


def fetch_rf100vl(root: Path, domains_file: Path | None = None) -> int:
    """Download the RF100-VL datasets that ROOT lacks, or explain what to do (ConfigError / DataError)."""
    root = Path(root)
    domains, source = rf100vl_domains(domains_file)
    names = sorted(domains) if domains is not None else None
    status = _print_rf100vl_status(root, names, source)
    if status is not None and len(status.complete) == len(names):
        print(f"all {len(names)} RF100-VL datasets are present under {root}; nothing to download")
        return 0
    todo = "the missing datasets" if status is not None else "RF100-VL"
    if importlib.util.find_spec(RF100VL_PACKAGE) is None:
        print(_how_to_download(root))
        raise ConfigError(
            f"cannot download {todo}: the {RF100VL_PACKAGE!r} package is not installed "
            f"(pip install {RF100VL_PACKAGE}, then export {API_KEY_VARIABLE}=<your key> and rerun)"
        )
    api_key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not api_key:
        print(_how_to_download(root))
        raise ConfigError(
            f"cannot download {todo}: {API_KEY_VARIABLE} is not set (export {API_KEY_VARIABLE}=<your Roboflow API "
            "key> and rerun)"
        )
    _download_rf100vl(root, api_key, skip=set(status.complete) if status is not None else set())
    return _after_download(root, names)


def _download_rf100vl(root: Path, api_key: str, skip: set[str]) -> None:
    """Download every RF100-VL dataset not in `skip` into ROOT/<name> (COCO format) with the `rf100vl` package."""
    from rf100vl import get_rf100vl_projects  # the package pulls in the Roboflow client: import only here
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    try:
        datasets = [d for d in get_rf100vl_projects(api_key=api_key) if str(d.name) not in skip]
        for dataset in tqdm(datasets, desc="RF100-VL download", unit="dataset"):
            dataset.download(str(root / str(dataset.name)), "coco", True)
    except OSError as err:  # requests' ConnectionError / Timeout are OSErrors: no network, or Roboflow down
        raise DataError(
            f"RF100-VL download into {root} failed ({type(err).__name__}: {err}); check the network and "
            f"{API_KEY_VARIABLE}, then rerun (complete datasets are kept)"
        ) from None


def _after_download(root: Path, names: list[str] | None) -> int:
    """Recheck the layout after a download; DataError when datasets are still missing."""
    if names is None:  # no list before: the package is installed now, so it can be read
        domains, _ = rf100vl_domains()
        names = sorted(domains) if domains is not None else _found_dataset_folders(root)
    status = roboflow_layout_status(root, names)
    if status.partial or status.missing:
        bad = sorted([*status.partial, *status.missing])
        raise DataError(f"{root}: {len(bad)} RF100-VL dataset(s) still incomplete after download: {', '.join(bad)}")
    print(f"all {len(names)} RF100-VL datasets are present under {root}")
    return 0


# ---------------------------------------------------------------------------------------------------- ODinW13


@dataclass(frozen=True)
class OdinwResult:
    """Outcome for one ODinW13 dataset: `ready` when every few-shot file exists (found or generated)."""

    dataset: str
    train_dir: Path
    ready: bool
    found: list[str]
    generated: list[str]
    problem: str = ""  # why it is not ready, with the exact expected path


def prepare_odinw_dataset(root: Path, entry: OdinwTrainFolder, k: int, seeds: tuple[int, ...]) -> OdinwResult:
    """Check one training folder; generate its missing few-shot files from the full training annotations."""
    train_dir = root / entry.folder
    if not train_dir.is_dir():
        return OdinwResult(entry.dataset, train_dir, False, [], [], f"missing: expected training folder {train_dir}")
    wanted = {seed: train_dir / fewshot_file_name(k, seed) for seed in seeds}
    found = [path.name for path in wanted.values() if path.is_file()]
    absent = {seed: path for seed, path in wanted.items() if not path.is_file()}
    if not absent:
        return OdinwResult(entry.dataset, train_dir, True, found, [])
    source = next((train_dir / n for n in entry.full_annotations if (train_dir / n).is_file()), None)
    if source is None:
        expected = " or ".join(str(train_dir / n) for n in entry.full_annotations)
        return OdinwResult(
            entry.dataset,
            train_dir,
            False,
            found,
            [],
            f"incomplete: {', '.join(p.name for p in absent.values())} absent and no full training annotations "
            f"to draw them from (expected {expected})",
        )
    coco = load_coco(source)
    generated = []
    for seed, path in absent.items():
        try:
            fewshot = make_fewshot(coco, k, seed)
        except DataError as err:
            raise DataError(f"{source}: {err}") from None
        save_coco(path, fewshot)
        generated.append(path.name)
        short = shortfall(fewshot, k)
        note = f" (fewer than {k} instances in the whole set: {short})" if short else ""
        print(
            f"  generated {path} from {source.name}: {len(fewshot['images'])} images, "
            f"{len(fewshot['annotations'])} instances, seed {seed}{note}"
        )
    return OdinwResult(entry.dataset, train_dir, True, found, generated)


def fetch_odinw13(root: Path, k: int = DEFAULT_FEWSHOT_K, seeds: tuple[int, ...] = ODINW13_SEEDS) -> int:
    """Check the ODinW13 layout under ROOT and complete the few-shot files; 0 if any dataset is ready."""
    if k < 1:
        raise ConfigError(f"--fewshot-k must be >= 1, got {k}")
    root = Path(root)
    pattern = FEWSHOT_FILE_TEMPLATE.format(k=k, seed="{" + ",".join(map(str, seeds)) + "}")
    print(f"ODinW13 under {root} (few-shot files {pattern}):")
    results = []
    for entry in ODINW13_TRAIN_FOLDERS:  # 13 folders, one printed line each: that line is the progress
        result = prepare_odinw_dataset(root, entry, k, seeds)
        results.append(result)
        if result.ready:
            parts = [f"found {', '.join(result.found)}" if result.found else ""]
            parts.append(f"generated {', '.join(result.generated)} (GLIP-style draw)" if result.generated else "")
            print(f"  ready  {result.dataset}: {result.train_dir} ({'; '.join(p for p in parts if p)})")
        else:
            print(f"  NOT READY  {result.dataset}: {result.problem}")
    ready = [r.dataset for r in results if r.ready]
    not_ready = [r.dataset for r in results if not r.ready]
    if not ready:
        raise DataError(
            f"{root}: none of the {len(ODINW13_TRAIN_FOLDERS)} ODinW13 datasets is laid out (expected paths listed "
            f"above); get the data with {GLIP_ODINW_DOWNLOAD} and pass its odinw folder as --root"
        )
    print(f"{len(ready)} of {len(ODINW13_TRAIN_FOLDERS)} ODinW13 datasets ready")
    if not_ready:
        print(
            f"warning: {len(not_ready)} dataset(s) not ready ({', '.join(not_ready)}); the suite runs without them "
            f"until they are placed as listed above ({GLIP_ODINW_DOWNLOAD})"
        )
    return 0
