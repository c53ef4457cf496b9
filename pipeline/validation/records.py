"""Load one split and flatten its records into pandas tables of scalar facts for the great-expectations rules.

great-expectations checks columns of scalars; COCO records hold nested lists (bbox, polygons, RLE). So each
record becomes one row (indexed by its position in the JSON list) of:
- the raw value of each key the rules look at (object column, None when absent), for messages and ids;
- `<key>_type`: `describe(value)` ("int", "str", "list of 4 numbers", ...), None when the key is absent;
- `<key>_int`: the value when it is a JSON integer, else NaN (float column), for numeric and uniqueness rules;
- derived facts: box sides and overhang, polygon lengths, areas and bounds, RLE decode error and size, non-finite
  count.
Records that are not JSON objects cannot become rows; they are reported here as `wrong_type`.

Memory: the annotations come packed (`packed.read_packed`) and are decoded one at a time while their row is made;
no table holds a polygon or an RLE (a raw column keeps a value only when it is a scalar or a flat list of at most
`RAW_LIST_MAX` numbers, such as a bbox: enough for every message).
"""

from __future__ import annotations

import math
import os
import posixpath
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from pipeline.validation.packed import PackedRecords, read_packed
from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.rle import rle_error, rle_size
from sam3.coco import ANNOTATIONS_FILE
from sam3.errors import DataError

# `describe` results the rules accept
INT_KIND = "int"
STR_KIND = "str"
NUMBER_KINDS = ("int", "float")
OBJECT_KIND = "object"
EMPTY_LIST_KIND = "empty list"
BBOX_KIND = "list of 4 numbers"
POLYGONS_KIND = "list of number lists"
RAW_LIST_MAX = 8  # longest list a raw column keeps (a bbox has 4 numbers; polygons are never kept)


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

    def records(self, table: Table) -> Sequence[Any]:
        """The table's records: a list, or for annotations a `PackedRecords` (decoded one by one on access)."""
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
    data = read_packed(path)
    for table in Table:
        value = data.get(str(table))
        if not isinstance(value, list | PackedRecords):
            found = "nothing" if value is None else describe(value)
            raise DataError(
                f"{path}: top-level '{table}' must be a list, found {found}; a COCO file needs 'images', "
                "'annotations' and 'categories' lists (use [] for none)"
            )
    file = f"{split}/{name}"
    return SplitRecords(split=split if name == ANNOTATIONS_FILE else file, file=file, data=data)


def owner_positions(records: Sequence[Any]) -> dict[int, int]:
    """`{id: position}` of the first JSON object with each integer id: the record that owns the id."""
    owners: dict[int, int] = {}
    for index, record in enumerate(records):
        if isinstance(record, dict) and is_int(record.get("id")):
            owners.setdefault(record["id"], index)
    return owners


def record_problem(
    records: SplitRecords, check: Check, severity: Severity, table: Table, index: int, record_id: Any, text: str
) -> Problem:
    """A problem on the record at `index` of `table` in `records`' file; the message is `where(...)`: `text`."""
    return Problem(
        check,
        severity,
        f"{where(table, index, record_id)}: {text}",
        split=records.split,
        table=table,
        index=index,
        record_id=record_id,
        file=records.file,
    )


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


