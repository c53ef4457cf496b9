"""The data rules as great-expectations suites over the record tables, and the runner that turns failures into Problems.

Each `Rule` pairs one expectation with the check it stands for and a message. The runner validates a table's
suite with result_format COMPLETE and maps every unexpected row index back to its record (the tables are indexed
by position in the JSON list). Uniqueness rules flag every copy of a repeated value; with `keep_first` the first
record keeps the value and only the later ones become problems.

great_expectations is imported inside functions: importing it takes seconds, and `--help` should not wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.validation.problems import Check, Problem, Severity, Table, where
from pipeline.validation.records import (
    BBOX_KIND,
    EMPTY_LIST_KIND,
    FLAT_AREA_PX,
    INT_KIND,
    NUMBER_KINDS,
    OBJECT_KIND,
    POLYGONS_KIND,
    STR_KIND,
    RecordTable,
)

BOX_TOLERANCE_PX = 1.0  # exporters that round, or count pixel centres, put box edges up to a pixel outside
MIN_POLYGON_COORDS = 6  # 3 points: fewer has no area
# bbox vs the bounds of its polygons: exporters round and pad by a pixel or two (IoU stays > 0.9 on any object of
# 20 px or more); below one half, the box and the mask describe different things and one of them is wrong
BOX_POLYGON_MIN_IOU = 0.5


@dataclass(frozen=True)
class Rule:
    """One expectation, the check it implements, and the message for a failing row.

    `message` gets the row's columns as a dict plus `where` (e.g. "images[3] (id 7)") and, for `keep_first`
    rules, `first` (position of the record that keeps the value).
    """

    check: Check
    expectation: Any  # a great_expectations.expectations.Expectation
    message: Callable[[dict[str, Any]], str]
    severity: Severity = Severity.ERROR
    keep_first: bool = False


def _gxe() -> Any:
    import great_expectations.expectations as gxe

    return gxe


def _shown(kind: str, value: Any) -> str:
    """A found value for a message: its kind, and the value itself when it is a short scalar."""
    if kind in ("int", "float", "str", "bool"):
        return f"{kind} {value!r}"
    return kind


def _key_rules(key: str, kinds: Sequence[str], expected: str, required: bool = True) -> list[Rule]:
    """missing_key (when required) and wrong_type for `key`; a JSON null is a wrong type, not a missing key."""
    gxe = _gxe()
    rules = []
    if required:
        rules.append(
            Rule(
                Check.MISSING_KEY,
                gxe.ExpectColumnValuesToNotBeNull(column=f"{key}_type"),
                lambda r: f"{r['where']}: required key '{key}' is missing; add it ({expected})",
            )
        )
    rules.append(
        Rule(
            Check.WRONG_TYPE,
            gxe.ExpectColumnValuesToBeInSet(column=f"{key}_type", value_set=list(kinds)),
            lambda r: f"{r['where']}: {key} must be {expected}, got {_shown(r[f'{key}_type'], r[key])}",
        )
    )
    return rules


def _duplicate_id_rule(table: Table) -> Rule:
    return Rule(
        Check.DUPLICATE_ID,
        _gxe().ExpectColumnValuesToBeUnique(column="id_int"),
        lambda r: (
            f"{r['where']}: id {r['id']} is already used by {table}[{r['first']}]; the first record keeps "
            "it and this one is quarantined; give every record its own id"
        ),
        keep_first=True,
    )


def _non_finite_rule() -> Rule:
    return Rule(
        Check.NON_FINITE,
        _gxe().ExpectColumnValuesToBeBetween(column="non_finite", max_value=0),
        lambda r: f"{r['where']}: holds {r['non_finite']:.0f} NaN or infinite number(s); replace them with real values",
    )


def image_rules() -> list[Rule]:
    """Rules over `records.image_table`."""
    gxe = _gxe()
    rules = [
        *_key_rules("id", [INT_KIND], "an integer"),
        *_key_rules("file_name", [STR_KIND], "a string: the image path inside the split folder"),
        *_key_rules("width", [INT_KIND], "an integer > 0"),
        *_key_rules("height", [INT_KIND], "an integer > 0"),
    ]
    for key in ("width", "height"):
        rules.append(
            Rule(
                Check.NON_POSITIVE_SIZE,
                gxe.ExpectColumnValuesToBeBetween(column=f"{key}_int", min_value=1),
                lambda r, key=key: f"{r['where']}: {key} must be > 0, got {r[key]}",
            )
        )
    rules += [
        _duplicate_id_rule(Table.IMAGES),
        Rule(
            Check.DUPLICATE_FILE_NAME,
            _gxe().ExpectColumnValuesToBeUnique(column="file_key"),
            lambda r: (
                f"{r['where']}: file_name {r['file_name']!r} is already the file of images[{r['first']}]; the first "
                "record keeps the file and this one is quarantined with its annotations (one file, one image "
                "record: merge the two records' annotations onto the first)"
            ),
            keep_first=True,
        ),
        _non_finite_rule(),
    ]
    return rules


def annotation_rules(image_ids: Sequence[int], category_ids: Sequence[int]) -> list[Rule]:
    """Rules over `records.annotation_table`; `image_ids` and `category_ids` are every integer id of the split."""
    gxe = _gxe()
    rules = [
        *_key_rules("id", [INT_KIND], "an integer"),
        *_key_rules("image_id", [INT_KIND], "an integer"),
        *_key_rules("category_id", [INT_KIND], "an integer"),
        *_key_rules("bbox", [BBOX_KIND], "[x, y, width, height] (4 numbers)"),
        *_key_rules("area", NUMBER_KINDS, "a number", required=False),
        *_key_rules(
            "segmentation",
            [POLYGONS_KIND, EMPTY_LIST_KIND, OBJECT_KIND],
            "a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE object {size, counts}",
            required=False,
        ),
        _duplicate_id_rule(Table.ANNOTATIONS),
        Rule(
            Check.UNKNOWN_IMAGE,
            gxe.ExpectColumnValuesToBeInSet(column="image_id_int", value_set=sorted(image_ids)),
            lambda r: (
                f"{r['where']}: image_id {r['image_id']} is not the id of any image in this split; "
                "fix the id or remove the annotation"
            ),
        ),
        Rule(
            Check.UNKNOWN_CATEGORY,
            gxe.ExpectColumnValuesToBeInSet(column="category_id_int", value_set=sorted(category_ids)),
            lambda r: (
                f"{r['where']}: category_id {r['category_id']} is not the id of any category in this split; "
                "fix the id or add the category"
            ),
        ),
        Rule(
            Check.BOX_NOT_POSITIVE,
            gxe.ExpectColumnValuesToBeBetween(column="box_min_side", min_value=0, strict_min=True),
            lambda r: f"{r['where']}: bbox {r['bbox']} must have width and height > 0",
        ),
        Rule(
            Check.BOX_OUTSIDE_IMAGE,
            gxe.ExpectColumnValuesToBeBetween(column="box_overhang", max_value=BOX_TOLERANCE_PX),
            lambda r: (
                f"{r['where']}: bbox {r['bbox']} reaches {r['box_overhang']:g} px outside its image "
                f"(height, width = {r['image_hw']}; tolerance {BOX_TOLERANCE_PX:g} px)"
            ),
        ),
        _non_finite_rule(),
        Rule(
            Check.BAD_POLYGON,
            gxe.ExpectColumnValuesToBeBetween(column="polygon_min_coords", min_value=MIN_POLYGON_COORDS),
            lambda r: (
                f"{r['where']}: a polygon has {r['polygon_min_coords']:.0f} coordinates; a polygon needs at "
                f"least {MIN_POLYGON_COORDS} (3 points)"
            ),
        ),
        Rule(
            Check.BAD_POLYGON,
            gxe.ExpectColumnValuesToBeBetween(column="polygon_odd_count", max_value=0),
            lambda r: (
                f"{r['where']}: {r['polygon_odd_count']:.0f} polygon(s) with an odd number of coordinates; "
                "a polygon is a flat list x1, y1, x2, y2, ..."
            ),
        ),
        Rule(
            Check.DEGENERATE_POLYGON,
            gxe.ExpectColumnValuesToBeBetween(column="polygon_area", min_value=FLAT_AREA_PX),
            lambda r: (
                f"{r['where']}: its polygons have no area ({r['polygon_area']:.3g} square pixels: the points are "
                "equal or on one line), so its mask would be empty; redraw the outline"
            ),
        ),
        Rule(
            Check.DEGENERATE_POLYGON_PART,
            gxe.ExpectColumnValuesToBeBetween(column="polygon_flat_parts", max_value=0),
            lambda r: (
                f"{r['where']}: {r['polygon_flat_parts']:.0f} of its polygons have no area (equal or collinear "
                "points); they add nothing to the mask, the other parts are used"
            ),
            severity=Severity.WARNING,
        ),
        Rule(
            Check.BOX_POLYGON_MISMATCH,
            gxe.ExpectColumnValuesToBeBetween(column="box_polygon_iou", min_value=BOX_POLYGON_MIN_IOU),
            lambda r: (
                f"{r['where']}: bbox {r['bbox']} overlaps the bounds of its polygons by IoU "
                f"{r['box_polygon_iou']:.2f} (< {BOX_POLYGON_MIN_IOU:g}): the box and the mask describe different "
                "things; fix the one that is wrong (a box can be recomputed from the polygons)"
            ),
        ),
        Rule(
            Check.BAD_RLE,
            gxe.ExpectColumnValuesToBeNull(column="rle_error"),
            lambda r: f"{r['where']}: RLE segmentation does not decode: {r['rle_error']}",
        ),
        Rule(
            Check.RLE_SIZE_MISMATCH,
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="rle_hw", column_B="image_hw", ignore_row_if="either_value_is_missing"
            ),
            lambda r: (
                f"{r['where']}: RLE size is [{r['rle_hw']}] but its image is [{r['image_hw']}] "
                "(height, width); the mask was made for another image size"
            ),
        ),
    ]
    return rules


def category_rules() -> list[Rule]:
    """Rules over `records.category_table`. Names compare stripped, as the text prompts they become."""
    gxe = _gxe()
    return [
        *_key_rules("id", [INT_KIND], "an integer"),
        *_key_rules("name", [STR_KIND], "a non-empty string (it is the text prompt)"),
        Rule(
            Check.EMPTY_NAME,
            gxe.ExpectColumnValueLengthsToBeBetween(column="name_key", min_value=1),
            lambda r: f"{r['where']}: name {r['name']!r} is empty; the name is the text prompt, give it one",
        ),
        _duplicate_id_rule(Table.CATEGORIES),
        Rule(
            Check.DUPLICATE_CATEGORY_NAME,
            # blank names are empty_name problems, not duplicates of each other
            gxe.ExpectColumnValuesToBeUnique(
                column="name_key", row_condition='name_key != ""', condition_parser="pandas"
            ),
            lambda r: (
                f"{r['where']}: name {r['name']!r} is already used by categories[{r['first']}]; this category "
                "and its annotations are quarantined (categories are not merged); rename or merge it in the source"
            ),
            keep_first=True,
        ),
        _non_finite_rule(),
    ]


def usage_rules() -> list[Rule]:
    """Rules over `records.category_usage_table`."""
    return [
        Rule(
            Check.EMPTY_CATEGORY,
            _gxe().ExpectColumnValuesToBeBetween(column="annotations", min_value=1),
            lambda r: (
                f"category {r['id']} {r['name']!r} has no valid annotation in any split; it stays in the "
                "clean dataset, where it is only ever a negative prompt"
            ),
            severity=Severity.WARNING,
        ),
    ]


class SuiteRunner:
    """Validates record tables with great-expectations, in one ephemeral context per validation run.

    All tables go through one pandas dataframe asset: each table is a batch whose `dataframe` parameter is the
    table's frame, validated against a suite built from its rules.
    """

    def __init__(self) -> None:
        # Its INFO records (hundreds at import) are about its own internals, not the user's data; one of its modules
        # sets its own logger to INFO on import, so that one is quietened after the import.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)

        self._gx = gx
        context = gx.get_context(mode="ephemeral")
        # one progress bar per suite would flood the log; the stage shows its own over the images
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("validate").add_dataframe_asset("record_tables")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole_table")

    def check(self, table: RecordTable, rules: Sequence[Rule]) -> list[Problem]:
        """Problems of every row of `table` that fails a rule, in rule order then row order."""
        name = f"{table.split or 'dataset'}/{table.name}"
        suite = self._gx.ExpectationSuite(name=name)
        for number, rule in enumerate(rules):
            rule.expectation.meta = {"rule": number}  # results come back unordered; this finds each one's rule
            suite.add_expectation(rule.expectation)
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": table.frame})
        outcome = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        failing: dict[int, list[int]] = {}
        for result in outcome.results:
            number = result.expectation_config.meta["rule"]
            if result.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"great-expectations could not evaluate {rules[number].check} on {name}: "
                    f"{result.exception_info.get('exception_message')}"
                )
            indices = [int(i) for i in result.result.get("unexpected_index_list") or []]
            if not result.success and not indices:
                raise RuntimeError(f"{rules[number].check} failed on {name} without naming a row: {result.result}")
            failing[number] = indices
        problems = []
        for number, rule in enumerate(rules):
            problems += _rule_problems(table, rule, failing.get(number, []))
        return problems


def _rule_problems(table: RecordTable, rule: Rule, indices: list[int]) -> list[Problem]:
    frame = table.frame
    first_with_value: dict[Any, int] = {}
    problems = []
    for index in sorted(indices):
        row = frame.loc[index].to_dict()
        first = None
        if rule.keep_first:
            first = first_with_value.setdefault(row[rule.expectation.column], index)
            if first == index:
                continue
        by_position = table.split is not None  # the dataset-wide usage table is not a list in a file
        row["where"] = where(table.name, index, row["id"]) if by_position else None
        row["first"] = first
        problems.append(
            Problem(
                rule.check,
                rule.severity,
                rule.message(row),
                split=table.split,
                table=table.name,
                index=index if by_position else None,
                record_id=row["id"],
                file=table.file,
            )
        )
    return problems
