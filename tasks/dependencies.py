"""Which project files each DVC stage runs: its module and everything it imports, transitively.

``dvc.yaml`` lists each stage's code dependencies. A module the stage imports but does not
list would let an edit go unnoticed: ``dvc status`` says unchanged, and a rerun reports
"nothing new" on outputs the edited code would have changed. The imports are read from the
source (every ``import``, including the ones inside functions and the names a package
exports lazily; not those under ``if TYPE_CHECKING:``, which never run), so the list is
checked, never guessed:

``python -m tasks.dependencies`` prints each stage's project files and exits 1 naming every
one ``dvc.yaml`` misses (the test suite runs the same check).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import yaml

PROJECT_PACKAGES = ("milora", "tasks", "flows")  # the project's own code (the rest is installed)
ROOT = Path(__file__).resolve().parent.parent


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module ``name`` under ``root`` (a package's ``__init__.py``)."""
    path = root.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


@cache
def _lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS = {"name": "module", ...}`` (see :mod:`milora._lazy`)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in value.items()}
    return {}


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _own(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


def imported_modules(name: str, root: Path = ROOT) -> set[str]:
    """The project modules module ``name`` imports anywhere in its source."""
    path = module_file(name, root)
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if module_file(child, root) is not None:
                    found.add(child)
                else:
                    init = module_file(base, root)
                    lazy = _lazy_exports(init) if init is not None and init.name == "__init__.py" else {}
                    if alias.name in lazy:
                        found.add(lazy[alias.name])
    return {m for m in found if _own(m) and module_file(m, root) is not None}


def _with_parents(name: str) -> Iterable[str]:
    """``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c`` (each package's ``__init__``)."""
    parts = name.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts) + 1))


def stage_files(module: str, root: Path = ROOT) -> set[Path]:
    """Every project file that running ``python -m <module>`` may execute, relative to ``root``."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for step in _with_parents(name):
            if step not in seen:
                seen.add(step)
                todo.extend(imported_modules(step, root) - seen)
    return {module_file(name, root).relative_to(root) for name in seen if module_file(name, root) is not None}


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """``{stage: module}`` of every stage whose command is ``python -m <module>``."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    found = {}
    for stage, spec in stages.items():
        words = str(spec.get("cmd", "")).split()
        if "-m" in words and words.index("-m") + 1 < len(words):
            found[stage] = words[words.index("-m") + 1]
    return found


def _listed(dvc_yaml: Path, stage: str) -> list[Path]:
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    deps = stages[stage].get("deps") or []
    return [Path(str(dep)) for dep in deps if "${" not in str(dep)]


def missing_dependencies(root: Path = ROOT) -> dict[str, list[Path]]:
    """``{stage: [project files it runs that dvc.yaml does not list]}`` (empty: all listed);
    a listed folder covers every file under it."""
    dvc_yaml = root / "dvc.yaml"
    missing = {}
    for stage, module in stage_modules(dvc_yaml).items():
        listed = _listed(dvc_yaml, stage)
        uncovered = sorted(
            path for path in stage_files(module, root) if not any(path.is_relative_to(dep) for dep in listed)
        )
        if uncovered:
            missing[stage] = uncovered
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.dependencies", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project folder (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    for stage, module in stage_modules(root / "dvc.yaml").items():
        print(f"{stage} ({module}):")
        for path in sorted(stage_files(module, root)):
            print(f"  {path}")
    missing = missing_dependencies(root)
    for stage, paths in missing.items():
        print(f"dvc.yaml: stage {stage} misses deps: {', '.join(map(str, paths))}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