def object_records(split: SplitRecords, table: Table, problems: list[Problem]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, record) of each JSON object in `table`, one at a time; a `wrong_type` problem is appended to
    `problems` for each other item."""
    for index, record in enumerate(split.records(table)):
        if isinstance(record, dict):
            yield index, record
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


def _int_or_nan(value: Any) -> float:
    # float64 holds every integer id below 2**53 exactly; a nullable integer column would trip great-expectations
    return float(value) if is_int(value) else math.nan


_NUMERIC_FACTS = frozenset(
    {
        "non_finite",
        "box_min_side",
        "box_overhang",
        "polygon_min_coords",
        "polygon_odd_count",
        "polygon_area",
        "polygon_flat_parts",
        "box_polygon_iou",
        "annotations",
    }
)


def _numeric(name: str) -> bool:
    return name.endswith("_int") or name in _NUMERIC_FACTS


def _frame(positions: Sequence[int], columns: dict[str, Any]) -> pd.DataFrame:
    """A frame with explicit dtypes: raw and text columns stay Python objects (pandas would turn [1, None] into
    floats and strings into its own string dtype), numeric facts are float64 with NaN for 'not applicable'
    (given as lists, or as array('d') columns, which are taken without a Python float per cell)."""
    index = pd.Index(np.asarray(positions, dtype=np.int64))
    series = {}
    for name, values in columns.items():
        if isinstance(values, array):
            series[name] = pd.Series(np.asarray(values, dtype=np.float64), index=index)
        else:
            series[name] = pd.Series(values, index=index, dtype="float64" if _numeric(name) else object)
    return pd.DataFrame(series, index=index)


def _raw(value: Any) -> Any:
    """What a raw column keeps of a value: scalars and short flat lists (a bbox), else None (see the docstring)."""
    if isinstance(value, dict):
        return None
    if isinstance(value, list):
        short = len(value) <= RAW_LIST_MAX and not any(isinstance(item, list | dict) for item in value)
        return value if short else None
    return value


_SHARED: dict[str, str] = {}  # one object per distinct short text (kinds, "h, w"): a million rows, a few strings


def _shared(text: str | None) -> str | None:
    return None if text is None else _SHARED.setdefault(text, text)


def _add_keys(
    columns: dict[str, list[Any]], record: dict[str, Any], keys: tuple[str, ...], int_keys: tuple[str, ...]
) -> None:
    """Append one record's raw, _type, _int and non_finite cells to `columns`."""
    for key in keys:
        columns[key].append(_raw(record.get(key)))
        columns[f"{key}_type"].append(_shared(describe(record[key])) if key in record else None)
    for key in int_keys:
        columns[f"{key}_int"].append(_int_or_nan(record.get(key)))
    columns["non_finite"].append(count_non_finite(record))


