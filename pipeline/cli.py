"""`python -m pipeline <command>`: one subcommand per stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int` (the exit code) and keeps its heavy
imports (torch, great-expectations) inside functions, so `--help` and light commands start fast.
A `Sam3Error` (the user's data, files or parameters are wrong) is printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection

from pipeline.logs import configure_logging
from sam3.errors import Sam3Error

# (command, module, help). Modules are imported only for the command being run: several import torch and
# transformers (seconds), which validate, preprocess, aggregate or `--help` never need.
STAGES = (
    ("fetch", "pipeline.fetch", "download RF100-VL or check ODinW13 and complete its few-shot files"),
    ("demo-data", "pipeline.demo_data", "build the demo dataset from images shipped inside registry packages"),
    ("shapes-data", "pipeline.shapes_data", "generate a coloured-shapes dataset (prompts such as 'red circle')"),
    ("check", "pipeline.check", "check params.yaml, the model source and the dataset before any stage runs"),
    ("validate", "pipeline.validate", "check a COCO dataset; write the clean copy, a quarantine and a JSON report"),
    ("preprocess", "pipeline.preprocess", "resize a dataset to fit SIZE x SIZE, transforming boxes and masks to match"),
    ("negatives", "pipeline.negatives", "per-image negative prompts: absent categories, phrase-bank neighbours, mined"),
    (
        "cache-features",
        "pipeline.cache_features",
        "run the frozen encoders once per image and prompt; store their outputs",
    ),
    ("train", "pipeline.train", "fine-tune SAM 3 from params.yaml (resumes; local, multi-process or SLURM)"),
    ("evaluate", "pipeline.evaluate", "box/mask AP and SA-Co metrics of a model on a split, with an optional baseline"),
    ("predict", "pipeline.predict", "detect and segment prompts in images, folders and videos; COCO JSON, overlays"),
    (
        "score",
        "pipeline.score",
        "COCO AP and SA-Co metrics (cgF1, IL_MCC, pmF1) of a predictions file, no model needed",
    ),
    (
        "aggregate",
        "pipeline.aggregate",
        "suite tables: RF100-VL mean AP per domain, ODinW13 mean and spread over seeds",
    ),
    ("vos-shapes-data", "pipeline.vos_shapes", "generate a VOS dataset of moving, occluding coloured shapes"),
    ("vos-demo-data", "pipeline.vos_demo_data", "a real 5-frame VOS video from the labelme source distribution"),
    ("vos-validate", "pipeline.vos_validate", "check a VOS dataset (DAVIS/MOSE layout): clean copy, quarantine"),
    ("vos-preprocess", "pipeline.vos_preprocess", "resize a VOS dataset's frames and masks for the tracker"),
    ("vos-train", "pipeline.vos_train", "fine-tune SAM 2.1's or SAM 3's video tracker (params.yaml's vos:)"),
    ("vos-evaluate", "pipeline.vos_evaluate", "J&F of a fine-tuned tracker and its starting model; report, figures"),
    ("vos-score", "pipeline.vos_score", "J, F and J&F of palette-PNG predictions against annotations (DAVIS 2017)"),
    (
        "dvc-yaml",
        "pipeline.dvc_yaml",
        "write dvc.yaml and the suites' dvc.yaml from pipeline/stages.py (--check: only compare)",
    ),
    (
        "suite-params",
        "pipeline.suite_params",
        "list a suite's datasets found on disk in suites/<suite>/params.yaml (DVC)",
    ),
)
COMMANDS = tuple(name for name, _, _ in STAGES)


def build_parser(complete: Collection[str] = COMMANDS) -> argparse.ArgumentParser:
    """The CLI parser. Only the commands in `complete` have their module imported and their arguments added; the
    others are listed (for --help) but cannot be parsed. The default completes every command."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in STAGES:
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in complete:
            module = importlib.import_module(module_name)
            module.add_arguments(stage_parser)
            stage_parser.set_defaults(run=module.run)
    return parser


def requested_command(argv: list[str]) -> str | None:
    """The first known command name in `argv` (the options before it take no values), or None."""
    return next((arg for arg in argv if arg in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = requested_command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.run(args))
    except Sam3Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
