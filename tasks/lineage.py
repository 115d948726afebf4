"""Stage "prepare": what a model is made of, so any registered version can be rebuilt.

``raw_data_hash`` fingerprints the company files the ingest stage reads (names and bytes,
in reading order): a scheduled run compares it with the champion's to see whether new data
arrived. ``lineage`` collects, after the DVC stages ran, the DVC hashes of the dataset and
of the trained run folder (from ``dvc.lock``), the git commit, and a hash of every
parameter: with these, ``git checkout <commit> && dvc checkout`` (or ``dvc repro``)
restores the very dataset and adapter of a model version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from milora.digests import digest_files, file_sha256
from milora.layout import FROM_VERSION, PARENT_RECORD, RAW_ADAPTER, SERVED_ADAPTER, adapter_digest
from milora.settings import Settings
from tasks import LOCK_FILE, locked_hashes

logger = logging.getLogger(__name__)


def company_files(settings: Settings) -> list[Path]:
    """The company's raw data: every file ``ingest.sources`` names (in reading order), then
    the image files their records name (sorted)."""
    from milora.data.images import named_images
    from milora.data.readers import resolve_sources

    cfg = settings.ingest
    sources = resolve_sources(cfg.sources, settings.root)
    return [*sources, *named_images(sources, cfg.column_map, cfg.csv_delimiter)]


def raw_data_hash(settings: Settings) -> str:
    """sha256 over the (relative name, bytes) of every company file (:func:`company_files`)."""
    named = []
    for path in company_files(settings):
        name = path.relative_to(settings.root) if path.is_relative_to(settings.root) else path
        named.append((f"{name}\0".encode(), path))
    return digest_files(hashlib.sha256(), named)


def raw_files(settings: Settings) -> dict[str, str]:
    """``{path: sha256}`` of every company file the ingest stage reads, images included (paths
    relative to the project): logged with a version, so a rebuild can name the file that differs."""
    return {_relative(path, settings.root): file_sha256(path) for path in company_files(settings)}


def _relative(path: Path, root: Path) -> str:
    resolved, base = path.resolve(), root.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(path)


class UncommittedChangesError(RuntimeError):
    """The run would train on code, params or data that its git commit does not hold."""


def _git(root: Path, *args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def uncommitted_files(settings: Settings) -> list[str]:
    """What the commit does not hold: tracked files that differ from HEAD (but ``dvc.lock`` and
    ``.gitignore`` files, DVC's records of outputs), and company files the ingest stage reads
    (images included) that neither git nor a committed ``.dvc`` file versions (a new drop not yet committed or
    ``dvc add``-ed, or changed since). Empty outside a git checkout."""
    root = settings.root
    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    if changed is None:
        return []
    # dvc.lock and .gitignore files are what DVC writes about outputs, not inputs of the run.
    found = [
        line[3:]
        for line in changed.splitlines()
        if line.strip() and line[3:] != LOCK_FILE and Path(line[3:]).name != ".gitignore"
    ]
    tracked = set((_git(root, "ls-files") or "").splitlines())
    untracked = [
        path
        for path in company_files(settings)
        if path.resolve().is_relative_to(root.resolve()) and _relative(path, root) not in tracked
    ]
    versioned = _dvc_versioned(root, untracked, tracked) if untracked else set()
    found += [_relative(path, root) for path in untracked if _relative(path, root) not in versioned]
    return sorted(set(found))


def _dvc_versioned(root: Path, paths: list[Path], tracked: set[str]) -> set[str]:
    """Which of ``paths`` DVC versions for the commit: under the output of a ``.dvc`` file
    git tracks (``dvc add``), with the content that file records (``dvc status`` clean)."""
    dvc_files = sorted(name for name in tracked if name.endswith(".dvc"))
    if not dvc_files:
        return set()
    from dvc.repo import Repo

    covered: dict[str, str] = {}  # a file's path -> the .dvc file whose output holds it
    for dvc_file in dvc_files:
        spec = yaml.safe_load((root / dvc_file).read_text()) or {}
        for out in spec.get("outs") or []:
            out_path = (root / dvc_file).parent / out.get("path", "")
            for path in paths:
                if path.resolve().is_relative_to(out_path.resolve()):
                    covered[_relative(path, root)] = dvc_file
    if not covered:
        return set()
    with contextlib.chdir(root), Repo(".") as repo:
        changed = repo.status(targets=sorted(set(covered.values())))
    return {path for path, dvc_file in covered.items() if dvc_file not in changed}


def require_committed(settings: Settings, allow: bool) -> list[str]:
    """Refuse (unless ``allow``) to train what a version could not be rebuilt from; returns
    the uncommitted files (recorded on the version when allowed)."""
    files = uncommitted_files(settings)
    if files and not allow:
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        raise UncommittedChangesError(
            f"uncommitted changes: {shown}. A registered version must be rebuildable from its git "
            "commit: commit them (git add, git commit; a large drop: dvc add DROP, then commit "
            "DROP.dvc, and the flow pushes it to the DVC remote), or for a local try run with "
            "--allow-uncommitted (the version is then tagged `uncommitted`; deployments never allow it)"
        )
    return files


def git_commit(root: Path, dirty: bool | None = None) -> str:
    """HEAD's commit, with ``-dirty`` when the run's inputs differ from it (``dirty``; by
    default: tracked files differ), so the version says it is not rebuildable from it alone."""
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return "unknown"
    if dirty is None:
        dirty = bool((_git(root, "status", "--porcelain", "--untracked-files=no") or "").strip())
    return f"{commit}-dirty" if dirty else commit


def params_hash(settings: Settings) -> str:
    """sha256 of every setting (the whole of params.yaml as parsed)."""
    payload = json.dumps(settings.model_dump(by_alias=True, mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def lineage(settings: Settings) -> dict[str, Any]:
    """Everything a registered version records about where it came from."""
    outs = locked_hashes(settings.root)
    uncommitted = uncommitted_files(settings)
    run_dir = settings.path(settings.train.run_dir)
    adapters = (run_dir / RAW_ADAPTER, run_dir / SERVED_ADAPTER)
    return {
        "adapter_digest": adapter_digest(*adapters) if all(a.is_dir() for a in adapters) else "",
        "data_version": outs.get(settings.validation.dataset_dir, ""),
        "adapter_version": outs.get(settings.train.run_dir, ""),
        "init_version": outs.get(settings.train.init_dir, ""),
        "raw_data_hash": raw_data_hash(settings),
        "git_commit": git_commit(settings.root, dirty=bool(uncommitted)),
        "uncommitted": ", ".join(uncommitted)[:1000],
        "params_hash": params_hash(settings),
        "base_model": str(settings.base_model),
    }


def unchanged_version(settings: Settings) -> str | None:
    """The registered version this project would rebuild as it stands (every DVC stage
    unchanged since ``dvc.lock``, and a version of the same content registered), or
    None: then there is work for the flow."""
    from tasks.register import champion_problem, registered_version
    from tasks.reproduce import changed

    if not (settings.root / LOCK_FILE).is_file() or changed(None, settings.root):
        return None
    if champion_problem(settings):  # the flow reports it
        return None
    if settings.train.start == FROM_VERSION and parent_outdated(settings):
        return None
    return registered_version(settings, lineage(settings))


def parent_outdated(settings: Settings) -> bool:
    """Whether the fetched parent (``train.parent_dir``) is not the champion now (promoted or
    rolled back since): DVC cannot see the registry, so a run from the champion asks it."""
    import json

    from tasks.registry import CHAMPION, Registry

    path = settings.path(settings.train.parent_dir) / PARENT_RECORD
    fetched = json.loads(path.read_text()).get("version") if path.is_file() else None
    registry, _ = Registry.existing(settings)
    champion = registry.alias(CHAMPION) if registry is not None else None
    return fetched != (str(champion.number) if champion is not None else None)


lineage_task = task(name="prepare", cache_policy=NO_CACHE)(lineage)
