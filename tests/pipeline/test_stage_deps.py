"""The house's shape: dvc.yaml's code dependencies follow the imports (test_dvc_deps_*), the committed dvc.yaml files
are what `pipeline.stages` generates, and the library never imports the pipeline (test_import_boundary_*).

How these were checked to fail: deleting `- sam3/box_ops.py` from dvc.yaml's train stage fails
test_dvc_deps_cover_every_module_a_stage_imports (naming the stage and the file) and
test_dvc_deps_committed_files_are_generated; adding `import pipeline.params` to sam3/losses.py fails
test_import_boundary_sam3_never_imports_pipeline; a lazy `from sam3 import guard` inside a function of
pipeline/evaluate.py, not yet regenerated, fails the dvc_deps tests.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import STAGES
from pipeline.code_deps import code_closure, module_path
from pipeline.dvc_yaml import documents

REPO = Path(__file__).resolve().parents[2]
DVC_FILES = ("dvc.yaml", "suites/rf100vl/dvc.yaml", "suites/odinw13/dvc.yaml")
COMMAND_MODULES = {name: module for name, module, _ in STAGES}


def committed_stages() -> list[tuple[str, str, dict]]:
    """(dvc file, stage name, stage) for every stage of the committed dvc.yaml files."""
    found = []
    for name in DVC_FILES:
        document = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
        found += [(name, stage, body) for stage, body in document["stages"].items()]
    return found


def stage_module(cmd: str) -> str:
    """The module a stage command runs, read from the command itself (`python -m pipeline <command> ...`)."""
    words = cmd.split()
    assert words[:3] == ["python", "-m", "pipeline"], cmd
    return COMMAND_MODULES[words[3]]


def test_dvc_deps_committed_files_are_generated() -> None:
    """dvc.yaml and the suites' are `python -m pipeline dvc-yaml`'s output, byte for byte."""
    for path, text in documents().items():
        assert (REPO / path).read_text(encoding="utf-8") == text, f"{path}: run `python -m pipeline dvc-yaml`"


@pytest.mark.parametrize("dvc_file, stage, body", committed_stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_dvc_deps_cover_every_module_a_stage_imports(dvc_file: str, stage: str, body: dict) -> None:
    """Every project file the stage's module can import (at any depth, lazily too) is among the stage's deps."""
    module = stage_module(body["cmd"])
    missing = sorted(set(code_closure(module)) - set(body["deps"]))
    assert not missing, f"{dvc_file} stage {stage} ({module}) lacks deps: {missing}"


@pytest.mark.slow
def test_dvc_deps_include_what_python_actually_loads() -> None:
    """A cross-check of the static reading against the interpreter: importing each stage module (and the lazy parts
    it imports when it runs) loads no project module outside its computed closure."""
    modules = sorted({stage_module(body["cmd"]) for _, _, body in committed_stages()})
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    before = set(sys.modules)\n"
        "    module = importlib.import_module(name)\n"
        "    for lazy in getattr(module, '__all__', []):\n"
        "        getattr(module, lazy, None)\n"
        "    out[name] = sorted(m for m in sys.modules if m.split('.')[0] in ('sam3', 'pipeline'))\n"
        "print(json.dumps(out))\n"
    )
    for module in modules:  # one fresh interpreter each, so modules loaded for one stage do not count for another
        result = subprocess.run(
            [sys.executable, "-c", script, module, "sam3.features"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)[module]
        files = {module_path(name).relative_to(REPO).as_posix() for name in loaded if module_path(name)}
        assert files <= set(code_closure(module)) | {"pipeline/__init__.py"}, (
            module,
            files - set(code_closure(module)),
        )


def test_dvc_deps_closure_follows_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The closure reader on a tiny package: a lazy import inside a function, a relative import, a module named
    in a string (importlib), a package's data file; third-party imports left out."""
    pkg = tmp_path / "sam3"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import json\n\ndef f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from sam3 import sub\nNAME = 'sam3.c'\n")
    (pkg / "c.py").write_text("")
    (pkg / "d.py").write_text("")  # imported by nobody
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "words.txt").write_text("x")
    assert code_closure("sam3.a", tmp_path) == [
        "sam3/__init__.py",
        "sam3/a.py",
        "sam3/b.py",
        "sam3/c.py",
        "sam3/sub/__init__.py",
        "sam3/sub/words.txt",
    ]


def project_imports(path: Path) -> set[str]:
    """Top-level package names of the absolute imports anywhere in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_import_boundary_sam3_never_imports_pipeline() -> None:
    """The library knows nothing of DVC, Prefect or the stages: no file under sam3/ imports pipeline (or tests)."""
    offenders = [
        p.relative_to(REPO) for p in (REPO / "sam3").rglob("*.py") if project_imports(p) & {"pipeline", "tests"}
    ]
    assert not offenders, f"sam3/ files importing pipeline or tests: {offenders}"


def test_import_boundary_library_tests_need_no_pipeline() -> None:
    """tests/sam3 test the library alone: they import no pipeline module, and the test helpers they use import none
    either, except tests/datasets.py, which only hands them the data the pipeline's generators make."""
    bridge = "datasets"
    helpers = {p.stem: p for p in (REPO / "tests").glob("*.py") if p.stem != bridge}
    offenders = []
    for path in (REPO / "tests" / "sam3").rglob("*.py"):
        if "pipeline" in project_imports(path):
            offenders.append(str(path.relative_to(REPO)))
        source = path.read_text(encoding="utf-8")
        for stem, helper in helpers.items():
            if f"tests.{stem}" in source and "pipeline" in project_imports(helper):
                offenders.append(f"{path.relative_to(REPO)} via tests/{stem}.py")
    assert not offenders, f"library tests that need pipeline/: {offenders}"
    assert project_imports(REPO / "tests" / f"{bridge}.py") <= {"pipeline", "__future__"}


def test_dvc_deps_code_fingerprint_makes_train_start_over_after_a_code_change(tmp_path: Path) -> None:
    """dvc repro re-runs train when its code changes; the run's fingerprint of that code (stored in every checkpoint)
    changes too, so train starts over instead of resuming the old code's last checkpoint. Unrelated files do not
    count."""
    from pipeline.code_deps import code_fingerprint
    from sam3.training.resume import changed_params

    pkg = tmp_path / "sam3"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from sam3 import b\n")
    (pkg / "b.py").write_text("X = 1\n")
    (pkg / "other.py").write_text("Y = 1\n")
    before = code_fingerprint("sam3.a", tmp_path)
    (pkg / "other.py").write_text("Y = 2\n")
    assert code_fingerprint("sam3.a", tmp_path) == before
    (pkg / "b.py").write_text("X = 2\n")
    after = code_fingerprint("sam3.a", tmp_path)
    assert after != before
    assert changed_params({"code": {"sha256": before}}, {"code": {"sha256": after}}) == [
        f"code.sha256: {before!r} -> {after!r}"
    ]
