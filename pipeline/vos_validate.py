"""Stage `vos-validate`: check a VOS dataset (DAVIS/MOSE layout), write a clean copy, a quarantine of the rejected
videos and a JSON report.

    python -m pipeline vos-validate --in ROOT --out CLEAN_ROOT --report report.json [--strict]
        [--max-pixels N] [--params FILE] [--set section.key=value ...]

Settings: params.yaml's `validate` section, shared with the image validation (`--max-pixels N` is short for
`--set validate.max_pixels=N`: a frame over it is quarantined unread, as a decompression bomb).

Layout (validation.vos_layout): ROOT/<split>/JPEGImages/<video>/<frame>.{jpg,jpeg,png} and
ROOT/<split>/Annotations/<video>/<frame>.png (indexed PNG: 0 background, k object k; annotations may be sparse), or
a DAVIS-style ROOT that is itself one split folder (label `all`) with optional ImageSets/<year>/<list>.txt.
A missing ROOT or one that is not this layout: DataError (exit 2), nothing written.

Per video, with a progress bar: open every frame and annotation (validation.vos_files: plain Python), and add its
rows to the frames, annotations, objects, tracks and videos tables (validation.vos_tables). Then the
great-expectations rules run over the tables (validation.vos_suites). Every problem with severity `error`
quarantines its whole video: a video is one sequence, and a hole in it spoils the clips drawn across it. Clean
videos are hard-linked (or copied) into CLEAN_ROOT with the input's layout, quarantined ones into
CLEAN_ROOT/_quarantine/<split>/<video>/ with reasons.json (validation.vos_output); ImageSets lists are carried along
with only their clean videos. Counts add up per split (videos = clean + quarantined; checked before the report is
written). The report (validation.vos_report) gives the exit code: 0 usable, 1 when a split has no clean video or
with --strict and any error.

Checks (report name: what it means; E quarantines the video, W is reported only):
    frame_unreadable E             a frame file PIL cannot identify or fully decode (or over --max-pixels)
    annotation_unreadable E        an annotation PNG that does not decode
    annotation_not_palette E       an annotation PNG that is not palette-indexed (read_label_map refuses it)
    link_outside_dataset E, broken_link E    a frame or annotation that is a link leading out, or nowhere
    annotation_without_frame E     an annotation PNG whose frame image is missing
    annotation_size_mismatch E     an annotation's width x height differs from its frame's
    more_annotations_than_frames E a video with more annotation PNGs than frame images
    empty_video E                  no frame, no annotation, or no object in any annotation
    duplicate_frame E              two files for one frame name (00001.jpg and 00001.png)
    frames_out_of_order E          numeric frame names that sort by name in another order than by number
    void_label W                   palette index 255 (DAVIS void) used as an object id
    object_not_in_first_frame W    an object id first seen after the video's first annotated frame
    unexpected_file W              a file or folder outside the layout; not copied
    listed_video_missing W         an ImageSets list names a video the split lacks; left out of the clean list
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from pipeline.stage_args import Shorthand, add_params_arguments, stage_params
from pipeline.validation.files import DEFAULT_MAX_PIXELS
from pipeline.validation.output import QUARANTINE_DIR, prepare_out_dir
from pipeline.validation.problems import Severity
from pipeline.validation.vos_files import FileFacts, inspect_annotation, inspect_frame
from pipeline.validation.vos_layout import (
    Layout,
    VideoFiles,
    find_layout,
    image_set_files,
    read_video_list,
    split_videos,
)
from pipeline.validation.vos_output import (
    CheckedVideo,
    write_clean_video,
    write_image_sets,
    write_quarantined_video,
)
from pipeline.validation.vos_problems import VosCheck, VosProblem
from pipeline.validation.vos_report import VosReport, VosSplitCounts, write_vos_report
from pipeline.validation.vos_tables import TableBuilder
from sam3.errors import ConfigError

log = logging.getLogger(__name__)

SHORTHANDS = (Shorthand("--max-pixels", "validate.max_pixels", int, help="largest width * height a frame may have"),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--in",
        dest="dataset_dir",
        type=Path,
        required=True,
        metavar="ROOT",
        help="VOS dataset: ROOT/<split>/{JPEGImages,Annotations}/<video>/ (MOSE) or ROOT/{JPEGImages,Annotations}/ "
        "(DAVIS)",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the clean dataset (and _quarantine/)")
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any error, even though it was quarantined")
    add_params_arguments(parser, SHORTHANDS)


def run(args: argparse.Namespace) -> int:
    params = stage_params(args, SHORTHANDS).validate
    report = validate_vos(args.dataset_dir, args.out, args.report, strict=args.strict, max_pixels=params.max_pixels)
    return report.exit_code


def _unexpected(paths: list[str], split: str | None) -> list[VosProblem]:
    return [
        VosProblem(
            VosCheck.UNEXPECTED_FILE,
            Severity.WARNING,
            f"{path} is not part of the VOS layout (JPEGImages/<video>/<frame>.jpg|.jpeg|.png, "
            "Annotations/<video>/<frame>.png, ImageSets/**/*.txt); not copied",
            split=split,
            video=_video_of(path),
            file=path,
        )
        for path in paths
    ]


def _video_of(path: str) -> str | None:
    """The video folder a path lies in (JPEGImages/<video>/x), None for a path outside any."""
    parts = path.split("/")
    for kind in ("JPEGImages", "Annotations"):
        if kind in parts[:-2]:
            return parts[parts.index(kind) + 1]
    return None


def _file_problems(video: VideoFiles, facts: dict[str, FileFacts], kind: str) -> list[VosProblem]:
    problems = []
    for name, found in facts.items():
        if found.check is None:
            continue
        path = video.frame_path(name) if kind == "frame" else video.annotation_path(name)
        # inspect_image's and locate's reasons read on from the file; read_label_map's are a sentence of their own
        separator = ": " if found.check in (VosCheck.ANNOTATION_UNREADABLE, VosCheck.ANNOTATION_NOT_PALETTE) else " "
        problems.append(
            VosProblem(
                found.check,
                Severity.ERROR,
                f"{kind} {path}{separator}{found.reason}",
                split=video.split.label,
                video=video.name,
                frame=Path(name).stem,
                file=path,
            )
        )
    return problems


def _check_video(
    root: Path, video: VideoFiles, max_pixels: int, builder: TableBuilder
) -> tuple[CheckedVideo, list[VosProblem]]:
    """Open the video's files, add its table rows; returns it checked and its file problems."""
    frames = {name: inspect_frame(root, video.frame_path(name), max_pixels) for name in video.frames}
    annotations = {name: inspect_annotation(root, video.annotation_path(name)) for name in video.annotations}
    builder.add_video(video, frames, annotations)
    object_ids = {obj.object_id for facts in annotations.values() for obj in facts.objects}
    checked = CheckedVideo(
        video,
        {name: facts.path for name, facts in frames.items()},
        {name: facts.path for name, facts in annotations.items()},
        len(object_ids),
    )
    problems = _unexpected(video.unexpected, video.split.label)
    return checked, problems + _file_problems(video, frames, "frame") + _file_problems(video, annotations, "annotation")


