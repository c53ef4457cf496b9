"""What validation found: check names, severities, and the `Problem` record the report lists.

A problem of severity `error` quarantines the record it names; a `warning` is only reported; `set_aside` moves
the record to the quarantine by design, not as a fault of the data (a Roboflow placeholder category).
Problems sort deterministically: by split (SPLITS order; few-shot files after the splits, by name), table, position
of the record in its list, check name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sam3.coco import SPLITS


class Severity(StrEnum):
    ERROR = "error"  # the record is quarantined
    WARNING = "warning"  # reported only; the record stays in the clean dataset
    SET_ASIDE = "set_aside"  # moved to the quarantine by design (not counted as an error)


class Table(StrEnum):
    """The three record lists of a COCO file, in the order problems are listed."""

    IMAGES = "images"
    ANNOTATIONS = "annotations"
    CATEGORIES = "categories"


class Check(StrEnum):
    """Every check, by the name the report uses."""

    # great-expectations rules over the record tables (suites.py)
    MISSING_KEY = "missing_key"  # a required key is absent
    WRONG_TYPE = "wrong_type"  # a record is not an object, or a key holds the wrong JSON type (null included)
    NON_POSITIVE_SIZE = "non_positive_size"  # image width or height <= 0
    EMPTY_NAME = "empty_name"  # category name is empty or blank
    DUPLICATE_ID = "duplicate_id"  # a later record reuses an id; the first keeps it
    DUPLICATE_CATEGORY_NAME = "duplicate_category_name"  # a later category reuses a name (prompts must differ)
    UNKNOWN_IMAGE = "unknown_image"  # annotation image_id matches no image of the split
    UNKNOWN_CATEGORY = "unknown_category"  # annotation category_id matches no category of the split
    BOX_NOT_POSITIVE = "box_not_positive"  # bbox width or height <= 0
    BOX_OUTSIDE_IMAGE = "box_outside_image"  # bbox leaves the image by more than the tolerance
    NON_FINITE = "non_finite"  # NaN or infinity anywhere in the record
    BAD_POLYGON = "bad_polygon"  # polygon with an odd number of coordinates or fewer than 6
    BAD_RLE = "bad_rle"  # RLE that does not decode
    RLE_SIZE_MISMATCH = "rle_size_mismatch"  # RLE size differs from its image's height and width
    DUPLICATE_FILE_NAME = "duplicate_file_name"  # a later image record names a file an earlier one names
    DEGENERATE_POLYGON = "degenerate_polygon"  # the polygons have no area (equal or collinear points)
    DEGENERATE_POLYGON_PART = "degenerate_polygon_part"  # warning: some polygons of a mask with area have none
    BOX_POLYGON_MISMATCH = "box_polygon_mismatch"  # bbox and the polygons' bounds overlap by IoU < the threshold
    EMPTY_CATEGORY = "empty_category"  # warning: no valid annotation in any split
    ROBOFLOW_PLACEHOLDER = "roboflow_placeholder"  # set aside: Roboflow's project-named category, never a prompt
    # across records and splits, on the clean records (across.py): warnings
    CROWDED_PROMPT = "crowded_prompt"  # an image holds more instances of a category than a prompt can take
    CATEGORY_NAME_MISMATCH = "category_name_mismatch"  # one category id, another name than in an earlier split
    SHARED_IMAGE_FILE = "shared_image_file"  # an image file's bytes are also an earlier split's image (leakage)
    # image file checks (paths.py, files.py)
    UNSAFE_FILE_NAME = "unsafe_file_name"  # absolute path or `..`: escapes the split folder
    LINK_OUTSIDE_DATASET = "link_outside_dataset"  # a symbolic link leads outside the dataset; its target never read
    BROKEN_LINK = "broken_link"  # a symbolic link leads to nothing (missing target or a loop)
    FILE_MISSING = "file_missing"
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"  # width * height from the header over --max-pixels; never decoded
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"  # real size differs from the JSON width/height
    TRUNCATED_IMAGE = "truncated_image"  # PIL verify or a full decode fails
    UNSUPPORTED_PIXELS = "unsupported_pixels"  # decodes, but no 8-bit mapping (float, or int beyond 16 bits)
    # few-shot files of the train split (validate.py)
    NOT_IN_TRAIN = "not_in_train"  # a few-shot image that is not a valid image of the train split (id + file_name)
    # consequences, written on quarantined annotations only (not in the report's problem list)
    IMAGE_QUARANTINED = "image_quarantined"  # the annotation's image is quarantined, so it goes too
    CATEGORY_QUARANTINED = "category_quarantined"  # the annotation's category is quarantined, so it goes too


_ID_FIELD = {Table.IMAGES: "image_id", Table.ANNOTATIONS: "annotation_id", Table.CATEGORIES: "category_id"}


def json_safe(value: Any) -> Any:
    """`value` if JSON can hold it (no NaN or infinity inside), else its repr; ids in problems are shown as found."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, list | dict):
        items = value.values() if isinstance(value, dict) else value
        if any(json_safe(item) is not item for item in items):
            return repr(value)
    return value


@dataclass(frozen=True)
class Problem:
    """One finding about one record (or about the dataset when `table` is None).

    `index` is the record's position in its `table` list of the split's annotation file; `record_id` its `id` as
    found (any JSON value, or None when absent). `file` is where to fix it, relative to the dataset folder: the
    annotation file, or the image file for file checks.
    """

    check: Check
    severity: Severity
    message: str
    split: str | None = None
    table: Table | None = None
    index: int | None = None
    record_id: Any = None
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report entry: check, severity, split, image_id/annotation_id/category_id, file, message, table, index."""
        entry: dict[str, Any] = {
            "check": str(self.check),
            "severity": str(self.severity),
            "split": self.split,
            "table": None if self.table is None else str(self.table),
            "index": self.index,
            "file": self.file,
            "message": self.message,
        }
        for table, field in _ID_FIELD.items():
            entry[field] = json_safe(self.record_id) if self.table == table else None
        return entry

    def brief(self) -> dict[str, str]:
        """The reason written on a quarantined record (`_problems`)."""
        return {"check": str(self.check), "severity": str(self.severity), "message": self.message}

    def sort_key(self) -> tuple[int, str, int, int, str, str]:
        # splits in SPLITS order, then other labels (few-shot files, "train/<file>") by name, then dataset-wide
        split_order = SPLITS.index(self.split) if self.split in SPLITS else len(SPLITS) + (self.split is None)
        table_order = list(Table).index(self.table) if self.table is not None else len(Table)
        index = -1 if self.index is None else self.index
        return (split_order, self.split or "", table_order, index, str(self.check), self.message)


def where(table: Table, index: int, record_id: Any) -> str:
    """How messages name a record: `images[3] (id 7)`, or `images[3]` when it has no id."""
    return f"{table}[{index}]" if record_id is None else f"{table}[{index}] (id {json_safe(record_id)!r})"
