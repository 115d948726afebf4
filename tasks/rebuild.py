"""Command "rebuild": a registered model version back from its recorded commit, data and params.

``python -m tasks.rebuild VERSION|champion --into DIR [--recompute]``

A version's tags name the git commit it was trained from, and its MLflow run holds the
``dvc.lock`` and ``params.yaml`` DVC ran with (``register`` logs them under ``lineage/``).
Rebuilding clones the commit into a new folder, puts those two files in place, and then
either pulls the very outputs from the DVC remote (the default: the dataset and adapter
byte for byte) or recomputes them with ``dvc repro`` (``--recompute``: the whole pipeline
again from the raw data, for an audit: the drops the commit versions with DVC are pulled
first, and every company file is checked against the hashes logged with the version, naming
each that differs, before anything runs). Either way it ends by checking the result against
the registry: the dataset's DVC hash against the version's ``data_version`` tag, the adapter
weights byte for byte against the adapters logged with the version's run, and (pulled only:
a recomputed run folder holds new timings) the run folder's hash against ``adapter_version``;
a recomputed dataset that differs names its files that differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milora.digests import file_differences, file_sha256, folder_sha256
from milora.layout import RAW_ADAPTER, SERVED_ADAPTER
from milora.settings import DEFAULT_PARAMS, Settings, load_settings
from tasks import LOCK_FILE, parse_overrides, run_command
from tasks.register import DATASET_FILES, LINEAGE_ARTIFACTS, RAW_FILES
from tasks.registry import Registry, RegistryError, configured_uri

logger = logging.getLogger(__name__)


class RebuildError(RuntimeError):
    """A version that cannot be rebuilt as asked (the message says what is missing)."""


def _git(*args: str, cwd: Path | None = None) -> None:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RebuildError(f"git {' '.join(args)} failed: {done.stderr.strip()}")


def _lineage_files(registry: Registry, run_id: str, into: Path) -> dict[str, dict[str, str] | None]:
    """``dvc.lock`` and ``params.yaml`` of the version's run into ``into``; returns the recorded
    ``{path: sha256}`` of its company files and dataset files (None: registered before they
    were logged)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = registry.download(run_id, LINEAGE_ARTIFACTS, tmp)
        except Exception as error:  # MLflow raises its own error types for a missing folder
            raise RebuildError(
                f"run {run_id} has no {LINEAGE_ARTIFACTS}/ artifacts (dvc.lock, params.yaml): it was "
                f"registered before they were logged, so only `git checkout` + `dvc repro` by hand remain ({error})"
            ) from None
        for name in (LOCK_FILE, "params.yaml"):
            if not (folder / name).is_file():
                raise RebuildError(f"run {run_id} lacks {LINEAGE_ARTIFACTS}/{name}")
            shutil.copy(folder / name, into / name)
        return {
            name: json.loads((folder / name).read_text()) if (folder / name).is_file() else None
            for name in (RAW_FILES, DATASET_FILES)
        }


def _pull_versioned_inputs(into: Path) -> None:
    """The company drops the commit versions with DVC (``.dvc`` files), from the remote."""
    from dvc.repo import Repo

    listed = subprocess.run(["git", "ls-files", "*.dvc"], cwd=into, capture_output=True, text=True)
    targets = [name for name in listed.stdout.splitlines() if name]
    if not targets:
        return
    logger.info("pulling the DVC-tracked inputs %s", ", ".join(targets))
    try:
        with contextlib.chdir(into), Repo(".") as repo:
            repo.pull(targets=targets)
    except Exception as error:  # DVC raises its own types for a missing remote or object
        raise RebuildError(f"could not pull the DVC-tracked inputs {', '.join(targets)}: {error}") from None


def _check_raw_files(into: Path, recorded: dict[str, str] | None, version: str, commit: str) -> None:
    """Before recomputing: the company files here are the ones the version read, or the error
    names each that differs."""
    from tasks.lineage import raw_files

    if recorded is None:
        logger.warning("version %s records no company file hashes: a data mismatch cannot be named", version)
        return
    differences = file_differences(recorded, raw_files(load_settings(into / "params.yaml")))
    if differences:
        raise RebuildError(
            f"version {version}'s company files are not what commit {commit[:12]} holds (with its "
            "DVC-tracked drops), so a recompute would train on other data:\n  "
            + "\n  ".join(differences)
            + "\n(a version trained from uncommitted drops is tagged `uncommitted`; `rebuild` "
            "without --recompute still pulls its outputs from the DVC remote)"
        )


