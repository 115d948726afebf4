"""Rules of the code's shape, checked on the source: which stack each layer may import, and
that every DVC stage depends on every project module it runs."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_project

from tasks.dependencies import imported_modules, missing_dependencies, stage_files, stage_modules
from tasks.reproduce import changed, stage_env

ORCHESTRATION = ("prefect", "mlflow", "dvc", "great_expectations")
MLFLOW_FILES = {Path("tasks/registry.py"), Path("tasks/serving_model.py")}  # the registry seam


def imports_of(path: Path) -> set[str]:
    """Top-level package names ``path`` imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def code_files(*folders: str) -> list[Path]:
    return sorted(p.relative_to(REPO) for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_the_library_imports_no_orchestration_stack():
    offenders = {str(p): sorted(imports_of(REPO / p) & set(ORCHESTRATION)) for p in code_files("milora")}
    assert {p: found for p, found in offenders.items() if found} == {}


def test_only_the_registry_module_talks_to_mlflow():
    users = {
        p for p in code_files("milora", "tasks", "flows", "benchmarks") if "mlflow" in imports_of(REPO / p)
    }
    assert users == MLFLOW_FILES


def test_dvc_yaml_lists_every_module_each_stage_imports():
    assert set(stage_modules(REPO / "dvc.yaml")) == {
        "ingest",
        "validate",
        "parent",
        "init",
        "train",
        "evaluate",
    }
    assert missing_dependencies(REPO) == {}


def test_stage_imports_are_read_from_the_source():
    init = stage_files("tasks.init")
    named_in_the_issue = {
        "cache.py",
        "targets.py",
        "adapter_io.py",
        "modeling.py",
        "config.py",
        "initialize.py",
    }
    assert {Path("milora") / name for name in named_in_the_issue} <= init
    assert Path("tasks/init.py") in init and Path("tasks/__init__.py") in init
    assert Path("milora/evaluation/generation.py") not in init  # init runs no evaluation
    # `from milora.training import run_training` is a lazy export of milora.training.run.
    assert Path("milora/training/run.py") in stage_files("tasks.train")
    assert "milora.training.run" in imported_modules("tasks.train")


def test_the_check_names_a_module_dvc_yaml_misses(tmp_path):
    for name in ("milora", "tasks"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text()
    init = text.index("  init:")
    edited = text[:init] + text[init:].replace("      - milora/cache.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(edited)
    assert missing_dependencies(tmp_path) == {"init": [Path("milora/cache.py")]}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.dependencies", "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "stage init misses deps: milora/cache.py" in done.stderr


@pytest.mark.slow
def test_editing_any_module_the_init_stage_imports_makes_it_changed(tmp_path, chat_model_dir):
    """A real DVC project: after `dvc repro init`, editing each file the stage runs makes
    `dvc status` report the stage changed, and restoring it makes it unchanged again."""
    root = make_project(tmp_path / "project", chat_model_dir)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", "init"],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not changed("init", root)
    files = sorted(stage_files("tasks.init", root))
    assert len(files) > 15
    for path in files:
        original = (root / path).read_bytes()
        (root / path).write_bytes(original + b"\n# edited\n")
        try:
            assert changed("init", root), f"editing {path} left the init stage unchanged"
        finally:
            (root / path).write_bytes(original)
    assert not changed("init", root)
