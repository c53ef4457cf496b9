"""The stage contract: every stage command takes its paths, plus `--params FILE [--set section.key=value ...]`.

A stage reads its parameters from the typed `Params` (pipeline.params), never from flags of its own, so a value has
one source: params.yaml, as `dvc.yaml` lists it for the stage, with `--set` overrides on top (what the suites and the
Prefect flow pass). A few frequent settings also have a short flag for people at a shell (`preprocess --size 512`);
each is declared as a `Shorthand` and is exactly `--set <key>=<value>`, applied after the `--set` items.

    --params FILE   default: params.yaml in the current directory when it exists, else the built-in defaults
    --set K=V ...   `--set a=1 --set b=2` and `--set a=1 b=2` (what DVC's dict unpacking writes) alike

The command lines that DVC and Prefect run are built in one place, `pipeline.stages`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.params import Params, load_params

DEFAULT_PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Shorthand:
    """A short flag for one parameter: `flag VALUE` is `--set key=VALUE`.

    `nargs="+"` takes several values: a list parameter gets them as a list, a string parameter (such as
    `negatives.strategies`) joined by spaces."""

    flag: str  # e.g. "--size"
    key: str  # e.g. "preprocess.size"
    type: type = str
    nargs: str | None = None
    joined: bool = False  # nargs="+" values joined into one space-separated string (else a list)
    help: str = ""

    @property
    def dest(self) -> str:
        return "shorthand_" + self.flag.lstrip("-").replace("-", "_")

    def override(self, value: Any) -> str:
        """The `section.key=value` item this flag's parsed value stands for (values written as JSON, which YAML reads
        back unchanged: a quoted string stays a string, whatever it looks like)."""
        if self.nargs and self.joined:
            value = " ".join(str(v) for v in value)
        return f"{self.key}={json.dumps(value)}"


def add_params_arguments(parser: argparse.ArgumentParser, shorthands: tuple[Shorthand, ...] = ()) -> None:
    """`--params`, `--set` and the stage's shorthand flags."""
    parser.add_argument(
        "--params",
        metavar="FILE",
        help=f"parameter file (default: {DEFAULT_PARAMS_FILE} here when it exists, else the built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a parameter (several: --set a.b=1 c.d=2)",
    )
    for item in shorthands:
        parser.add_argument(
            item.flag,
            dest=item.dest,
            type=item.type,
            nargs=item.nargs,
            metavar=item.key.split(".")[-1].upper(),
            help=f"{item.help} (= --set {item.key}=...)" if item.help else f"= --set {item.key}=...",
        )


def overrides_of(args: argparse.Namespace, shorthands: tuple[Shorthand, ...] = ()) -> list[str]:
    """The `--set` items, then one per shorthand flag given."""
    given = [(item, getattr(args, item.dest, None)) for item in shorthands]
    return list(args.overrides) + [item.override(value) for item, value in given if value is not None]


def params_file_of(args: argparse.Namespace) -> str | None:
    """--params, else params.yaml when it exists here, else None (the built-in defaults)."""
    if args.params:
        return args.params
    return DEFAULT_PARAMS_FILE if Path(DEFAULT_PARAMS_FILE).is_file() else None


def stage_params(args: argparse.Namespace, shorthands: tuple[Shorthand, ...] = ()) -> Params:
    """The checked `Params` a stage runs with: the params file, `--set` items, then shorthand flags."""
    return load_params(params_file_of(args), overrides_of(args, shorthands))
