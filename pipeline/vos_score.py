"""Stage `vos-score`: J, F and J&F of video object segmentation predictions, as the DAVIS 2017 evaluation scores them.

    python -m pipeline vos-score --gt ANNOTATIONS_DIR --predictions PRED_DIR --out scores.json [--videos FILE]

Both folders hold indexed PNG label maps, <video>/<frame>.png (0 background, k object k). Every ground-truth video
is scored (or those listed in FILE, one name a line as in DAVIS's ImageSets); the first and the last frame of each
are not (see `sam3.video.metrics` for all the conventions). Model-free: the predictions may come from any tracker.
The JSON is written with indent 2 and sorted keys, so reruns on the same inputs are byte-identical.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sam3.errors import DataError
from sam3.io import write_json  # the library's atomic writer (indent 2, sorted keys, no NaN)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, type=Path, help="ground truth: ANNOTATIONS_DIR/<video>/<frame>.png")
    parser.add_argument("--predictions", required=True, type=Path, help="predictions: PRED_DIR/<video>/<frame>.png")
    parser.add_argument("--out", required=True, type=Path, help="scores file to write (json)")
    parser.add_argument("--videos", type=Path, help="score only the videos listed in this file (one name a line)")


def read_video_list(path: Path) -> list[str]:
    """The video names of an ImageSets-style file: one a line, surrounding spaces and blank lines ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the list of videos ({err})") from err
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path}: the list of videos is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # scored twice, it would weigh twice in the means
        raise DataError(f"{path}: video(s) listed more than once: {', '.join(repeated)}")
    return names


def _cell(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def format_table(scores: dict[str, Any]) -> str:
    """One row per video (its object count, J&F, J, F) and a last row with the global scores."""
    width = max([len("global"), *map(len, scores["per_video"])])
    lines = [f"{'video':<{width}}  objects     J&F       J       F"]
    for video, row in scores["per_video"].items():
        cells = "  ".join(_cell(row[key]) for key in ("J&F", "J", "F"))
        lines.append(f"{video:<{width}}  {len(row['objects']):7d}  {cells}")
    cells = "  ".join(_cell(scores[key]) for key in ("J&F", "J", "F"))
    lines.append(f"{'global':<{width}}  {scores['num_objects']:7d}  {cells}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sam3.video.metrics import evaluate_folders

    videos = None if args.videos is None else read_video_list(args.videos)
    scores = evaluate_folders(args.gt, args.predictions, videos=videos)
    write_json(args.out, scores)
    print(format_table(scores))
    print(f"wrote {args.out}")
    return 0
