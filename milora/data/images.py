"""The images of vision-language records: where they are, what they hold, whether they load.

A record may name images (``images``: paths relative to the folder of the file that holds it,
the drop). Ingest resolves them against that folder and keeps them relative to the project
root; a record's identity and fact key then include each image's *content* (its SHA-256), so
the same question about another picture is another record, and a renamed copy is the same.
Validation checks each file (``image_missing``, ``image_unreadable``, ``image_size``) and
publishes the clean rows' images content-addressed (``images/<sha256>.<ext>`` in the dataset).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING

from milora.data.readers import type_name

if TYPE_CHECKING:
    from milora.settings import ImageSettings

IMAGES_DIR = "images"  # the published dataset's folder of image files
MESSAGE_IMAGES = "images"  # a chat message's image paths (training, evaluation, serving)
MISSING = "missing:"  # what a file that cannot be read contributes to a record's id
IMAGE_CHECKS: tuple[str, ...] = ("check_image_missing", "check_image_unreadable", "check_image_size")


def parse_images(value: object) -> tuple[list[str], list[str]]:
    """A raw ``images`` field as a list of path texts, and what is wrong with it.

    Absent or empty: no images. One text is one path, unless it holds a JSON list (a CSV or
    Parquet cell); a list holds texts.
    """
    if value is None or value == "":
        return [], []
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return [value], []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [], ["images is text that starts like a JSON list but is not one"]
    if not isinstance(value, list):
        return [], [f"images is a {type_name(value)}"]
    paths, problems = [], []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"images[{index}] is a {type_name(item)}")
        elif not item.strip():
            problems.append(f"images[{index}] is blank")
        else:
            paths.append(item.strip())
    return paths, problems


def on_first_user_turn(messages: Sequence[Mapping], images: Sequence[str]) -> list[dict]:
    """``messages`` with a record's ``images`` on its first user turn, where LLaVA puts them
    (on the first turn when there is no user turn)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    return [{**m, MESSAGE_IMAGES: list(images)} if i == first else dict(m) for i, m in enumerate(messages)]


def resolve_image(text: str, folder: Path) -> tuple[Path | None, str | None]:
    """The file an image path names inside the drop ``folder``, or why it may not be read:
    an absolute path or one that leaves the folder (``..``) would read outside the drop,
    which neither DVC watches nor the next machine has. Links are not followed for the
    check: a drop under DVC with ``cache.type: symlink`` holds links into the cache."""
    if text.startswith(("/", "\\")) or PureWindowsPath(text).drive:
        return None, f"{text!r} is an absolute path (give it relative to the drop folder)"
    folder = Path(os.path.abspath(folder))
    path = Path(os.path.normpath(folder / text.replace("\\", "/")))
    if not path.is_relative_to(folder):
        return None, f"{text!r} leaves the drop folder"
    return path, None


def named_images(
    sources: Sequence[Path], column_map: Mapping[str, str], csv_delimiter: str = ","
) -> list[Path]:
    """The image files the records of ``sources`` name (each once, sorted): with the record
    files, what a version's raw data is (its hash, its lineage, the uncommitted check).
    Unreadable files and rows are skipped: ingest reports them."""
    from milora.data.readers import FileProblem, iter_rows

    found: dict[Path, None] = {}
    for source in sources:
        try:
            for raw in iter_rows(source, csv_delimiter):
                for key, value in (raw.record or {}).items():
                    if column_map.get(key, key) != "images":
                        continue
                    for text in parse_images(value)[0]:
                        path = resolve_image(text, source.parent)[0]
                        if path is not None and path.is_file():
                            found[path] = None
        except FileProblem:
            continue
    return sorted(found)


def content_digest(path: Path) -> str | None:
    """SHA-256 (hex) of a file's bytes, or None when it cannot be read (cached per file
    version: drops repeat one picture across many records)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _digest(path: str, mtime_ns: int, size: int) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def image_digests(paths: Sequence[str], root: Path) -> list[str]:
    """Each image's content digest, ``missing:<path>`` for a file that cannot be read (paths
    relative to ``root``, as the ingested ``images`` column holds them)."""
    return [content_digest(Path(root) / p) or f"{MISSING}{p}" for p in paths]


def published_name(path: str, root: Path) -> str | None:
    """Where an image goes in the published dataset: ``images/<sha256>.<extension>``,
    relative to the dataset folder (one file per content however many rows share it); None
    for a file that cannot be read (kept only under ``image_missing: warn``)."""
    digest = content_digest(Path(root) / path)
    return None if digest is None else f"{IMAGES_DIR}/{digest}{Path(path).suffix.lower()}"


def check_images(paths: Sequence[str], root: Path, bounds: ImageSettings) -> dict[str, str | None]:
    """The image checks of one row: for each rule, which images break it and why (None when
    none does, and for rows without images)."""
    found: dict[str, list[str]] = {name: [] for name in IMAGE_CHECKS}
    if len(paths) > bounds.max_images:
        found["check_image_size"].append(f"{len(paths)} images, above max_images {bounds.max_images}")
    for path in paths:
        rule, why = _check_one(Path(root) / path, bounds)
        if rule:
            found[rule].append(f"{path}: {why}")
    return {name: "; ".join(values) or None for name, values in found.items()}


def _check_one(path: Path, bounds: ImageSettings) -> tuple[str | None, str | None]:
    """(check column, reason) of the first problem of one image file, or (None, None)."""
    from PIL import Image

    if not path.is_file():
        return "check_image_missing", "no such file"
    size = path.stat().st_size
    if size > bounds.max_bytes:
        return "check_image_size", f"{size} bytes, above max_bytes {bounds.max_bytes}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only: the size before decoding
                width, height = image.size
                if min(width, height) < bounds.min_side:
                    return "check_image_size", f"{width}x{height} pixels, below min_side {bounds.min_side}"
                if max(width, height) > bounds.max_side:
                    return "check_image_size", f"{width}x{height} pixels, above max_side {bounds.max_side}"
                image.verify()  # structure and checksums; the object is unusable afterwards
            with Image.open(path) as image:
                image.load()  # the pixels really decode (a truncated file fails here)
    except Image.DecompressionBombError as error:
        return "check_image_size", str(error)
    except Exception as error:  # Pillow raises many kinds for a broken file
        message = str(error).replace(str(path), path.name)  # no machine's folders in reports
        return "check_image_unreadable", f"cannot be decoded ({type(error).__name__}: {message})"
    return None, None