def _same_weights(registry: Registry, run_id: str, run_dir: Path) -> bool:
    """Whether every adapter weights file logged with the run is byte-identical in ``run_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        compared = 0
        for folder in (RAW_ADAPTER, SERVED_ADAPTER):
            try:
                logged = registry.download(run_id, folder, tmp)
            except Exception as error:  # MLflow's own error types for missing artifacts
                raise RebuildError(
                    f"run {run_id}'s {folder}/ artifacts are missing from the store, so the rebuilt "
                    f"adapter cannot be compared with them ({error})"
                ) from None
            for path in sorted(logged.rglob("*.safetensors")):
                rebuilt = run_dir / folder / path.relative_to(logged)
                if not rebuilt.is_file() or file_sha256(rebuilt) != file_sha256(path):
                    logger.warning("%s differs from the registered %s", rebuilt, path.relative_to(tmp))
                    return False
                compared += 1
    return compared > 0


def _use_source_remote(source: Path, into: Path) -> None:
    """The clone pulls from the project's DVC remote: a relative local remote (the default
    ``../.dvc-remote``) would otherwise point inside the clone."""
    from dvc.repo import Repo

    with Repo(str(source)) as repo:
        name = repo.config["core"].get("remote")
        url = repo.config["remote"].get(name, {}).get("url") if name else None
    if not url:
        return
    with Repo(str(into)) as repo, repo.config.edit("local") as local:
        local["core"]["remote"] = name
        local["remote"][name] = {"url": url}


def _fetch_recorded_parent(settings: Settings, into: Path, tags: dict[str, str]) -> None:
    """A version of a chain started from its parent version: fetch that one (not today's
    champion) into the clone's ``train.parent_dir``, as the run had it, so ``dvc repro``
    finds the parent stage's output as ``dvc.lock`` recorded it."""
    from tasks.parent import fetch_parent

    parent = tags.get("parent_version")
    if not parent:
        return
    # The clone's parameters, on the store the version lives in (its own would be a new one).
    rebuilt = load_settings(into / DEFAULT_PARAMS).with_overrides(
        {
            "registry.tracking_uri": configured_uri(settings),
            "registry.model_name": settings.registry.model_name,
        }
    )
    logger.info("fetching parent version %s into %s", parent, rebuilt.path(rebuilt.train.parent_dir))
    fetch_parent(rebuilt, parent)


def rebuild(
    settings: Settings, ref: str, into: str | os.PathLike[str], *, recompute: bool = False
) -> dict[str, Any]:
    """Rebuild version ``ref`` (a number or an alias) of the registered model into ``into``."""
    from dvc.repo import Repo

    from tasks import locked_hashes
    from tasks.reproduce import stage_env

    into = Path(into).resolve()
    if into.exists() and any(into.iterdir()):
        raise RebuildError(f"{into} is not empty: rebuild into a new folder")
    registry = Registry(settings)
    version = registry.version(ref)
    tags = version.tags
    commit = tags.get("git_commit", "")
    if not commit or commit == "unknown":
        raise RebuildError(f"version {version.number} records no git commit: it cannot be rebuilt")
    if commit.endswith("-dirty"):
        logger.warning(
            "version %s was trained from uncommitted changes on top of %s: code may differ",
            version.number,
            commit.removesuffix("-dirty"),
        )
        commit = commit.removesuffix("-dirty")

    _git("clone", "--quiet", "--no-checkout", str(settings.root), str(into))
    _git("checkout", "--quiet", "--detach", commit, cwd=into)
    recorded = _lineage_files(registry, version.run_id, into)
    _use_source_remote(settings.root, into)
    if recompute:
        _pull_versioned_inputs(into)
        _check_raw_files(into, recorded[RAW_FILES], str(version.number), commit)
        _fetch_recorded_parent(settings, into, tags)
        logger.info("recomputing version %s with dvc repro in %s", version.number, into)
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"], cwd=into, env=stage_env(), capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
            raise RebuildError(f"dvc repro in {into} failed:\n{tail}")
    else:
        logger.info("pulling version %s's outputs from the DVC remote into %s", version.number, into)
        with contextlib.chdir(into), Repo(".") as repo:
            repo.pull()
    rebuilt = locked_hashes(into)
    run_dir, dataset_dir = settings.train.run_dir, settings.validation.dataset_dir
    found = {"data_version": rebuilt.get(dataset_dir, ""), "adapter_version": rebuilt.get(run_dir, "")}
    checked = ["data_version"] if recompute else ["data_version", "adapter_version"]
    matches = {key: found[key] == tags.get(key) for key in checked}
    for key in checked:
        level = logging.INFO if matches[key] else logging.WARNING
        logger.log(level, "%s: recorded %s, rebuilt %s", key, tags.get(key), found[key])
    matches["adapter_weights"] = _same_weights(registry, version.run_id, into / run_dir)
    differences = []
    if not matches["data_version"] and recorded[DATASET_FILES] is not None:
        found_files = folder_sha256(into / dataset_dir) if (into / dataset_dir).is_dir() else {}
        differences = [
            f"{dataset_dir}/{line}" for line in file_differences(recorded[DATASET_FILES], found_files)
        ]
    return {
        "version": str(version.number),
        "commit": commit,
        "into": str(into),
        "adapter": str(into / run_dir),
        "recomputed": recompute,
        "rebuilt": found,
        "matches": matches,
        "differences": differences,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("version", help="version number or alias (champion, challenger)")
    parser.add_argument("--into", required=True, help="a new folder for the rebuilt project")
    parser.add_argument("--recompute", action="store_true", help="dvc repro instead of dvc pull")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    settings = load_settings(args.params, parse_overrides(args.set, parser))
    try:
        result = rebuild(settings, args.version, args.into, recompute=args.recompute)
    except (RebuildError, RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    how = "recomputed" if result["recomputed"] else "pulled"
    print(f"version {result['version']} (commit {result['commit'][:12]}) {how} into {result['into']}")
    print(f"adapter: {result['adapter']}")
    for key, same in result["matches"].items():
        found = result["rebuilt"].get(key, "the weights files against the run's logged adapters")
        print(f"{key}: {found} ({'matches the registry' if same else 'DIFFERS from the registry'})")
    for line in result["differences"]:
        print(f"  {line}")
    return 0 if all(result["matches"].values()) else 1


if __name__ == "__main__":
    run_command(main)
