"""Content hashes of files, streamed: one loop for every digest the project records.

Each caller names its files with the exact bytes it has always hashed before them (a bare
name, ``name\\0``, ``folder/relative\\0``), so the recorded digests stay what they were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def digest_files(digest: Any, named: Iterable[tuple[bytes, Path]]) -> str:
    """Feed ``digest`` (a hashlib or xxhash object) each label, then that file's bytes."""
    for label, path in named:
        digest.update(label)
        with Path(path).open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Content hash of one file (source files in the manifest, weights compared on rebuild)."""
    return digest_files(hashlib.sha256(), [(b"", Path(path))])


def folder_sha256(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (what a rebuild compares, file
    by file, to name the one that differs)."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def file_differences(recorded: dict[str, str], found: dict[str, str], by: str = "the version") -> list[str]:
    """One line per file (``{path: sha256}``) that is not as ``by`` recorded it; empty: the same."""
    lines = []
    for path in sorted(recorded.keys() | found.keys()):
        was, now = recorded.get(path), found.get(path)
        if now is None:
            lines.append(f"{path}: recorded with {by}, missing here")
        elif was is None:
            lines.append(f"{path}: here, not recorded with {by}")
        elif was != now:
            lines.append(f"{path}: content differs (sha256 {was[:12]}... recorded, {now[:12]}... here)")
    return lines
