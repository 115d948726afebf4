"""Reading evaluation files: any JSON list or JSON-lines file in a supported format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_items(
    path: str | os.PathLike[str], required: tuple[str, ...], limit: int | None = None
) -> list[dict[str, Any]]:
    """Records of a ``.json`` (a list) or ``.jsonl`` file, each checked for ``required`` keys.

    Errors name the file, the record number and what is missing, since a suite file is
    often a user's own export.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        items = json.loads(text)
    elif stripped.startswith("{") and path.suffix == ".json" and "\n{" not in stripped:
        raise ValueError(f"{path}: a JSON object, expected a list of records or JSON lines")
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: record {number} is not an object")
        missing = [key for key in required if key not in item]
        if missing:
            raise ValueError(f"{path}: record {number} lacks {missing}; expected keys {list(required)}")
    return items[:limit] if limit else items
