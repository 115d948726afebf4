"""Reading company exports record by record: JSONL, JSON (a list), CSV and Parquet.

Readers stream (one line, CSV row or Parquet batch at a time) so a large drop never sits in
memory twice, and they never give up on a whole file for one bad row: an unparseable line
comes back as a row with an error, to be reported with its number. Bytes that are not UTF-8
are kept as surrogate escapes so the row checks can say exactly where they are.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH = 8192
csv.field_size_limit(2**31 - 1)  # one enormous cell is a row problem (max_tokens), not a crash


class FileProblem(Exception):
    """A whole file cannot become records; ``rule`` is one of the file rules."""

    def __init__(self, rule: str, detail: str, row: int | None = None):
        super().__init__(detail)
        self.rule, self.detail, self.row = rule, detail, row


@dataclass
class RawRow:
    """One record as read: ``record`` is a dict, or ``error`` says why the row is not one."""

    row: int
    record: dict[str, Any] | None = None
    error: str | None = None
    raw: str = ""


def type_name(value: object) -> str:
    """JSON's word for a Python value's type, for messages a person reads."""
    if value is None:
        return "null"
    return {
        dict: "object",
        list: "list",
        str: "text",
        bool: "boolean",
        int: "number",
        float: "number",
        bytes: "bytes",
    }.get(type(value), type(value).__name__)


def resolve_sources(entries: Sequence[str | Path], root: Path) -> list[Path]:
    """Files named by ``entries`` (files, folders or glob patterns) in a stable order.

    Globs and folders are sorted, so drops named by date are read oldest first and a new
    drop never reorders the old ones. A named file or folder that does not exist is an
    ``unreadable_file`` problem; a glob that matches nothing is only logged.
    """
    found: list[Path] = []
    for entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else root / entry
        if glob.has_magic(str(entry)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                logger.warning("no file matches %s", entry)
            found += [p for p in matches if p.is_file() and p.suffix.lower() in FORMATS]
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def unmatched_files(
    watch: Path, read: Sequence[Path], accounted: Sequence[str | Path], root: Path
) -> list[Path]:
    """Files under ``watch`` that are neither ``read`` nor named by ``accounted`` (files,
    folders or globs, as ``resolve_sources`` takes them, any type); hidden files and folders
    (``.gitkeep``, ``.DS_Store``) are not drops. Sorted."""
    known = {p.resolve() for p in read}
    for entry in accounted:
        path = Path(entry) if Path(entry).is_absolute() else root / entry
        matches = (
            [Path(p) for p in glob.glob(str(path), recursive=True)] if glob.has_magic(str(entry)) else [path]
        )
        for match in matches:
            known.update(p.resolve() for p in (match.rglob("*") if match.is_dir() else [match]))
    return sorted(
        path
        for path in watch.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(watch).parts)
        and path.resolve() not in known
    )


def iter_rows(path: Path, csv_delimiter: str = ",") -> Iterator[RawRow]:
    """Rows of ``path``; raises :class:`FileProblem` for a file that has no rows to give."""
    if not path.is_file():
        raise FileProblem("unreadable_file", "no such file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise FileProblem(
            "unreadable_file", f"unsupported file type {path.suffix!r} (expected one of {', '.join(FORMATS)})"
        )
    if path.stat().st_size == 0:
        raise FileProblem("empty_file", "the file is empty (0 bytes)")
    if kind == "jsonl":
        yield from _jsonl(path)
    elif kind == "json":
        yield from _json(path)
    elif kind == "csv":
        yield from _csv(path, csv_delimiter)
    else:
        yield from _parquet(path)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _as_record(row: int, value: object, raw: str) -> RawRow:
    if isinstance(value, dict):
        return RawRow(row, value, raw=raw)
    return RawRow(row, error=f"a JSON {type_name(value)}, not an object", raw=raw)


def _jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(_BOM):
                data = data[len(_BOM) :]
            text = _decode(data).rstrip("\r\n")
            if not text.strip():
                continue
            try:
                # strict=False: a raw control character inside a string is a content problem
                # (control_chars), reported with its place, not an unparseable line.
                value = json.loads(text, strict=False)
            except json.JSONDecodeError as error:
                yield RawRow(number, error=f"not valid JSON ({error.msg} at column {error.colno})", raw=text)
                continue
            yield _as_record(number, value, text)


def _json(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    text = _decode(data)
    if not text.strip():
        raise FileProblem("empty_file", "the file holds only whitespace")
    try:
        document = json.loads(text, strict=False)
    except json.JSONDecodeError as error:
        raise FileProblem(
            "unreadable_file",
            f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
            error.lineno,
        ) from None
    if isinstance(document, dict):
        keys = ", ".join(list(document)[:8])
        raise FileProblem("not_records", f"a JSON object (keys: {keys}) where a list of records belongs")
    if not isinstance(document, list):
        raise FileProblem("not_records", f"a JSON {type_name(document)} where a list of records belongs")
    for index, value in enumerate(document, start=1):
        yield _as_record(
            index, value, json.dumps(value, ensure_ascii=False)[:200] if not isinstance(value, dict) else ""
        )


def _csv(path: Path, delimiter: str) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise FileProblem("empty_file", "no header and no rows")
            header = [h.strip() for h in header]
            for number, values in enumerate(reader, start=1):
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    yield RawRow(
                        number,
                        error=f"{len(values)} fields where the header has {len(header)}",
                        raw=delimiter.join(values)[:200],
                    )
                    continue
                yield RawRow(number, dict(zip(header, values, strict=True)))
        except csv.Error as error:
            raise FileProblem("unreadable_file", f"CSV error: {error}", reader.line_num) from None


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise FileProblem("unreadable_file", f"not a readable Parquet file ({error})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
        for record in batch.to_pylist():
            number += 1
            yield RawRow(number, {k: _decode(v) if isinstance(v, bytes) else v for k, v in record.items()})
