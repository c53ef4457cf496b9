"""`python -m pipeline <command>`: one subcommand per stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int` (the exit code) and keeps its heavy
imports (torch, great-expectations) inside functions, so `--help` and light commands start fast.
A `Sam3Error` (the user's data, files or parameters are wrong) is printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import (
    aggregate,
    demo_data,
    evaluate,
    fetch,
    negatives,
    predict,
    preprocess,
    score,
    shapes_data,
    train,
    validate,
)
from sam3.errors import Sam3Error

STAGES = (
    ("fetch", fetch, "download RF100-VL or check ODinW13 and complete its few-shot files"),
    ("demo-data", demo_data, "build the demo dataset from images shipped inside registry packages"),
    ("shapes-data", shapes_data, "generate a coloured-shapes dataset (prompts such as 'red circle')"),
    ("validate", validate, "check a COCO dataset; write the clean copy, a quarantine and a JSON report"),
    ("preprocess", preprocess, "resize a dataset to fit SIZE x SIZE, transforming boxes and masks to match"),
    ("negatives", negatives, "per-image negative prompts: absent categories, phrase-bank neighbours, mined"),
    ("train", train, "fine-tune SAM 3 from params.yaml (resumes; local, multi-process or SLURM)"),
    ("evaluate", evaluate, "box/mask AP and SA-Co metrics of a model on a split, with an optional baseline"),
    ("predict", predict, "detect and segment prompts in images; COCO JSON and overlay PNGs"),
    ("score", score, "COCO AP and SA-Co metrics (cgF1, IL_MCC, pmF1) of a predictions file, no model needed"),
    ("aggregate", aggregate, "suite tables: RF100-VL mean AP per domain, ODinW13 mean and spread over seeds"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in STAGES:
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args))
    except Sam3Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
