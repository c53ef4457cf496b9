"""A stage's code dependencies: the project's source files its module can import, found by reading the code.

`dvc.yaml` lists, for each stage, the files whose change must re-run it. Written by hand, that list drifts from the
imports (a loss helper changes and `dvc repro` does not retrain). So it is generated: `code_closure("pipeline.train")`
follows every `import` / `from ... import` statement of the project's packages (sam3, pipeline), at any depth and
inside functions too (the stages import torch-heavy modules lazily), and returns the files:

- each imported module's file (a string naming a project module counts as an import: `importlib.import_module`
  and lazy export tables such as `sam3.features`' import by name), and the `__init__.py` of every package on its
  dotted path (importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`);
- the data files a package ships beside its modules (e.g. `pipeline/phrase_bank/*.txt`, read at run time);
- never the CLI dispatcher (`pipeline/__main__.py`, `pipeline/cli.py`): it imports each stage by name and prints
  errors; it changes no stage's output, and would otherwise make every stage depend on every other.

Third-party imports are left out (their versions are the environment's, not the repository's). Over-inclusion is
the safe side: an import under `if TYPE_CHECKING:` counts as well.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("sam3", "pipeline")
DISPATCHER = ("pipeline.__main__", "pipeline.cli")
REPO_ROOT = Path(__file__).resolve().parent.parent


def module_path(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of module `name` under `root` (a module file or a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT_PACKAGES


@cache
def imported_modules(name: str, root: Path = REPO_ROOT) -> frozenset[str]:
    """The project modules that module `name`'s source imports (anywhere in the file), as dotted names."""
    path = module_path(name, root)
    if path is None:
        return frozenset()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import name`: name may be a submodule (imported then) or an attribute of pkg
            found.update(f"{base}.{alias.name}" for alias in node.names if module_path(f"{base}.{alias.name}", root))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_project(node.value):
            found.add(node.value)  # a module imported by name (importlib, a PEP 562 lazy export table)
    return frozenset(m for m in found if _is_project(m) and module_path(m, root) is not None)


def module_closure(name: str, root: Path = REPO_ROOT) -> set[str]:
    """`name` and every project module reachable from it by imports, with their parent packages."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current in DISPATCHER:
            continue
        seen.add(current)
        parts = current.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(imported_modules(current, root))
    return seen


def package_data(package_dir: Path) -> list[Path]:
    """Non-Python files a package folder ships (read at run time), not its subpackages' nor caches."""
    return [
        p
        for p in package_dir.iterdir()
        if p.is_file() and p.suffix not in (".py", ".pyc") and not p.name.startswith(".")
    ]


def code_fingerprint(name: str, root: Path = REPO_ROOT) -> str:
    """sha256 over the path and bytes of every file of `code_closure(name)`: changes when any file the stage runs
    does (a training run records it, so that a checkpoint written by other code is not resumed)."""
    digest = hashlib.sha256()
    for relative in code_closure(name, root):
        digest.update(relative.encode() + b"\0" + (root / relative).read_bytes() + b"\0")
    return digest.hexdigest()


def code_closure(name: str, root: Path = REPO_ROOT) -> list[str]:
    """Sorted POSIX paths, relative to `root`, of every source and data file stage module `name` depends on."""
    files: set[Path] = set()
    for module in module_closure(name, root):
        path = module_path(module, root)
        assert path is not None  # imported_modules keeps only modules with a file
        files.add(path)
        if path.name == "__init__.py" and module not in PROJECT_PACKAGES:
            files.update(package_data(path.parent))
    return sorted(p.relative_to(root).as_posix() for p in files)
