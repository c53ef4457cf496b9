"""Benchmark of the preprocess stage: images per second for each (size, workers), one JSON object per line.

    python -m bench.preprocess [--dataset data/raw/demo] [--sizes 1008 256] [--workers 1 2] [--repeats 3]

At 1008 the demo images (128-640 px) all fit, so that line measures the copy path; at 256 the photos are resized
with their masks, which is the expensive path. Each setting runs `--repeats` times into a fresh temporary folder
and reports the median time, including the start of the worker processes (what a user waits for).
When the dataset folder is missing, the demo dataset is built into a temporary folder first (data/ is untouched).
Output keys: size, workers, images, resized, seconds, images_per_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from pipeline.preprocess import preprocess_dataset


def measure(dataset: Path, size: int, workers: int, repeats: int) -> dict:
    """Median wall time of `repeats` runs of preprocess_dataset(dataset, fresh folder, size, workers)."""
    seconds, summary = [], {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as out:
            summary = preprocess_dataset(dataset, Path(out) / "out", size=size, workers=workers)
        seconds.append(summary["seconds"])
    median = statistics.median(seconds)
    return {
        "size": size,
        "workers": workers,
        "images": summary["images"],
        "resized": summary["resized"],
        "seconds": round(median, 4),
        "images_per_s": round(summary["images"] / median, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("data/raw/demo"), help="COCO dataset (Roboflow layout)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1008, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as scratch:
        dataset = args.dataset
        if not dataset.is_dir():
            from pipeline.demo_data import build_demo_dataset

            dataset = Path(scratch) / "demo"
            build_demo_dataset(dataset)
        for size in args.sizes:
            for workers in args.workers:
                print(json.dumps(measure(dataset, size, workers, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
