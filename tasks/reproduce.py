"""Running one DVC stage from the flow: ``dvc repro --single-item STAGE``.

The flow's data and model steps are the DVC stages of ``dvc.yaml`` (which call
``python -m tasks.<stage>``), so there is one copy of each stage's logic, DVC decides what
must rerun (a stage whose code, data and params are unchanged is skipped in well under a
second) and every output is versioned in the DVC cache. This module runs one stage (when
``dvc status`` says something of it changed), sends its output to the log, and turns a failure into an error that says which stage, with the
stage's own summary (for bad data: file, rows, rule).

Exit status 75 (``EX_TEMPFAIL``, an I/O error in the stage) raises
:class:`TransientStageError`, which the Prefect task retries; every other failure raises
:class:`StageFailedError`, which it does not (bad data fails the same way every time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.offline import OFFLINE_ENV
from tasks import ERROR_FILE_ENV, STAGES, TEMPFAIL, stage_task

logger = logging.getLogger(__name__)

_EXIT = re.compile(r"exited with (\d+)")
_CWD_LOCK = threading.Lock()
_SKIPPED = re.compile(r"Stage '[^']+' didn't change, skipping")


class StageFailedError(RuntimeError):
    """A stage's command failed for a reason a rerun will not fix."""


class TransientStageError(OSError):
    """A stage's command hit an I/O error; running it again may succeed."""


@dataclass
class StageRun:
    stage: str
    ran: bool  # False: DVC found code, data and params unchanged and skipped it
    seconds: float
    output: str


def stage_env() -> dict[str, str]:
    """The stage commands' environment: this interpreter's venv first on PATH, nothing calls out."""
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def _project_repo(root: str | os.PathLike[str]) -> Iterator[Any]:
    """The DVC repository at ``root``, opened from inside it: DVC resolves output paths against
    the working directory (one thread at a time, since the working directory is per process)."""
    from dvc.repo import Repo

    with _CWD_LOCK, contextlib.chdir(root), Repo(".") as repo:
        yield repo


def changed(stage: str | None, root: str | os.PathLike[str] = ".") -> bool:
    """Whether ``dvc status`` finds anything of ``stage`` (None: of any stage) changed since
    ``dvc.lock`` (deps, params, outputs missing or modified). Asked in this process: a DVC
    command per unchanged stage would cost a second of start-up each."""
    with _project_repo(root) as repo:
        return bool(repo.status(targets=[stage] if stage else None))


def _failure(stage: str, dvc_code: int, output: str, message: str) -> Exception:
    """One message for a failed stage: its command's exit status (not DVC's) and what the
    command said a person must fix; without that (a crash), the end of its output."""
    codes = [int(c) for c in _EXIT.findall(output)]
    code = codes[-1] if codes else dvc_code
    said = message or "\n".join(output.splitlines()[-15:])
    if code == TEMPFAIL:
        return TransientStageError(f"stage {stage!r} hit an I/O error (exit {code}): {said}")
    where = "" if codes else " (DVC failed before the command ran)"
    return StageFailedError(f"stage {stage!r} failed (exit {code}){where}: {said}")


def reproduce(
    stage: str, root: str | os.PathLike[str] = ".", *, force: bool = False, env: dict[str, str] | None = None
) -> StageRun:
    """Run ``stage`` of the DVC pipeline in ``root`` if anything it depends on changed (``env``:
    added to its command's environment)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    started = time.perf_counter()
    if not force and not changed(stage, root):
        seconds = time.perf_counter() - started
        logger.info(
            "stage %s unchanged (code, data and params as in dvc.lock), skipped in %.1f s", stage, seconds
        )
        return StageRun(stage, False, seconds, "")
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    with tempfile.TemporaryDirectory(prefix="milora-stage-") as scratch:
        said = Path(scratch) / "error.txt"
        env = {**stage_env(), **(env or {}), ERROR_FILE_ENV: str(said)}
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
        message = said.read_text(encoding="utf-8").strip() if said.is_file() else ""
    seconds = time.perf_counter() - started
    output = (done.stdout + done.stderr).strip()
    for line in output.splitlines():
        logger.info("[%s] %s", stage, line)
    if done.returncode != 0:
        raise _failure(stage, done.returncode, output, message)
    ran = not _SKIPPED.search(output)
    logger.info("stage %s %s in %.1f s", stage, "ran" if ran else "unchanged, skipped", seconds)
    return StageRun(stage, ran, seconds, output)


def push(root: str | os.PathLike[str] = ".") -> int:
    """Send every output in ``dvc.lock`` to the default DVC remote, so a registered version can
    be rebuilt on another machine (``python -m tasks.rebuild``); returns how many files went.
    Without a remote configured there is nothing to send to: logged, not an error."""
    with _project_repo(root) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            logger.warning("no default DVC remote (dvc remote add -d ...): outputs stay in the local cache")
            return 0
        pushed = repo.push()
    logger.info("pushed %d file(s) to DVC remote %r", pushed, remote)
    return pushed


reproduce_task = stage_task(reproduce, "dvc-stage", task_run_name="{stage}")
push_task = stage_task(push, "dvc-push")
