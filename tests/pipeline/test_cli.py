"""The CLI imports only the module of the command it runs, so light commands and --help start fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, build_parser, requested_command

PROBE = """
import contextlib, io, sys
from pipeline.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "transformers", "great_expectations", "pipeline.train") if m in sys.modules))
"""


def _modules_after(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_help_imports_no_stage_module():
    assert _modules_after(["--help"]) == "[]"


def test_a_command_imports_its_own_module_only():
    # score's --help: its module is light; train's would pull torch in
    assert _modules_after(["score", "--help"]) == "[]"
    assert "'pipeline.train'" in _modules_after(["train", "--help"])


def test_requested_command_is_the_first_command_name():
    assert requested_command(["-v", "train", "--run-dir", "validate"]) == "train"
    assert requested_command(["--help"]) is None


@pytest.mark.parametrize("command", COMMANDS)
def test_the_complete_parser_knows_every_command(command):
    # build_parser() with no argument completes every command: each one's own --help works
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