def _listed_missing(root: Path, lists: list[str], split: str, names: set[str]) -> list[VosProblem]:
    problems = []
    for relative in lists:
        for name in read_video_list(root / relative):
            if name not in names:
                problems.append(
                    VosProblem(
                        VosCheck.LISTED_VIDEO_MISSING,
                        Severity.WARNING,
                        f"{relative} lists video {name!r}, which the split has no folder for; left out of the clean "
                        "list",
                        split=split,
                        video=name,
                        file=relative,
                    )
                )
    return problems


def _split_counts(videos: list[CheckedVideo], errors: dict[tuple[str, str], list[VosProblem]]) -> VosSplitCounts:
    clean = [v for v in videos if v.key not in errors]
    reasons: defaultdict[str, int] = defaultdict(int)
    for video in videos:
        for check in sorted({str(p.check) for p in errors.get(video.key, [])}):
            reasons[check] += 1
    counts = VosSplitCounts(
        videos=len(videos),
        videos_clean=len(clean),
        videos_quarantined=len(videos) - len(clean),
        frames=sum(len(v.files.frames) for v in videos),
        frames_clean=sum(len(v.files.frames) for v in clean),
        annotations=sum(len(v.files.annotations) for v in videos),
        annotations_clean=sum(len(v.files.annotations) for v in clean),
        objects_clean=sum(v.object_ids for v in clean),
        quarantined_by_reason=dict(sorted(reasons.items())),
    )
    if counts.videos_clean + counts.videos_quarantined != counts.videos or counts.videos_quarantined != sum(
        v.key in errors for v in videos
    ):
        raise RuntimeError(f"bug: video counts do not add up: {counts}")
    return counts


