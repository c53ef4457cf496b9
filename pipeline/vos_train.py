"""`python -m pipeline vos-train --run-dir DIR [--dataset ROOT] [--params FILE] [--set vos.key.sub=value ...]`.

Fine-tunes a video tracker (SAM 2.1's `Sam2VideoModel` or SAM 3's `Sam3TrackerVideoModel`, `vos.model.source`) on
a VOS dataset (a MOSE-style root whose train/ holds JPEGImages/ and Annotations/) with the recipe of SAM 2.1's
training suite, every setting from params.yaml's `vos:` section. The run folder holds checkpoints/ (resumed
automatically: the same command goes on from the newest one), model/ (transformers format, loaded by plain
`Sam2VideoModel.from_pretrained` / `Sam3TrackerVideoModel.from_pretrained`), tensorboard/, train_stats.jsonl and
params.yaml. Several processes: `torchrun --nproc-per-node N -m pipeline vos-train ...` (NCCL on GPUs, gloo on
CPU); the run reads torchrun's environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipeline.stage_args import add_params_arguments, stage_params
from pipeline.vos_params import is_tiny, vos_dict, vos_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, type=Path, help="output folder of the run (resumed if present)")
    parser.add_argument("--dataset", help="VOS root with train/ (default: data/preprocessed/<vos.dataset.name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the vos params, check them, do not train")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.code_deps import code_fingerprint
    from sam3.errors import DataError
    from sam3.io import write_text
    from sam3.run_lock import run_lock

    params = stage_params(args)
    vos = params.vos
    dataset = Path(args.dataset or f"data/preprocessed/{vos.dataset.name}")
    check_tracker_source(vos.model.source)
    train_split = dataset / "train"
    if not (train_split / "JPEGImages").is_dir() or not (train_split / "Annotations").is_dir():
        raise DataError(
            f"{train_split}: no JPEGImages/ and Annotations/ here; vos-train reads a MOSE-style root whose train/ "
            "holds them (the vos-preprocess stage writes one)"
        )
    resolved = vos_dict(vos)
    if args.dry_run:
        print(yaml.safe_dump({"vos": resolved}, sort_keys=False), end="")
        print(f"# params OK; dataset {dataset}; run dir {args.run_dir}")
        return 0
    from sam3.video.train import train_vos

    # the code fingerprint joins the params stored in checkpoints: a run whose code changed starts over instead of
    # resuming the old code's checkpoint (as the image trainer does)
    job = vos_job(vos, dataset, args.run_dir, {"vos": resolved, "code": {"sha256": code_fingerprint(__name__)}})
    # held from before params.yaml is written to the end (train_vos takes it again: re-entrant), so a second trainer
    # on this run folder exits 2 naming the first before it writes anything (sam3.run_lock)
    with run_lock(args.run_dir, "training run"):
        write_text(args.run_dir / "params.yaml", yaml.safe_dump({"vos": resolved}, sort_keys=False))
        export_dir = train_vos(job)
    print(f"fine-tuned tracker: {export_dir}")
    return 0


def check_tracker_source(source: str, key: str = "vos.model.source") -> None:
    """ModelLoadError naming `key` unless `source` is a tiny built-in or a folder holding a tracker's config.json and
    weights (said before any data is read or model built)."""
    from sam3.errors import ModelLoadError

    if is_tiny(source):
        return
    folder = Path(source)
    accepted = "give tiny-sam2.1, tiny-sam3 or a transformers folder of Sam2VideoModel / Sam3TrackerVideoModel"
    if not folder.is_dir():
        raise ModelLoadError(f"{key}: model folder {folder} does not exist; {accepted}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{key}: {folder / 'config.json'} is missing; {accepted}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLoadError(f"{key}: {folder} holds no weights (*.safetensors); {accepted}")
