"""The on-disk dataset: one Parquet part per source file, a manifest, atomic publication.

A dataset folder holds ``manifest.json`` and ``parts/<name>.parquet``, one part per source
file in the order the sources were read; a published one with image records also holds
``images/<sha256>.<ext>``, one file per image content. Parts are written deterministically (fixed schema,
no pandas metadata, no timestamps, fixed row groups and compression), so unchanged content
gives byte-identical files and DVC's hash of the folder changes only when content does. A
new monthly drop adds a part; the parts of earlier drops stay byte for byte the same.

Folders are replaced atomically: written beside the target, then renamed over it, so a
failed run leaves the previous version in place.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from milora.data.images import on_first_user_turn

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
# 2: a "key" column (the fact a record states, when the export names it);
# 3: an "images" column (image+text records; published under images/, milora.data.images).
FORMAT_VERSION = 3
ROW_GROUP = 16384

COMPANY, REPLAY = "company", "replay"
"""A part's ``role`` in the manifest: company data (fact-checked, the drops), or general data
replayed against forgetting (ingest.replay: same row rules, no fact rules, its own share of
each batch)."""

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CONTENT_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_row", pa.int64(), nullable=False),
    pa.field("system", pa.string()),
    pa.field("instruction", pa.string()),
    pa.field("input", pa.string()),
    pa.field("output", pa.string()),
    pa.field("messages", MESSAGE_TYPE),
    pa.field("key", pa.string()),
    # Ingested: relative to the project root; published: to the dataset folder (images/<sha256>.<ext>).
    pa.field("images", pa.list_(pa.string())),
]
# What ingest writes: every row read, duplicates flagged, structural problems noted.
INGESTED_SCHEMA = pa.schema(
    [
        *CONTENT_FIELDS,
        pa.field("duplicate", pa.bool_(), nullable=False),
        pa.field("check_malformed_row", pa.string()),
        pa.field("check_required_fields", pa.string()),
        pa.field("check_wrong_type", pa.string()),
        pa.field("check_invalid_utf8", pa.string()),
    ]
)
# What validation publishes: unique, clean rows only, with their token count.
DATASET_SCHEMA = pa.schema([*CONTENT_FIELDS, pa.field("n_tokens", pa.int32(), nullable=False)])


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (portable ids), else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def part_name(source: str, taken: set[str]) -> str:
    """A file-system-safe, unique part name derived from the source path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.replace("/", "__")).strip("_.") or "part"
    name = stem[-120:]
    if name in taken:
        name = f"{name}-{hashlib.blake2b(source.encode(), digest_size=4).hexdigest()}"
    taken.add(name)
    return name


class PartWriter:
    """Writes rows (dicts) to one Parquet part in fixed-size row groups.

    Rows are buffered per column and flushed every ``ROW_GROUP`` rows, so memory stays at
    one row group whatever the size of the source file.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.rows = 0
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self.path,
            schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=True,
            write_statistics=True,
            store_schema=False,
        )

    def write(self, row: dict[str, Any]) -> None:
        for name, values in self._columns.items():
            values.append(row[name])
        self.rows += 1
        if len(self._columns["record_id"]) >= ROW_GROUP:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append an Arrow table (same columns) through the same row-group buffering."""
        for batch in table.select(self.schema.names).to_batches(ROW_GROUP):
            for name, column in zip(self.schema.names, batch.columns, strict=True):
                self._columns[name].extend(column.to_pylist())
            self.rows += batch.num_rows
            if len(self._columns["record_id"]) >= ROW_GROUP:
                self._flush()

    def _flush(self) -> None:
        if self._columns["record_id"]:
            self._writer.write_table(
                pa.Table.from_pydict(self._columns, schema=self.schema), row_group_size=ROW_GROUP
            )
            self._columns = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Sorted keys and no timestamps: the manifest changes only when the data does."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (Path(folder) / MANIFEST).write_text(text, encoding="utf-8", newline="\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a dataset folder: {MANIFEST} is missing (run the ingest stage)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def iter_parts(
    folder: Path, columns: Sequence[str] | None = None
) -> Iterator[tuple[dict[str, Any], pa.Table]]:
    """Each part's manifest entry and its table, one part in memory at a time."""
    for entry in read_manifest(folder)["parts"]:
        yield entry, pq.read_table(Path(folder) / entry["file"], columns=list(columns) if columns else None)


def part_role(entry: dict[str, Any]) -> str:
    """A manifest part's role (parts written before replay existed are company data)."""
    return str(entry.get("role") or COMPANY)


def load_messages(folder: Path, split: str = "train", role: str = COMPANY) -> list[list[dict[str, Any]]]:
    """The conversations of one split and role of a published dataset, in dataset order.

    A record with images carries them on its first user turn (``"images"``: paths relative to
    ``folder``, the LLaVA convention); every other turn, and every turn of a text record, is
    ``{"role", "content"}`` only. Datasets older than format 3 have no images."""
    images = read_manifest(folder).get("format_version", 1) >= 3
    conversations: list[list[dict[str, Any]]] = []
    columns = ["split", "messages", "images"] if images else ["split", "messages"]
    for entry, table in iter_parts(folder, columns=columns):
        if part_role(entry) != role:
            continue
        pictures = table.column("images").to_pylist() if images else [None] * table.num_rows
        for row_split, messages, paths in zip(
            table.column("split").to_pylist(), table.column("messages").to_pylist(), pictures, strict=True
        ):
            if row_split == split:
                conversations.append(on_first_user_turn(messages, paths) if paths else messages)
    return conversations
