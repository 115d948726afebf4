"""Byte-stable writers, so the same seed always yields identical files.

Sorted keys, compact separators, UTF-8 and ``\\n`` line endings regardless of
platform: the generated data is committed and tracked by hash, so any
accidental variation would show up as a spurious data change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def dumps_record(record: Mapping[str, Any]) -> str:
    """One JSON line with sorted keys and non-ASCII kept readable."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` as JSON Lines; return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(dumps_record(record) + "\n")
            count += 1
    return count


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write one indented JSON document with sorted keys and a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2)
    path.write_text(text + "\n", encoding="utf-8", newline="\n")


def read_json(path: Path) -> Any:
    """Read a JSON document."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file written by :func:`write_jsonl` (blank lines skipped)."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write one text item per line with ``\\n`` endings; return the line count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for line in lines:
            if "\n" in line:
                raise ValueError(f"line contains a newline: {line!r}")
            handle.write(line + "\n")
            count += 1
    return count


def read_lines(path: Path) -> list[str]:
    """Read non-empty lines written by :func:`write_lines`."""
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]
