"""`python -m pipeline train --run-dir DIR [--params FILE] [--set section.key=value ...] [--dry-run]`.

Reads params.yaml into typed sections, writes the resolved params next to the run, and starts training:
- `launcher.kind: local` with `launcher.gpus_per_node: 1` (or no GPU and 1 process): trains in this process;
- `launcher.kind: local` with more processes: starts them with torchrun's elastic launcher on this node
  (NCCL on GPUs, gloo on CPU);
- `launcher.kind: slurm`: submits a job through submitit (nodes x GPUs per node, partition, account, qos, time),
  requeued on preemption; the job resumes from the run's newest checkpoint. `--datasets A B C` makes a job array,
  one run per dataset under RUN_DIR/<dataset name>, reading its feature cache (cache.enabled) from
  FEATURE_CACHE/<dataset name> (default data/features/<dataset name>). The job gets the same plain-valued TrainJob
  as a local run (paths relative to the submission folder, where SLURM starts the job); the cache folders and the
  --train-annotations file are checked before submitting, so a job never waits in the queue to fail on them.
The run folder holds checkpoints/ (with validation, best.pt too), model/ (transformers format: the last or the best
weights, train.export), tensorboard/, train_stats.jsonl, params.yaml, and plots/training.png (loss terms, learning
rates and validation over steps, drawn from train_stats.jsonl when a local run ends). model.source is checked from its
files before anything else (also by --dry-run): a missing or incomplete folder stops the run at once. The same
command with a larger train.max_steps (or train.epochs) goes on from the run's checkpoint; a total below the
checkpoint's step exits 2 naming it.
One trainer per run folder: a second one (a second `dvc repro`, a double-started flow) exits 2 naming the holder,
before it writes anything (sam3.run_lock).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import yaml

from pipeline.params import Params, to_dict
from pipeline.plots import TRAINING_PNG
from pipeline.stage_args import add_params_arguments, params_file_of, stage_params
from pipeline.train_job import build_job, write_resolved_params
from sam3.coco import ANNOTATIONS_FILE
from sam3.config import TRAIN_STATS_FILE
from sam3.model_files import check_model_source

PLOTS_FOLDER = "plots"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, type=Path, help="output folder of the run (resumed if present)")
    parser.add_argument("--dataset", help="dataset folder (default: data/preprocessed/<dataset.name>)")
    parser.add_argument("--negatives", help="negatives file {image_id: [phrases]} (optional)")
    parser.add_argument(
        "--feature-cache",
        help="feature cache read when cache.enabled (default: data/features/<dataset.name>; with --datasets, the "
        "folder holding one cache per dataset name, default data/features)",
    )
    parser.add_argument(
        "--train-annotations",
        default=ANNOTATIONS_FILE,
        help=f"annotation file of the dataset's train folder to train on (default {ANNOTATIONS_FILE}; ODinW: "
        "fewshot_train_shot10_seed<S>.json)",
    )
    parser.add_argument("--datasets", nargs="+", help="SLURM job array: one run per dataset folder")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved params, check them, do not train")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sam3.coco import present_splits
    from sam3.run_lock import run_lock

    params = stage_params(args)
    dataset = args.dataset or f"data/preprocessed/{params.dataset.name}"
    check_model_source(params.model.source, "model.source")
    if args.dry_run:
        print(yaml.safe_dump(to_dict(params), sort_keys=False), end="")
        if not args.datasets:
            present_splits(dataset)  # the dataset must exist: DataError otherwise
            check_train_annotations(dataset, args.train_annotations)
        print(f"# params OK; dataset {args.datasets or dataset}; run dir {args.run_dir}")
        return 0
    if params.launcher.kind == "slurm":
        from pipeline.launch import submit_slurm

        datasets = args.datasets or [dataset]
        caches = feature_cache_dirs(args.feature_cache, params, datasets)
        for folder in datasets:
            check_train_annotations(folder, args.train_annotations)
        if params.cache.enabled:
            check_feature_caches(datasets, caches, args)
        submit_slurm(params, args.run_dir, datasets, args.negatives, args.train_annotations, caches)
        return 0
    if args.datasets:
        from sam3.errors import ConfigError

        raise ConfigError("--datasets (a job array) needs launcher.kind=slurm; run datasets one by one locally")
    check_train_annotations(dataset, args.train_annotations)
    (feature_cache,) = feature_cache_dirs(args.feature_cache, params, [dataset])
    job = build_job(params, args.run_dir, dataset, args.negatives, args.train_annotations, feature_cache)
    # held from before params.yaml is written to the end; train() takes it again (re-entrant), and the workers of
    # a multi-process run are covered by it as this process's children (sam3.run_lock)
    with run_lock(args.run_dir, "training run"):
        write_resolved_params(params, args.run_dir)
        processes = params.launcher.nodes * params.launcher.gpus_per_node
        if processes > 1:
            from pipeline.launch import launch_local

            launch_local(job, params.launcher.gpus_per_node)
        else:
            from sam3.trainer import train

            export_dir = train(job)
            print(f"fine-tuned model: {export_dir}")
        stats = args.run_dir / TRAIN_STATS_FILE
        if stats.is_file():
            from pipeline.plots import training_figure

            print(f"training curves: {training_figure(stats, args.run_dir / PLOTS_FOLDER / TRAINING_PNG)}")
    return 0


def check_train_annotations(dataset: str, name: str) -> None:
    """DataError when DATASET/train/NAME is not a file (said before any model is built)."""
    from sam3.errors import DataError

    path = Path(dataset) / "train" / name
    if not path.is_file():
        raise DataError(
            f"{path}: --train-annotations file not found; give a file of the train folder (few-shot files are "
            "written by `python -m pipeline validate --fewshot-seeds ...` into the clean copy)"
        )


def feature_cache_dirs(given: str | None, params: Params, datasets: list[str]) -> list[str]:
    """The feature cache folder of each dataset's run. One dataset: `given` (--feature-cache) or
    data/features/<dataset.name>, as the DVC stage writes it. Several (a SLURM job array, whose runs go to
    RUN_DIR/<dataset folder name>): <given or data/features>/<dataset folder name> each."""
    if len(datasets) == 1:
        return [given or f"data/features/{params.dataset.name}"]
    base = Path(given or "data/features")
    return [str(base / Path(folder).name) for folder in datasets]


def check_feature_caches(datasets: list[str], caches: list[str], args: argparse.Namespace) -> None:
    """ConfigError naming every dataset's feature cache folder that holds no enabled cache, with the command that
    builds it. Reads the manifests only (no model is loaded): the job itself checks the full key before training."""
    from sam3.errors import ConfigError
    from sam3.features.manifest import read_manifest

    missing = []
    for dataset, folder in zip(datasets, caches, strict=True):
        manifest = read_manifest(Path(folder))
        if manifest is None or not manifest.get("enabled"):
            state = "holds no feature cache" if manifest is None else "was written with cache.enabled false"
            missing.append(f"{folder} {state} (build it: {cache_command(dataset, folder, args)})")
    if missing:
        raise ConfigError(f"cache.enabled is true but {'; '.join(missing)}; nothing was submitted")


def cache_command(dataset: str, folder: str, args: argparse.Namespace) -> str:
    """The cache-features command that builds `folder` for this run (same params file, overrides and files)."""
    parts = ["python", "-m", "pipeline", "cache-features", dataset, "--out", folder]
    params_file = params_file_of(args)
    if params_file:  # else the built-in defaults, which cache-features reads too
        parts += ["--params", params_file]
    if args.overrides:
        parts += ["--set", *args.overrides]
    if args.negatives:
        parts += ["--negatives", args.negatives]
    if args.train_annotations != ANNOTATIONS_FILE:
        parts += ["--train-annotations", args.train_annotations]
    return shlex.join(parts)
