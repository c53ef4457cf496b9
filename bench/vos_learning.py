"""Learning is real for video: train the tiny tracker from scratch on generated VOS shapes, measure held-out J&F.

    python -m bench.vos_learning                        # 2 seeds x 1,500 steps: about 8 minutes of training on 2 cores
    python -m bench.vos_learning --steps 500 --seeds 0  # one seed, 500 steps
    python -m bench.vos_learning --source tiny-sam3     # SAM 3's tracker architecture instead of SAM 2.1's

Per seed: the generated dataset (`pipeline.vos_shapes`, MOSE layout; the same data for every seed), the tiny model
(`sam3.video.tracker.build_tracker`, random weights) scored semi-supervised on the valid split (first-frame masks in,
palette PNGs out, J&F as DAVIS 2017: sam3.video.metrics) = jf_before; then trained with the real trainer
(`sam3.video.train.train_vos`: the recipe's forward with prompts, correction clicks and memory, the recipe's loss)
for --steps optimiser steps (a fixed count, so a rerun trains the same steps on any machine; `seconds` says what they
took here); then scored again: jf_after. The optimiser settings are for training from scratch, not the fine-tuning
recipe's (lr 5e-6 barely moves a random model in minutes): lr 1e-3 everywhere, no layer decay, weight decay 1e-4,
gradient clip 1.0, 20 warm-up steps. Clips are --frames long (default 4, the recipe's 8 costs twice the time per
step) with up to 3 objects.

Prints one JSON object: jf_before, jf_after (means over seeds), seconds (training wall time, all seeds), per_seed
[{seed, jf_before, jf_after, J/F before and after, steps, seconds, train_loss_first, train_loss_last}], settings,
machine, date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.vos_shapes import build_vos_shapes
from sam3.video.config import ClipConfig, PromptConfig, VosJob, VosLoopConfig, VosOptimConfig
from sam3.video.inference import predict_split
from sam3.video.metrics import evaluate_folders
from sam3.video.tracker import build_tracker, model_image_size
from sam3.video.train import train_vos

DATASET_SEED = 0


def score(source: str, split_dir: Path, out: Path) -> dict:
    """J, F, J&F of the model at `source` on `split_dir` (semi-supervised, first-frame masks)."""
    model = build_tracker(source).eval()
    predict_split(model, split_dir, out, progress=False)
    scores = evaluate_folders(split_dir / "Annotations", out, progress=False)
    return {key: scores[key] for key in ("J", "F", "J&F")}


def job_for(args: argparse.Namespace, dataset: Path, run_dir: Path, seed: int, steps: int) -> VosJob:
    return VosJob(
        dataset_dir=str(dataset),
        run_dir=str(run_dir),
        model_source=args.source,
        clip=dataclasses.replace(ClipConfig(), num_frames=args.frames, max_objects=3),
        prompts=PromptConfig(),
        optim=VosOptimConfig(
            lr=args.lr, lr_vision=args.lr, layer_decay=1.0, weight_decay=1e-4, grad_clip=1.0, warmup=20
        ),
        loop=VosLoopConfig(
            max_steps=steps, seed=seed, checkpoint_every=50, keep_last=1, log_every=10,
            threads=args.threads, drop_path=0.0,
        ),
        params={"bench": "vos_learning", "seed": seed, "steps": steps},
    )  # fmt: skip


def train_losses(run_dir: Path) -> list[float]:
    path = run_dir / "train_stats.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record["loss"] for record in records if "loss" in record]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps per seed (one clip each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--source", default="tiny-sam2.1", choices=["tiny-sam2.1", "tiny-sam3"])
    parser.add_argument("--frames", type=int, default=4, help="frames per training clip")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-videos", type=int, default=48)
    parser.add_argument("--valid-videos", type=int, default=8)
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="vos_learning_"))
    size = None
    per_seed, total_seconds = [], 0.0
    for seed in args.seeds:
        if size is None:
            size = model_image_size(build_tracker(args.source))
            dataset = work / "data"
            build_vos_shapes(dataset, args.train_videos, args.valid_videos, 16, size, DATASET_SEED)
        before = score(args.source, dataset / "valid", work / f"pred_before_{seed}")
        steps = args.steps
        run_dir = work / f"run_{seed}"
        start = time.perf_counter()
        model_dir = train_vos(job_for(args, dataset, run_dir, seed, steps))
        seconds = time.perf_counter() - start
        total_seconds += seconds
        after = score(str(model_dir), dataset / "valid", work / f"pred_after_{seed}")
        losses = train_losses(run_dir)
        per_seed.append(
            {
                "seed": seed,
                "jf_before": before["J&F"],
                "jf_after": after["J&F"],
                "before": before,
                "after": after,
                "steps": steps,
                "seconds": round(seconds, 1),
                "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None,
            }
        )
        print(json.dumps(per_seed[-1]), file=sys.stderr)
    result = {
        "jf_before": sum(item["jf_before"] for item in per_seed) / len(per_seed),
        "jf_after": sum(item["jf_after"] for item in per_seed) / len(per_seed),
        "seconds": round(total_seconds, 1),
        "per_seed": per_seed,
        "settings": {
            "source": args.source, "image_size": size, "frames": args.frames, "lr": args.lr, "threads": args.threads,
            "train_videos": args.train_videos, "valid_videos": args.valid_videos, "steps": args.steps,
        },
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench.vos_learning " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
