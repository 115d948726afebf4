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
