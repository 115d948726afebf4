"""Per-row content checks: each gives the offending value of one rule, or None.

The Great Expectations suite judges these columns (``check_<rule>`` must be null,
``n_tokens`` within the context), so the logic that needs real code (Luhn, chat grammar,
tokenizers, benchmark n-grams) lives here, testable without GX, and the values it returns
are what a person reads in the failure summary and the Data Docs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from milora.data import pii
from milora.data.normalise import ROLES

# C0 and C1 controls and DEL; tab and newline are ordinary text (\r is normalised away).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def texts_of(row: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field name, text)`` pairs a row's content checks look at."""
    if row["format"] == "chat":
        return [(f"messages[{i}] ({m['role']})", m["content"]) for i, m in enumerate(row["messages"] or [])]
    pairs = [("system", row["system"]), ("instruction", row["instruction"]), ("input", row["input"])]
    pairs.append(("output", row["output"]))
    return [(name, text) for name, text in pairs if text]


def empty_text(row: dict[str, Any]) -> str | None:
    """The first required text that is present but blank."""
    if row["format"] == "chat":
        for index, message in enumerate(row["messages"] or []):
            if not message["content"].strip():
                return f"messages[{index}] ({message['role']}) is blank"
        return None
    if row["format"] == "unknown":
        return None
    for name in ("instruction", "output"):
        if row[name] is not None and not row[name].strip():
            return f"{name} is blank"
    return None


def control_chars(pairs: Sequence[tuple[str, str]]) -> str | None:
    """Where the first control character is, and which one."""
    for name, text in pairs:
        match = CONTROL.search(text)
        if match:
            return f"{name}: {match.group()!r} at character {match.start()}"
    return None


def chat_roles(messages: Sequence[dict[str, str]]) -> str | None:
    """Why a conversation's turns break ``[system] user assistant (user assistant)*``."""
    for index, message in enumerate(messages):
        if message["role"] not in ROLES:
            return f"messages[{index}] has unknown role {message['role']!r} (allowed: {', '.join(ROLES)})"
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        turns = turns[1:]
    offset = len(messages) - len(turns)
    if not turns:
        return "no user or assistant turn"
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = f"messages[{index + offset}]"
            if message["role"] == "system":
                return f"{where} is a system turn after the start"
            return f"{where} is {message['role']!r} where {expected!r} belongs (turns must alternate)"
    if turns[-1]["role"] != "assistant":
        return f"ends with a {turns[-1]['role']!r} turn: no assistant reply to learn"
    return None


def special_tokens(pairs: Sequence[tuple[str, str]], pattern: re.Pattern[str] | None) -> str | None:
    """Where the first special token written out as text is, and which one."""
    if pattern is None:
        return None
    for name, text in pairs:
        match = pattern.search(text)
        if match:
            return f"{name}: {match.group()!r} at character {match.start()}"
    return None


def special_tokens_pattern(tokens: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for ``tokens`` (longest first, so ``<|im_end|>`` is not read as a shorter
    one); None when there are none."""
    tokens = sorted({t for t in tokens if t and t.strip()}, key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _first(pairs: Sequence[tuple[str, str]], finder: Any, allow: re.Pattern[str] | None) -> str | None:
    for name, text in pairs:
        found = finder(text, allow)
        if found:
            return f"{name}: {found}"
    return None


def row_checks(
    row: dict[str, Any],
    pii_allow: re.Pattern[str] | None = None,
    special: re.Pattern[str] | None = None,
) -> dict[str, str | None]:
    """The content checks of one normalised row (structure was noted by ingest).

    ``pii_allow`` matches values that look personal but are public (a support address);
    ``special`` the base tokenizer's special tokens (:func:`special_tokens_pattern`).
    """
    if row["check_malformed_row"] is not None or row["format"] == "unknown":
        return dict.fromkeys(CONTENT_CHECKS)
    pairs = texts_of(row)
    return {
        "check_empty_text": empty_text(row),
        "check_control_chars": control_chars(pairs),
        "check_chat_roles": chat_roles(row["messages"] or []) if row["format"] == "chat" else None,
        "check_special_tokens": special_tokens(pairs, special),
        "check_pii_email": _first(pairs, pii.find_email, pii_allow),
        "check_pii_phone": _first(pairs, pii.find_phone, pii_allow),
        "check_pii_card": _first(pairs, pii.find_card, pii_allow),
    }


CONTENT_CHECKS: tuple[str, ...] = (
    "check_empty_text",
    "check_control_chars",
    "check_chat_roles",
    "check_special_tokens",
    "check_pii_email",
    "check_pii_phone",
    "check_pii_card",
)
