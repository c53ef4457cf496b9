"""Benchmark suites: which datasets (and seeds) a suite holds, and the RF100-VL domains (docs/RECIPE.md section 5).

- RF100-VL: 100 datasets in 7 domains. Names and domains ship with the `rf100vl` package as
  `rf100vl/assets/dataset_name_to_category.json` ({dataset name: domain}); the package's downloader names each
  dataset folder by that name. The file is read without importing the package (its import pulls in the Roboflow
  client). Without the package, a JSON file of the same form can be given; without either, the suite's dataset
  list is unknown and every dataset's domain is "unknown".
- ODinW13 10-shot: 13 fixed datasets, each trained on `fewshot_train_shot10_seed{3,30,300}.json`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from sam3.errors import DataError

RF100VL_PACKAGE = "rf100vl"
RF100VL_DOMAINS_ASSET = "assets/dataset_name_to_category.json"
UNKNOWN_DOMAIN = "unknown"

ODINW13_DATASETS: tuple[str, ...] = (
    "AerialMaritimeDrone_large",
    "Aquarium",
    "CottontailRabbits",
    "EgoHands_generic",
    "NorthAmericaMushrooms",
    "Packages",
    "PascalVOC",
    "Raccoon",
    "ShellfishOpenImages",
    "VehiclesOpenImages",
    "pistols",
    "pothole",
    "thermalDogsAndPeople",
)
ODINW13_SEEDS: tuple[int, ...] = (3, 30, 300)
ODINW13_SHOTS = 10  # instances per category of the few-shot training files (the "10-shot" of ODinW13 10-shot)
FEWSHOT_SUITES = {"odinw13": ODINW13_SHOTS}  # suites whose seeds train on their own k-shot file: k


def read_domains_file(path: str | Path) -> dict[str, str]:
    """{dataset name: domain} from a JSON object of strings; DataError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: domains file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DataError(f'{path}: expected a JSON object {{"<dataset name>": "<domain>", ...}}')
    return data


def packaged_rf100vl_domains(package: str = RF100VL_PACKAGE) -> tuple[dict[str, str], Path] | None:
    """The domain mapping shipped in the installed `package` and its path, or None when it is not installed."""
    spec = importlib.util.find_spec(package)  # a top-level name: found without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / RF100VL_DOMAINS_ASSET
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package!r} package; reinstall it (pip install {package})")
    return read_domains_file(path), path


def rf100vl_domains(
    domains_file: str | Path | None = None, package: str = RF100VL_PACKAGE
) -> tuple[dict[str, str] | None, str]:
    """RF100-VL {dataset: domain} and where it came from: `domains_file` if given, else the installed package,
    else (None, "unknown")."""
    if domains_file is not None:
        return read_domains_file(domains_file), str(domains_file)
    packaged = packaged_rf100vl_domains(package)
    if packaged is None:
        return None, UNKNOWN_DOMAIN
    return packaged[0], str(packaged[1])
