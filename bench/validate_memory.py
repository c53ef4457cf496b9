"""Benchmark of the validate stage's memory: peak resident memory over the annotation file's size, one JSON line.

    python -m bench.validate_memory [--mb 100] [--images 2000] [--categories 10] [--points 30] [--keep DIR]

Builds a dataset whose train/_annotations.coco.json is about `--mb` megabytes (compact JSON as Roboflow exports
it: polygons of `--points` points with two decimals, boxes that are the polygons' bounds, `--images` 640x480 PNG
files), then runs `python -m pipeline validate` on it in a child process and reads the child's peak resident set
size (getrusage). The same command on a 3-image dataset gives the floor every run pays (interpreter, torch-free
imports, great-expectations): `baseline_mb`.

Output keys: file_mb, annotations, images, peak_mb, baseline_mb, ratio (peak_mb / file_mb), ratio_over_baseline
((peak_mb - baseline_mb) / file_mb), seconds (the validate run, wall), exit_code.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

WIDTH, HEIGHT = 640, 480


def _polygon(rng: random.Random, points: int) -> tuple[list[float], list[float]]:
    """A star-shaped polygon (flat x, y list, two decimals) inside the image, and its bounds as a COCO box."""
    cx, cy = rng.uniform(60, WIDTH - 60), rng.uniform(60, HEIGHT - 60)
    coords = []
    for k in range(points):
        angle = 2 * math.pi * k / points
        radius = rng.uniform(15, 50)
        coords += [round(cx + radius * math.cos(angle), 2), round(cy + radius * math.sin(angle), 2)]
    xs, ys = coords[0::2], coords[1::2]
    box = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
    return coords, box


def build(root: Path, megabytes: float, images: int, categories: int, points: int, seed: int = 0) -> dict:
    """Write the dataset under `root`; returns {annotations, images, file_mb}."""
    split = root / "train"
    split.mkdir(parents=True)
    blank = Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150))
    for i in range(images):
        blank.save(split / f"img_{i:05d}.png")
    rng = random.Random(seed)
    sample = []
    for i in range(50):  # the size of one annotation, to reach `megabytes`
        coords, box = _polygon(rng, points)
        record = {"id": i, "image_id": 0, "category_id": 1, "bbox": box, "area": 1.0, "segmentation": [coords]}
        sample.append(len(json.dumps(record, separators=(",", ":"))) + 1)
    count = int(megabytes * 1e6 / (sum(sample) / len(sample)))
    annotations = []
    for i in range(count):
        coords, box = _polygon(rng, points)
        annotations.append(
            {
                "id": i,
                "image_id": i % images,
                "category_id": 1 + i % categories,
                "bbox": box,
                "area": round(box[2] * box[3] * 0.7, 2),
                "segmentation": [coords],
                "iscrowd": 0,
            }
        )
    data = {
        "info": {"description": "bench.validate_memory"},
        "images": [{"id": i, "file_name": f"img_{i:05d}.png", "width": WIDTH, "height": HEIGHT} for i in range(images)],
        "categories": [{"id": c, "name": f"thing {c}", "supercategory": "things"} for c in range(1, categories + 1)],
        "annotations": annotations,
    }
    path = split / "_annotations.coco.json"
    path.write_text(json.dumps(data, separators=(",", ":")))
    return {"annotations": count, "images": images, "file_mb": round(path.stat().st_size / 1e6, 2)}


def peak_of_validate(dataset: Path, out: Path) -> tuple[float, float, int]:
    """(peak RSS in MB of 10^6 bytes, as file_mb; seconds; exit code) of `python -m pipeline validate` on
    `dataset`, in a fresh child."""
    script = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    command = [sys.executable, "-m", "pipeline", "validate", str(dataset), "--out", str(out)]
    command += ["--report", str(out.parent / f"{out.name}_report.json")]
    start = time.perf_counter()
    # a wrapper process per measurement: RUSAGE_CHILDREN holds the largest child's peak, so each gets its own
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr)
        raise SystemExit(f"validate failed with exit code {done.returncode}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])  # Linux reports ru_maxrss in KiB
    return peak_kib * 1024 / 1e6, seconds, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the annotation file to build")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--points", type=int, default=30, help="points per polygon")
    parser.add_argument("--keep", type=Path, help="build the dataset here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_validate_") as scratch:
        root = args.keep or Path(scratch)
        build(root / "small", 0.002, 3, 2, args.points)
        big = build(root / "big", args.mb, args.images, args.categories, args.points)
        baseline, _, _ = peak_of_validate(root / "small", root / "small_clean")
        peak, seconds, code = peak_of_validate(root / "big", root / "big_clean")
        file_mb = big["file_mb"]
        print(
            json.dumps(
                {
                    "file_mb": file_mb,
                    "annotations": big["annotations"],
                    "images": big["images"],
                    "peak_mb": round(peak, 1),
                    "baseline_mb": round(baseline, 1),
                    "ratio": round(peak / file_mb, 2),
                    "ratio_over_baseline": round((peak - baseline) / file_mb, 2),
                    "seconds": round(seconds, 1),
                    "exit_code": code,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
