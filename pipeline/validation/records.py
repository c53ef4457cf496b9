"""Load one split and flatten its records into pandas tables of scalar facts for the great-expectations rules.

great-expectations checks columns of scalars; COCO records hold nested lists (bbox, polygons, RLE). So each
record becomes one row (indexed by its position in the JSON list) of:
- the raw value of each key the rules look at (object column, None when absent), for messages and ids;
- `<key>_type`: `describe(value)` ("int", "str", "list of 4 numbers", ...), None when the key is absent;
- `<key>_int`: the value when it is a JSON integer, else NaN (float column), for numeric and uniqueness rules;
- derived facts: box sides and overhang, polygon lengths, RLE decode error and size, non-finite count.
Records that are not JSON objects cannot become rows; they are reported here as `wrong_type`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.rle import rle_error, rle_size
from sam3.coco import ANNOTATIONS_FILE, load_coco
from sam3.errors import DataError

# `describe` results the rules accept
INT_KIND = "int"
STR_KIND = "str"
NUMBER_KINDS = ("int", "float")
OBJECT_KIND = "object"
EMPTY_LIST_KIND = "empty list"
BBOX_KIND = "list of 4 numbers"
POLYGONS_KIND = "list of number lists"


@dataclass(frozen=True)
class SplitRecords:
    """One annotation file of a split as loaded: the top-level object and its three record lists.

    A split's own file is labelled by the split ("train"); another annotation file of the split folder (a few-shot
    file) by its path, "train/fewshot_train_shot10_seed3.json", so that its problems, counts and quarantine stay
    apart from the split's.
    """

    split: str  # the label: problems, counts and the partition are keyed by it
    file: str  # the annotation file, relative to the dataset folder (as problems name it)
    data: dict[str, Any]

    @property
    def folder(self) -> str:
        """The split folder holding the file and its images."""
        return PurePosixPath(self.file).parent.as_posix()

    @property
    def name(self) -> str:
        """The annotation file's name inside its split folder."""
        return PurePosixPath(self.file).name

    def records(self, table: Table) -> list[Any]:
        return self.data[str(table)]


@dataclass(frozen=True)
class RecordTable:
    """A table of one split (or of the whole dataset when `split` is None) and where its rows come from."""

    name: Table
    split: str | None
    file: str | None
    frame: pd.DataFrame  # indexed by the record's position in its JSON list

    @property
    def folder(self) -> str | None:
        """The split folder of `file` (where its images are), None for the dataset-wide table."""
        return None if self.file is None else PurePosixPath(self.file).parent.as_posix()


def load_split(dataset_dir: Path, split: str, name: str = ANNOTATIONS_FILE) -> SplitRecords:
    """Parse `<dataset_dir>/<split>/<name>` (the split's own file by default); DataError when it is not a COCO
    object with three lists, or when a symbolic link (the file's or its split folder's) leads outside the dataset
    folder: what validate reads and copies comes from inside it (`paths`)."""
    path = dataset_dir / split / name
    real = Path(os.path.realpath(path))  # realpath: a link loop stays unresolved (load_coco reports it), no error
    if not real.is_relative_to(os.path.realpath(dataset_dir)):
        raise DataError(
            f"{path}: a link to {real}, outside the dataset folder; not read. Copy the file (or the split folder) "
            "into the dataset"
        )
    data = load_coco(path)
    for table in Table:
        value = data.get(str(table))
        if not isinstance(value, list):
            found = "nothing" if value is None else describe(value)
            raise DataError(
                f"{path}: top-level '{table}' must be a list, found {found}; a COCO file needs 'images', "
                "'annotations' and 'categories' lists (use [] for none)"
            )
    file = f"{split}/{name}"
    return SplitRecords(split=split if name == ANNOTATIONS_FILE else file, file=file, data=data)