def _empty_columns(keys: tuple[str, ...], int_keys: tuple[str, ...], facts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The columns of a table in their order, empty (so that a table without rows still has them all): numeric
    ones as array('d') (8 bytes a cell while the table is built), the others as lists."""
    names = [name for key in keys for name in (key, f"{key}_type")] + [f"{key}_int" for key in int_keys]
    return {name: array("d") if _numeric(name) else [] for name in [*names, "non_finite", *facts]}


def file_key(file_name: Any) -> str | None:
    """The file an image record names, for comparing records: its file_name normalised ("./a/../b.jpg" and
    "b.jpg" are one file); None when file_name is not a string."""
    return posixpath.normpath(file_name) if isinstance(file_name, str) and file_name else None


def image_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, file_name, width, height (raw and _type), id_int, width_int, height_int, non_finite, file_key."""
    keys, int_keys = ("id", "file_name", "width", "height"), ("id", "width", "height")
    columns, positions, problems = _empty_columns(keys, int_keys, ("file_key",)), [], []
    for index, image in object_records(split, Table.IMAGES, problems):
        positions.append(index)
        _add_keys(columns, image, keys, int_keys)
        columns["file_key"].append(file_key(image.get("file_name")))
    return RecordTable(Table.IMAGES, split.split, split.file, _frame(positions, columns)), problems


def category_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, name (raw and _type), id_int, non_finite, name_key (the name stripped, as prompts compare)."""
    columns, positions, problems = _empty_columns(("id", "name"), ("id",), ("name_key",)), [], []
    for index, category in object_records(split, Table.CATEGORIES, problems):
        positions.append(index)
        _add_keys(columns, category, ("id", "name"), ("id",))
        name = category.get("name")
        columns["name_key"].append(name.strip() if isinstance(name, str) else None)
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


FLAT_AREA_PX = 1e-6  # a polygon with less area (in square pixels) has none: its points are equal or on one line


def _shoelace(polygon: list[float]) -> float:
    """|area| of one closed polygon [x1, y1, x2, y2, ...] in square pixels: |sum x_i y_(i+1) - x_(i+1) y_i| / 2."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x, y, w, h] boxes with positive sides."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _polygon_facts(polygons: list[list[float]], bbox: Any) -> tuple[float, float, float]:
    """(area, flat parts, box IoU) of a polygon segmentation, NaN where not applicable.

    area: the parts' summed area (square pixels); flat parts: how many parts have no area (< FLAT_AREA_PX), counted
    only when the whole has some (a whole without area is reported by its area); box IoU: IoU of the bbox with the
    bounds of all the points, when the bbox is 4 finite numbers with sides > 0 and the whole has area. NaN for a
    segmentation that other rules reject (too few or an odd number of coordinates, non-finite numbers) or none.
    """
    if not polygons or any(len(p) < 6 or len(p) % 2 or count_non_finite(p) for p in polygons):
        return math.nan, math.nan, math.nan
    areas = [_shoelace(p) for p in polygons]
    area = sum(areas)
    if area < FLAT_AREA_PX:
        return area, math.nan, math.nan
    flat = float(sum(a < FLAT_AREA_PX for a in areas))
    if describe(bbox) != BBOX_KIND or count_non_finite(bbox) or min(bbox[2], bbox[3]) <= 0:
        return area, flat, math.nan
    xs = [x for p in polygons for x in p[0::2]]
    ys = [y for p in polygons for y in p[1::2]]
    bounds = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
    if bounds[2] <= 0 or bounds[3] <= 0:
        return area, flat, 0.0
    return area, flat, _iou_xywh([float(v) for v in bbox], bounds)


_ANNOTATION_FACTS = (
    "box_min_side",
    "box_overhang",
    "image_hw",
    "polygon_min_coords",
    "polygon_odd_count",
    "polygon_area",
    "polygon_flat_parts",
    "box_polygon_iou",
    "rle_error",
    "rle_hw",
)


def annotation_table(split: SplitRecords) -> tuple[RecordTable, list[Problem]]:
    """Columns: id, image_id, category_id, bbox, area, segmentation (raw and _type); id_int, image_id_int,
    category_id_int; non_finite; box_min_side, box_overhang; image_hw (the image's "height, width");
    polygon_min_coords, polygon_odd_count, polygon_area, polygon_flat_parts, box_polygon_iou (polygon
    segmentations, `_polygon_facts`); rle_error, rle_hw (RLE segmentations). The records are read one at a time."""
    keys, int_keys = (
        ("id", "image_id", "category_id", "bbox", "area", "segmentation"),
        ("id", "image_id", "category_id"),
    )
    columns, positions, problems = _empty_columns(keys, int_keys, _ANNOTATION_FACTS), array("q"), []
    sizes = image_sizes(split)
    for index, annotation in object_records(split, Table.ANNOTATIONS, problems):
        positions.append(index)
        _add_keys(columns, annotation, keys, int_keys)
        image_id = annotation.get("image_id")
        size = sizes.get(image_id) if is_int(image_id) else None
        bbox = annotation.get("bbox")
        min_side, overhang = _box_facts(bbox, size)
        segmentation = annotation.get("segmentation")
        polygons = segmentation if describe(segmentation) == POLYGONS_KIND else []
        area, flat, iou = _polygon_facts(polygons, bbox)
        error = rle_error(segmentation) if isinstance(segmentation, dict) else None
        hw = rle_size(segmentation) if isinstance(segmentation, dict) and error is None else None
        row = {
            "box_min_side": min_side,
            "box_overhang": overhang,
            "image_hw": None if size is None else _shared(f"{size[1]}, {size[0]}"),
            "polygon_min_coords": min(len(p) for p in polygons) if polygons else math.nan,
            "polygon_odd_count": sum(len(p) % 2 for p in polygons) if polygons else math.nan,
            "polygon_area": area,
            "polygon_flat_parts": flat,
            "box_polygon_iou": iou,
            "rle_error": error,
            "rle_hw": None if hw is None else _shared(f"{hw[0]}, {hw[1]}"),
        }
        for name, value in row.items():
            columns[name].append(value)
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
