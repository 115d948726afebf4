"""One record shape for every export: text cleaned, a chat form, a content id and a split.

Whatever the source format (Alpaca ``instruction/input/output``, ``prompt/completion`` or chat
``messages``), a record becomes the same columns, and every record also gets ``messages``
(the form training consumes). Structural problems found on the way (missing field, wrong
type, bad bytes) are written next to the record, not raised, so validation can report every
row of a file at once.

The record id is a hash of the normalised *content* only (not the file, row or format), so
the same example delivered twice, or as Alpaca and as a two-turn chat, is one record; the
split comes from that id, so adding rows never moves an existing row to the other split.
A record with ``images`` (paths relative to its file's folder, milora.data.images) also
hashes each image's bytes; a text-only record's id is what it always was.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.data.dataset import display_path
from milora.data.images import image_digests, parse_images, resolve_image
from milora.data.readers import RawRow, type_name

FORMATS: tuple[str, ...] = ("alpaca", "prompt_completion", "chat", "unknown")
CANONICAL_FIELDS: tuple[str, ...] = (
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "messages",
    "key",  # optional: the fact the record states (an article, policy or SKU id; milora.data.facts)
    "images",  # optional: image paths relative to the file's folder (milora.data.images)
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Which raw fields a format needs; the others are optional (Alpaca ``input``, ``system``).
REQUIRED: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
_SURROGATE = re.compile("[\ud800-\udfff]+")


@dataclass(frozen=True)
class FieldMapping:
    """How a company's export names things, mapped onto the canonical names.

    ``columns`` maps top-level keys (``{"question": "instruction"}``), ``message_keys`` the
    keys inside a chat turn (ShareGPT: ``{"from": "role", "value": "content"}``) and
    ``roles`` the role values (``{"human": "user", "gpt": "assistant"}``).
    """

    columns: Mapping[str, str] = field(default_factory=dict)
    message_keys: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)


def detect_format(keys: set[str] | Any) -> str:
    """The schema a record's (mapped) keys belong to; ``unknown`` when none."""
    if "messages" in keys:
        return "chat"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    return "unknown"