def is_int(value: Any) -> bool:
    """A JSON integer (Python's bool is an int, JSON's true is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value: null, bool, int, float, str, list or object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return OBJECT_KIND
    if isinstance(value, list | str | int | float):
        return type(value).__name__
    raise TypeError(f"not a parsed JSON value: {type(value).__name__}")


def describe(value: Any) -> str:
    """`json_kind`, with lists described by their items: 'empty list', 'list of 4 numbers', 'list of number lists',
    otherwise 'list of <kinds>' (e.g. 'list of int, str')."""
    if not isinstance(value, list):
        return json_kind(value)
    if not value:
        return EMPTY_LIST_KIND
    if all(is_number(item) for item in value):
        return f"list of {len(value)} numbers"
    if all(isinstance(item, list) and all(is_number(x) for x in item) for item in value):
        return POLYGONS_KIND
    return "list of " + ", ".join(sorted({json_kind(item) for item in value}))


def count_non_finite(value: Any) -> int:
    """Number of NaN or infinite numbers anywhere inside a parsed JSON value (Python's json reads NaN, Infinity)."""
    if isinstance(value, float):
        return 0 if math.isfinite(value) else 1
    if isinstance(value, list):
        return sum(count_non_finite(item) for item in value)
    if isinstance(value, dict):
        return sum(count_non_finite(item) for item in value.values())
    return 0


def object_records(split: SplitRecords, table: Table) -> tuple[list[int], list[dict[str, Any]], list[Problem]]:
    """Positions and records of the JSON objects in `table`, and a `wrong_type` problem for each other item."""
    positions, objects, problems = [], [], []
    for index, record in enumerate(split.records(table)):
        if isinstance(record, dict):
            positions.append(index)
            objects.append(record)
        else:
            problems.append(
                Problem(
                    Check.WRONG_TYPE,
                    Severity.ERROR,
                    f"{where(table, index, None)}: must be a JSON object, got {describe(record)}",
                    split=split.split,
                    table=table,
                    index=index,
                    file=split.file,
                )
            )
    return positions, objects, problems


def _int_or_nan(value: Any) -> float:
    # float64 holds every integer id below 2**53 exactly; a nullable integer column would trip great-expectations
    return float(value) if is_int(value) else math.nan


_NUMERIC_FACTS = frozenset(
    {"non_finite", "box_min_side", "box_overhang", "polygon_min_coords", "polygon_odd_count", "annotations"}
)


def _frame(positions: list[int], columns: dict[str, list[Any]]) -> pd.DataFrame:
    """A frame with explicit dtypes: raw and text columns stay Python objects (pandas would turn [1, None] into
    floats and strings into its own string dtype), numeric facts are float64 with NaN for 'not applicable'."""
    index = pd.Index(positions, dtype="int64")
    series = {}
    for name, values in columns.items():
        numeric = name.endswith("_int") or name in _NUMERIC_FACTS
        series[name] = pd.Series(values, index=index, dtype="float64" if numeric else object)
    return pd.DataFrame(series, index=index)


def _key_columns(records: list[dict[str, Any]], keys: tuple[str, ...], int_keys: tuple[str, ...]) -> dict[str, list]:
    columns: dict[str, list[Any]] = {}
    for key in keys:
        columns[key] = [record.get(key) for record in records]
        columns[f"{key}_type"] = [describe(record[key]) if key in record else None for record in records]
    for key in int_keys:
        columns[f"{key}_int"] = [_int_or_nan(record.get(key)) for record in records]
    columns["non_finite"] = [count_non_finite(record) for record in records]
    return columns


def image_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, file_name, width, height (raw and _type), id_int, width_int, height_int, non_finite."""
    positions, images, problems = object_records(split, Table.IMAGES)
    columns = _key_columns(images, ("id", "file_name", "width", "height"), ("id", "width", "height"))
    return RecordTable(Table.IMAGES, split.split, split.file, _frame(positions, columns)), problems


def category_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, name (raw and _type), id_int, non_finite, name_key (the name stripped, as prompts compare)."""
    positions, categories, problems = object_records(split, Table.CATEGORIES)
    columns = _key_columns(categories, ("id", "name"), ("id",))
    columns["name_key"] = [c["name"].strip() if isinstance(c.get("name"), str) else None for c in categories]
    return RecordTable(Table.CATEGORIES, split.split, split.file, _frame(positions, columns)), problems


def image_sizes(split: SplitRecords) -> dict[int, tuple[int, int]]:
    """`{image id: (width, height)}` of the first image with each id whose width and height are integers > 0."""
    sizes: dict[int, tuple[int, int]] = {}
    seen: set[int] = set()
    for image in split.records(Table.IMAGES):
        if not isinstance(image, dict) or not is_int(image.get("id")) or image["id"] in seen:
            continue
        seen.add(image["id"])  # a later duplicate never lends its size: the first record owns the id
        width, height = image.get("width"), image.get("height")
        if is_int(width) and is_int(height) and width > 0 and height > 0:
            sizes[image["id"]] = (width, height)
    return sizes


def _box_facts(bbox: Any, size: tuple[int, int] | None) -> tuple[float, float]:
    """(min(w, h), overhang) of a COCO [x, y, w, h] box; overhang = max(-x, -y, x + w - W, y + h - H) in pixels,
    how far the box leaves the W x H image (<= 0 inside). NaN when not applicable (malformed or non-finite box,
    unknown image size, or a box with no area, which another rule reports)."""
    if describe(bbox) != BBOX_KIND or count_non_finite(bbox):
        return math.nan, math.nan
    x, y, w, h = (float(v) for v in bbox)
    min_side = min(w, h)
    if size is None or min_side <= 0:
        return min_side, math.nan
    width, height = size
    return min_side, max(-x, -y, x + w - width, y + h - height)


def annotation_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, image_id, category_id, bbox, area, segmentation (raw and _type); id_int, image_id_int,
    category_id_int; non_finite; box_min_side, box_overhang; image_hw (the image's "height, width");
    polygon_min_coords, polygon_odd_count (polygon segmentations); rle_error, rle_hw (RLE segmentations)."""
    positions, annotations, problems = object_records(split, Table.ANNOTATIONS)
    keys = ("id", "image_id", "category_id", "bbox", "area", "segmentation")
    columns = _key_columns(annotations, keys, ("id", "image_id", "category_id"))
    sizes = image_sizes(split)
    facts: dict[str, list[Any]] = {
        name: []
        for name in (
            "box_min_side",
            "box_overhang",
            "image_hw",
            "polygon_min_coords",
            "polygon_odd_count",
            "rle_error",
            "rle_hw",
        )
    }
    for annotation in annotations:
        image_id = annotation.get("image_id")
        size = sizes.get(image_id) if is_int(image_id) else None
        min_side, overhang = _box_facts(annotation.get("bbox"), size)
        facts["box_min_side"].append(min_side)
        facts["box_overhang"].append(overhang)
        facts["image_hw"].append(None if size is None else f"{size[1]}, {size[0]}")
        segmentation = annotation.get("segmentation")
        polygons = segmentation if describe(segmentation) == POLYGONS_KIND else []
        facts["polygon_min_coords"].append(min(len(p) for p in polygons) if polygons else math.nan)
        facts["polygon_odd_count"].append(sum(len(p) % 2 for p in polygons) if polygons else math.nan)
        error = rle_error(segmentation) if isinstance(segmentation, dict) else None
        hw = rle_size(segmentation) if isinstance(segmentation, dict) and error is None else None
        facts["rle_error"].append(error)
        facts["rle_hw"].append(None if hw is None else f"{hw[0]}, {hw[1]}")
    columns.update(facts)
    return RecordTable(Table.ANNOTATIONS, split.split, split.file, _frame(positions, columns)), problems


def category_usage_table(usage: dict[int, tuple[str, int]]) -> RecordTable:
    """One row per valid category id across splits: id, name, annotations (valid annotations in all splits)."""
    ids = sorted(usage)
    columns = {
        "id": ids,
        "name": [usage[i][0] for i in ids],
        "annotations": [usage[i][1] for i in ids],
    }
    return RecordTable(Table.CATEGORIES, None, None, _frame(list(range(len(ids))), columns))
