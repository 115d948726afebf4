"""Publishing files and folders all or nothing, with the permissions any other tool gives them.

A reader (a serving process, the next stage, a second run) never sees half a folder: work
goes into a hidden sibling that replaces the target in one rename, and only when the work
succeeded. Modes follow the process umask like ``mkdir`` and ``open`` do (the 0600 files of
safetensors and ``tempfile`` would lock out a serving process running as another user).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from milora.errors import UserFacingError


def _current_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(..., "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_current_umask()


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and everything under a folder) the modes a new file or folder gets.

    Writers that go through a private temporary file (safetensors, ``tempfile``) leave 0600
    files and 0700 folders; this puts them where ``open``/``mkdir`` would have (executable
    bits kept)."""
    mask = _current_umask()
    root = Path(path)
    for item in [root, *(root.rglob("*") if root.is_dir() else [])]:
        if item.is_symlink():
            continue
        if item.is_dir():
            item.chmod(0o777 & ~mask)
        else:
            item.chmod((0o666 | (item.stat().st_mode & 0o111)) & ~mask)


def replace_directory(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the finished folder ``source`` where ``target`` is, in one rename (the old
    ``target``, if any, is removed only after), with the umask's modes."""
    source, target = Path(source), Path(target)
    follow_umask(source)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, mark: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``target`` only if the block succeeds; ``mark``:
    a pipeline output, marked as such (:data:`OUTPUT_MARKER`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    scratch = target.parent / f".{target.name}.tmp-{token}"
    scratch.mkdir()  # 0777 less the umask, as any folder
    try:
        yield scratch
        if mark:
            mark_output(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    replace_directory(scratch, target)


# A stage replaces its output folder as a whole: only a folder it wrote itself (this file in
# it), so a setting pointing at a folder of other files can never delete them.
OUTPUT_MARKER = ".milora-output"


class ForeignOutputError(UserFacingError, ValueError):
    """An output setting that points outside the project, at an input, or at others' files."""


def mark_output(folder: str | os.PathLike[str]) -> None:
    (Path(folder) / OUTPUT_MARKER).write_text("written by the milora pipeline; replaced as a whole\n")


def claim_output(
    target: str | os.PathLike[str],
    root: str | os.PathLike[str],
    key: str,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    adopt: bool = False,
    confine: bool = True,
) -> Path:
    """``target`` if a stage may replace it: inside ``root`` (not ``root`` itself; ``confine``
    False for a folder a caller named explicitly, such as a scratch folder), holding none of
    ``inputs``, and either absent, empty, marked as a pipeline output, or ``adopt``-ed (an
    output an earlier version wrote unmarked). ``key`` names the setting in the error."""
    target, base = Path(target).resolve(), Path(root).resolve()
    if target == base:
        raise ForeignOutputError(
            f"{key}: {target} is the project folder itself: give the output a folder of its own"
        )
    if confine and not target.is_relative_to(base):
        raise ForeignOutputError(
            f"{key}: {target} is not inside the project {base}: outputs live in the project (a "
            "stage replaces its output folder as a whole)"
        )
    for item in map(Path, inputs):
        if item.resolve().is_relative_to(target):
            raise ForeignOutputError(
                f"{key}: {target} would hold the input {item}: choose a folder of its own"
            )
    if target.exists() and not target.is_dir():
        raise ForeignOutputError(f"{key}: {target} is a file, not an output folder")
    if target.is_dir() and not (target / OUTPUT_MARKER).is_file() and not adopt:
        others = sorted(p.name for p in target.iterdir())
        if others:
            raise ForeignOutputError(
                f"{key}: {target} holds files this pipeline did not write ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): point {key} at a new folder, or empty this one"
            )
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half
    of one (a hidden sibling renamed over it; parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path