def clean_text(text: str) -> tuple[str, str | None]:
    """NFC, ``\\n`` line ends, outer spaces/newlines stripped; bad bytes become U+FFFD.

    Returns the text and, when it held bytes that are not UTF-8, a note showing them. Only
    space, tab and newline are stripped: control characters must stay visible to their check.
    """
    note = None
    if _SURROGATE.search(text):
        match = _SURROGATE.search(text)
        assert match is not None
        note = f"{_show_bytes(match.group())} at character {match.start()}"
        text = _SURROGATE.sub("\ufffd", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip(" \t\n"), note


def _show_bytes(chars: str) -> str:
    """Surrogate escapes back to the bytes they stand for (``b'\\xff\\xfe'``)."""
    data = bytes(ord(c) - 0xDC00 for c in chars if 0xDC80 <= ord(c) <= 0xDCFF)
    return repr(data) if data else repr(chars)


def record_id(
    system: str,
    instruction: str,
    input_text: str,
    output: str,
    messages: list[dict[str, str]],
    images: Sequence[str] = (),
) -> str:
    """32 hex digits of BLAKE2b over the canonical content (stable across runs and machines).

    ``images``: the content digests of a record's images; none leaves the id of a text record
    as it has always been (published ids and DVC hashes rely on it)."""
    canonical: list[Any] = [
        system,
        instruction,
        input_text,
        output,
        [[m["role"], m["content"]] for m in messages],
    ]
    if images:
        canonical.append(list(images))
    content = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def split_of(rid: str, validation_fraction: float, salt: str = "") -> str:
    """``validation`` for a fixed, content-determined share of records, else ``train``."""
    if validation_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{salt}:{rid}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") / 2**64 < validation_fraction else "train"


def alpaca_messages(instruction: str, input_text: str, output: str, system: str = "") -> list[dict[str, str]]:
    """An Alpaca record as a chat: the input follows the instruction in the user turn."""
    prompt = f"{instruction}\n\n{input_text}" if input_text else instruction
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


class _Problems:
    """Collects structural problems of one record, one list per rule."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.wrong: list[str] = []
        self.bytes: list[str] = []

    def text(self, name: str, value: object, required: bool) -> str | None:
        """``value`` as clean text, noting what is wrong with it; None when absent."""
        if value is None:
            if required:
                self.missing.append(name)
            return None
        if isinstance(value, str):
            text, note = clean_text(value)
        else:
            # Keep what was sent, readable, so the report and the quarantine file show it.
            self.wrong.append(f"{name} is a {type_name(value)}")
            shown = (
                value
                if isinstance(value, (int, float, bool))
                else json.dumps(value, ensure_ascii=False, default=str)
            )
            text, note = clean_text(str(shown))
        if note:
            self.bytes.append(f"{name}: {note}")
        return text

    def columns(self) -> dict[str, str | None]:
        return {
            "check_required_fields": ", ".join(self.missing) or None,
            "check_wrong_type": "; ".join(self.wrong) or None,
            "check_invalid_utf8": "; ".join(self.bytes) or None,
        }


def normalise(
    raw: RawRow, mapping: FieldMapping | None = None, folder: Path | None = None, root: Path = Path(".")
) -> dict[str, Any]:
    """The normalised columns of one raw row (see the module docstring).

    ``folder``: the folder of the file the row comes from, which image paths are relative to
    (default ``root``); the ``images`` column holds them relative to ``root``, the project."""
    mapping = mapping or FieldMapping()
    if raw.record is None:
        text, _ = clean_text(raw.raw)
        rid = hashlib.blake2b(
            f"malformed:{text}".encode("utf-8", "surrogatepass"), digest_size=16
        ).hexdigest()
        return _row(rid, "unknown", None, None, None, None, [], check_malformed_row=raw.error or "unreadable")
    record = {mapping.columns.get(k, k): v for k, v in raw.record.items()}
    fmt = detect_format(record.keys())
    problems = _Problems()
    if fmt == "unknown":
        found = ", ".join(str(k) for k in list(raw.record)[:8]) or "none"
        problems.missing.append(
            f"no instruction/output, prompt/completion or messages field (found: {found})"
        )
        return _row(_content_id(raw), fmt, None, None, None, None, [], **problems.columns())
    system = problems.text("system", record.get("system"), required=False) or ""
    raw_key = record.get("key")
    if isinstance(raw_key, int) and not isinstance(raw_key, bool):  # a numeric id (SKU 12345)
        raw_key = str(raw_key)
    key = problems.text("key", raw_key, required=False) or None
    images, digests = _images(record.get("images"), folder or root, root, problems)
    if fmt == "chat":
        messages = _messages(record.get("messages"), mapping, problems)
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        instruction, input_text, output = (
            (users[0] if users else None),
            "",
            (answers[-1] if answers else None),
        )
    else:
        names = ("instruction", "input", "output") if fmt == "alpaca" else ("prompt", None, "completion")
        instruction = problems.text(names[0], record.get(names[0]), required=True)
        input_text = problems.text("input", record.get("input"), required=False) if names[1] else ""
        output = problems.text(names[2], record.get(names[2]), required=True)
        input_text = input_text or ""
        messages = alpaca_messages(instruction or "", input_text, output or "", system)
    rid = record_id(system, instruction or "", input_text, output or "", messages, digests)
    return _row(
        rid, fmt, system, instruction, input_text, output, messages, key, images, **problems.columns()
    )


def _images(value: object, folder: Path, root: Path, problems: _Problems) -> tuple[list[str], list[str]]:
    """A record's images relative to ``root``, and what its id hashes: each image's content
    digest (``missing:<path>``: a file not there), or ``refused:<path>`` for a path that
    leaves the drop (noted as a wrong type; the column leaves it out)."""
    texts, wrong = parse_images(value)
    problems.wrong += wrong
    paths, digests = [], []
    for index, text in enumerate(texts):
        path, refused = resolve_image(text, folder)
        if path is None:
            problems.wrong.append(f"images[{index}]: {refused}")
            digests.append(f"refused:{text}")
            continue
        shown = display_path(path, root)
        paths.append(shown)
        digests += image_digests([shown], root)
    return paths, digests


def _content_id(raw: RawRow) -> str:
    content = json.dumps(raw.record, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _messages(value: object, mapping: FieldMapping, problems: _Problems) -> list[dict[str, str]]:
    """Chat turns as ``{role, content}`` text pairs, noting missing or mistyped parts."""
    if value is None:
        problems.missing.append("messages")
        return []
    if isinstance(value, str):  # a CSV cell or a string column holding JSON
        try:
            value = json.loads(value, strict=False)
        except json.JSONDecodeError:
            problems.wrong.append("messages is text that is not a JSON list")
            return []
    if not isinstance(value, list):
        problems.wrong.append(f"messages is a {type_name(value)}")
        return []
    turns: list[dict[str, str]] = []
    for index, message in enumerate(value):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.wrong.append(f"{name} is a {type_name(message)}")
            continue
        message = {mapping.message_keys.get(k, k): v for k, v in message.items()}
        role = problems.text(f"{name}.role", message.get("role"), required=True)
        content = problems.text(f"{name}.content", message.get("content"), required=True)
        role = role or ""
        role = mapping.roles.get(role, role).lower()
        turns.append({"role": mapping.roles.get(role, role), "content": content or ""})
    return turns


def _row(
    rid: str,
    fmt: str,
    system: str | None,
    instruction: str | None,
    input_text: str | None,
    output: str | None,
    messages: list[dict[str, str]],
    key: str | None = None,
    images: list[str] | None = None,
    check_malformed_row: str | None = None,
    check_required_fields: str | None = None,
    check_wrong_type: str | None = None,
    check_invalid_utf8: str | None = None,
) -> dict[str, Any]:
    return {
        "record_id": rid,
        "format": fmt,
        "system": system,
        "instruction": instruction,
        "input": input_text,
        "output": output,
        "messages": messages,
        "key": key,
        "images": images or [],
        "check_malformed_row": check_malformed_row,
        "check_required_fields": check_required_fields,
        "check_wrong_type": check_wrong_type,
        "check_invalid_utf8": check_invalid_utf8,
    }
