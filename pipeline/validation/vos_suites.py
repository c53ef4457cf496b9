"""The VOS table rules as great-expectations suites, and the runner that turns failing rows into VosProblems.

Rules over `vos_tables` (errors quarantine the video of the row; warnings are reported only):
- frames:      (split, video, frame) unique: `duplicate_frame` (00001.jpg and 00001.png; the first file is not
               reported, the others are).
- annotations: has a frame (`annotation_without_frame`); its size equals its frame's (`annotation_size_mismatch`).
- videos:      at least one frame, one annotation, one object (`empty_video`); annotations <= frames
               (`more_annotations_than_frames`); numeric frame names in number order when sorted by name
               (`frames_out_of_order`).
- tracks:      ids in 1..254 (`void_label`, warning) and present in the first annotated frame
               (`object_not_in_first_frame`, warning).

Object ids that change meaning. Whether id 2 in frame 40 is the same object as id 2 in frame 3 cannot be told from
masks (objects move, are occluded and come back), so that is not claimed. What is checked is what a run depends
on: semi-supervised evaluation starts every object from the first annotated frame's mask, so an id first seen later
has nothing to start from (a warning: training samples objects from a clip's first frame and can still use it, and
MOSE/DAVIS train sets legitimately hold such ids); and palette index 255, DAVIS's "void" (an unlabelled region, not an
object), which our readers (`sam3.video.palette`) take as object 255 (a warning: set it to 0 if it means void).

great_expectations is imported inside functions: importing it takes seconds, and `--help` should not wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.validation.problems import Severity
from pipeline.validation.vos_layout import ANNOTATIONS_DIR, FRAMES_DIR
from pipeline.validation.vos_problems import VosCheck, VosProblem
from pipeline.validation.vos_tables import VosTables

MAX_OBJECT_ID = 254  # 255 is DAVIS's void label
FRAME_KEY = ["split", "video", "frame"]


@dataclass(frozen=True)
class VosRule:
    """One expectation over one table, the check it stands for, and the message for a failing row (given the row's
    columns as a dict). With `keep_first`, the first row of each value of `key` is not reported (duplicates)."""

    check: VosCheck
    expectation: Any  # a great_expectations.expectations.Expectation
    message: Callable[[dict[str, Any]], str]
    severity: Severity = Severity.ERROR
    key: tuple[str, ...] = ()  # keep_first rules: the columns whose repeated values the rule flags

    @property
    def keep_first(self) -> bool:
        return bool(self.key)


def _gxe() -> Any:
    import great_expectations.expectations as gxe

    return gxe


def frame_rules() -> list[VosRule]:
    return [
        VosRule(
            VosCheck.DUPLICATE_FRAME,
            _gxe().ExpectCompoundColumnsToBeUnique(column_list=FRAME_KEY),
            lambda r: (
                f"frame {r['frame']!r} has several files ({r['same_frame_files']}); loaders would take either: keep "
                "one file per frame"
            ),
            key=tuple(FRAME_KEY),
        )
    ]


def annotation_rules() -> list[VosRule]:
    gxe = _gxe()
    return [
        VosRule(
            VosCheck.ANNOTATION_WITHOUT_FRAME,
            gxe.ExpectColumnValuesToBeInSet(column="has_frame", value_set=[True]),
            lambda r: (
                f"annotation {r['path']} has no frame image {r['frame']}.jpg (or .jpeg, .png) in "
                f"{FRAMES_DIR}/{r['video']}/: add the frame or remove the annotation"
            ),
        ),
        VosRule(
            VosCheck.ANNOTATION_SIZE_MISMATCH,
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="size", column_B="frame_size", ignore_row_if="either_value_is_missing"
            ),
            lambda r: (
                f"annotation {r['path']} is {r['size']} but its frame {r['frame_path']} is {r['frame_size']} "
                "(width x height): the mask was drawn for another frame size"
            ),
        ),
    ]


def video_rules() -> list[VosRule]:
    gxe = _gxe()
    return [
        VosRule(
            VosCheck.EMPTY_VIDEO,
            gxe.ExpectColumnValuesToBeBetween(column="frames", min_value=1),
            lambda r: f"video {r['video']!r} has no frame image in {FRAMES_DIR}/{r['video']}/",
        ),
        VosRule(
            VosCheck.EMPTY_VIDEO,
            gxe.ExpectColumnValuesToBeBetween(column="annotations", min_value=1),
            lambda r: (
                f"video {r['video']!r} has no annotation PNG in {ANNOTATIONS_DIR}/{r['video']}/: no object to "
                "start tracking from or to train on"
            ),
        ),
        VosRule(
            VosCheck.EMPTY_VIDEO,
            # without annotations, the rule above says so; when none can be read, the file checks do
            gxe.ExpectColumnValuesToBeBetween(
                column="objects", min_value=1, row_condition="readable_annotations > 0", condition_parser="pandas"
            ),
            lambda r: (
                f"video {r['video']!r}: none of its {r['readable_annotations']} readable annotation PNG(s) holds an "
                "object (every pixel is 0, background)"
            ),
        ),
        VosRule(
            VosCheck.MORE_ANNOTATIONS_THAN_FRAMES,
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="frames", column_B="annotations", or_equal=True),
            lambda r: (
                f"video {r['video']!r} has {r['annotations']} annotation PNGs but only {r['frames']} frame images: "
                "some annotations belong to no frame (annotation_without_frame names them)"
            ),
        ),
        VosRule(
            VosCheck.FRAMES_OUT_OF_ORDER,
            gxe.ExpectColumnValuesToBeBetween(column="order_mismatches", max_value=0),
            lambda r: (
                f"video {r['video']!r}: its frame names are numbers of different widths, so {r['order_mismatches']} "
                f"frames take another place sorted by name ({r['name_order']}, ...) than by number "
                f"({r['number_order']}, ...); loaders list frames by name and would play it out of order: zero-pad "
                "the names (00001.jpg)"
            ),
        ),
    ]


def track_rules() -> list[VosRule]:
    gxe = _gxe()
    return [
        VosRule(
            VosCheck.VOID_LABEL,
            gxe.ExpectColumnValuesToBeBetween(column="object_id", min_value=1, max_value=MAX_OBJECT_ID),
            lambda r: (
                f"palette index {r['object_id']} in {r['frames']} annotation(s) from {r['first_path']} on: DAVIS's "
                "void label (an unlabelled region); it is read as object 255, tracked and scored like any object: "
                "set it to 0 if it means void"
            ),
            severity=Severity.WARNING,
        ),
        VosRule(
            VosCheck.OBJECT_NOT_IN_FIRST_FRAME,
            gxe.ExpectColumnValuesToBeInSet(column="in_first_annotated", value_set=[True]),
            lambda r: (
                f"object {r['object_id']} first appears in frame {r['first_frame']} ({r['first_path']}), not in the "
                f"first annotated frame {r['first_annotated']}: semi-supervised evaluation from the first frame has "
                "no mask to start it from (training samples objects from a clip's first frame and can use it)"
            ),
            severity=Severity.WARNING,
        ),
    ]


class VosSuiteRunner:
    """Validates the VOS tables with great-expectations in one ephemeral context: each table is a batch of one pandas
    dataframe asset, validated against a suite built from its rules."""

    def __init__(self) -> None:
        # its INFO records are about its own internals; one of its modules sets its logger to INFO on import
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        self._gx = gx
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # the stage shows its own bar
        asset = context.data_sources.add_pandas("vos_validate").add_dataframe_asset("vos_tables")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole_table")

    def check_all(self, tables: VosTables) -> list[VosProblem]:
        """Problems of every rule over every table (module docstring)."""
        return (
            self.check("frames", tables.frames, frame_rules())
            + self.check("annotations", tables.annotations, annotation_rules())
            + self.check("videos", tables.videos, video_rules())
            + self.check("tracks", tables.tracks, track_rules())
        )

    def check(self, name: str, frame: pd.DataFrame, rules: Sequence[VosRule]) -> list[VosProblem]:
        """Problems of every row of `frame` (the table `name`) that fails a rule, in rule order then row order."""
        if frame.empty:
            return []  # nothing to fail; great-expectations would only warn about an empty batch
        frame = frame.reset_index(drop=True)  # unexpected indices are positions
        suite = self._gx.ExpectationSuite(name=f"vos/{name}")
        for number, rule in enumerate(rules):
            rule.expectation.meta = {"rule": number}  # results come back unordered; this finds each one's rule
            suite.add_expectation(rule.expectation)
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        failing: dict[int, list[int]] = {}
        for result in outcome.results:
            number = result.expectation_config.meta["rule"]
            if result.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"great-expectations could not evaluate {rules[number].check} on the {name} table: "
                    f"{result.exception_info.get('exception_message')}"
                )
            indices = [int(i) for i in result.result.get("unexpected_index_list") or []]
            if not result.success and not indices:
                raise RuntimeError(f"{rules[number].check} failed on the {name} table without naming a row")
            failing[number] = sorted(indices)
        problems = []
        for number, rule in enumerate(rules):
            problems += _rule_problems(frame, rule, failing.get(number, []))
        return problems


def _rule_problems(frame: pd.DataFrame, rule: VosRule, indices: list[int]) -> list[VosProblem]:
    seen: set[tuple[Any, ...]] = set()
    problems = []
    for index in indices:
        row = frame.loc[index].to_dict()
        if rule.keep_first:
            key = tuple(row[column] for column in rule.key)
            if key not in seen:
                seen.add(key)  # the first row with the value keeps it
                continue
        problems.append(
            VosProblem(
                rule.check,
                rule.severity,
                rule.message(row),
                split=row["split"],
                video=row["video"],
                frame=row.get("frame"),
                file=row.get("path", row.get("first_path")),  # a track is named by its first annotation
            )
        )
    return problems
