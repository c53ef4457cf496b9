"""Read the negatives file: extra negative phrases per image (prompts that must find nothing in that image).

Format: a JSON object mapping an image id (as a string, JSON keys are strings) to a list of phrases:

    {"7": ["cat", {"phrase": "tabby", "strategy": "hard"}], "9": []}

Each entry is either a phrase string or an object {"phrase": str, "strategy": str} (the strategy says how the
negatives stage chose it; the dataset only needs the phrase). The negatives stage wraps that mapping as
{"images": {...}, "summary": {...}}; both the bare mapping and the wrapper are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sam3.coco import read_json
from sam3.errors import DataError

_FORMAT_HINT = 'expected {"<image id>": ["phrase", {"phrase": "...", "strategy": "..."}, ...], ...}'


def load_negatives(path: str | Path) -> dict[int, list[str]]:
    """Image id -> its extra negative phrases, in file order.

    Raises DataError naming the file and the offending key or entry when the file is missing, not JSON, or not
    in the format above.
    """
    path = Path(path)
    data = read_json(path, missing="negatives file not found; run the negatives stage or pass no negatives")

    if isinstance(data, dict) and isinstance(data.get("images"), dict):
        # The wrapper the negatives stage writes. Image-id keys are digit strings, so "images" is never one.
        data, where = data["images"], "images"
    else:
        where = "top level"
    if not isinstance(data, dict):
        raise DataError(f"{path}: {where} must be a JSON object; {_FORMAT_HINT}")
    return {_image_id(path, key): _phrases(path, key, entries) for key, entries in data.items()}


def _image_id(path: Path, key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise DataError(f"{path}: key {key!r} is not an image id (an integer); {_FORMAT_HINT}") from None


def _phrases(path: Path, key: str, entries: Any) -> list[str]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: image {key}: expected a list of phrases, got {type(entries).__name__}")
    phrases = []
    for position, entry in enumerate(entries):
        phrase = entry.get("phrase") if isinstance(entry, dict) else entry
        if not isinstance(phrase, str) or not phrase.strip():
            raise DataError(
                f"{path}: image {key}, entry {position}: {json.dumps(entry)[:80]} is not a non-empty phrase string "
                'or {"phrase": str, "strategy": str}'
            )
        phrases.append(phrase)
    return phrases
