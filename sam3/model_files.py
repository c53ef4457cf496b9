"""Is a model source usable? Checked from its files alone: nothing is loaded, and neither torch nor transformers is
imported, so the pipeline's `check` stage answers in a moment.

    check_model_source(source, key)   "tiny", "full", or a folder holding a SAM 3 config.json and its weights
    check_model_folder(folder)        the folder checks (`sam3.model.load_model` runs them before loading)
"""

from __future__ import annotations

import json
from pathlib import Path

from sam3.errors import ModelLoadError

BUILT_IN_SOURCES = ("tiny", "full")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SAM3_MODEL_TYPES = ("sam3", "sam3_video")  # our export / a facebook/sam3 download (video model holding the detector)
COMPLETE_FOLDER = (
    f"a complete model folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE} with its shards), "
    "as in a facebook/sam3 download or our save_pretrained export"
)


def check_model_source(source: str | Path, key: str | None = None) -> None:
    """ModelLoadError (its message prefixed with `key`, e.g. "model.source", when given) unless `source` is a
    built-in model or a complete SAM 3 folder."""
    if isinstance(source, str) and source in BUILT_IN_SOURCES:
        return
    try:
        check_model_folder(Path(source))
    except ModelLoadError as err:
        raise ModelLoadError(f"{key}: {err}" if key else str(err)) from None


def check_model_folder(folder: Path) -> None:
    """ModelLoadError unless `folder` holds a SAM 3 config.json and every weights file it needs."""
    accepted = f"pass 'tiny', 'full' or a model folder; {COMPLETE_FOLDER}"
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; {accepted}")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; {accepted}")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{folder / CONFIG_FILE} is missing; {COMPLETE_FOLDER}")
    _check_model_type(folder / CONFIG_FILE)
    _check_weights(folder)


def _check_model_type(config_file: Path) -> None:
    """Raise ModelLoadError unless config_file is JSON describing SAM 3 (the image detector or the video model)."""
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ModelLoadError(f"{config_file} is not a JSON object ({err}); {COMPLETE_FOLDER}") from err
    if model_type not in SAM3_MODEL_TYPES:
        raise ModelLoadError(
            f"{config_file} describes a {model_type!r} model, not SAM 3 (model_type {' or '.join(SAM3_MODEL_TYPES)}); "
            f"{COMPLETE_FOLDER}"
        )


def _check_weights(folder: Path) -> None:
    """Raise ModelLoadError naming the first missing weights file (single file, index or shard)."""
    if (folder / WEIGHTS_FILE).is_file():
        return
    index = folder / WEIGHTS_INDEX_FILE
    if not index.is_file():
        raise ModelLoadError(f"{folder / WEIGHTS_FILE} is missing (and no {WEIGHTS_INDEX_FILE}); {COMPLETE_FOLDER}")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise ModelLoadError(f"{index} is not a safetensors index ({err}); {COMPLETE_FOLDER}") from err
    for shard in shards:
        if not (folder / shard).is_file():
            raise ModelLoadError(f"{folder / shard} is missing (listed in {WEIGHTS_INDEX_FILE}); {COMPLETE_FOLDER}")