def validate_vos(
    dataset_dir: str | Path,
    out_dir: str | Path,
    report_path: str | Path,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VosReport:
    """Validate the VOS dataset at `dataset_dir`, write the clean copy and quarantine to `out_dir` and the report to
    `report_path` (module docstring).

    Raises DataError when `dataset_dir` is missing or not a VOS layout, ConfigError for unusable arguments (and an
    --out that overlaps the dataset); nothing is written then.
    """
    root, out_dir, report_path = Path(dataset_dir), Path(out_dir), Path(report_path)
    if max_pixels <= 0:
        raise ConfigError(f"--max-pixels must be > 0, got {max_pixels}")
    layout: Layout = find_layout(root)
    problems = _unexpected(layout.unexpected, None)
    videos: list[VideoFiles] = []
    lists: dict[str, list[str]] = {}
    for split in layout.splits:
        found, unexpected = split_videos(root, split)
        lists[split.label], other = image_set_files(root, split)
        problems += _unexpected(unexpected + other, split.label)
        problems += _listed_missing(root, lists[split.label], split.label, {v.name for v in found})
        videos += found
    prepare_out_dir(out_dir, root)

    builder = TableBuilder()
    checked: list[CheckedVideo] = []
    for video in tqdm(videos, desc="vos-validate", unit="video"):
        result, found = _check_video(root, video, max_pixels, builder)
        checked.append(result)
        problems += found
    from pipeline.validation.vos_suites import VosSuiteRunner  # imports great-expectations (seconds)

    problems += VosSuiteRunner().check_all(builder.tables())
    split_order = {split.label: number for number, split in enumerate(layout.splits)}
    problems.sort(key=lambda p: p.sort_key(split_order))

    by_video: defaultdict[tuple[str, str], list[VosProblem]] = defaultdict(list)
    for problem in problems:
        by_video[(problem.split or "", problem.video or "")].append(problem)
    errors = {
        key: errs for key, found in by_video.items() if (errs := [p for p in found if p.severity == Severity.ERROR])
    }
    for video in checked:
        if video.key in errors:
            write_quarantined_video(video, by_video[video.key], out_dir)
        else:
            write_clean_video(video, out_dir)

    counts, quarantined, image_sets = {}, {}, {}
    for split in layout.splits:
        in_split = [v for v in checked if v.files.split == split]
        counts[split.label] = _split_counts(in_split, errors)
        quarantined[split.label] = {
            v.files.name: sorted({str(p.check) for p in errors[v.key]}) for v in in_split if v.key in errors
        }
        clean = {v.files.name for v in in_split if v.key not in errors}
        image_sets |= write_image_sets(root, out_dir, lists[split.label], clean, set(quarantined[split.label]))
    report = VosReport(str(root), layout.kind, counts, problems, quarantined, image_sets, strict)
    write_vos_report(report_path, report)

    for line in report.summary():
        log.info("%s", line)
    log.info("clean dataset: %s, quarantine: %s, report: %s", out_dir, out_dir / QUARANTINE_DIR, report_path)
    if report.exit_code:
        log.error("exit 1: %s", "; ".join(report.unusable_reasons) or f"--strict and {len(report.errors)} error(s)")
    return report
