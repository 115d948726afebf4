"""Personal data detectors: e-mail addresses, phone numbers, payment card numbers.

Deliberately conservative (a false alarm quarantines a good row): a phone number needs 9-15
digits written in a phone-like way, a card number 13-19 digits that pass the Luhn check.
Matches are masked before they are reported, so reports and Data Docs never repeat the
personal data they found.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d]|[.,]\d)")
PHONE = re.compile(
    r"(?<![\w+.,/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?![\w.,/-]?\d)(?![\w])"
)
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4})$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_digits(text: str, keep: int) -> str:
    """Every digit but the last ``keep`` replaced by ``*``."""
    count = sum(c.isdigit() for c in text)
    out, seen = [], 0
    for char in text:
        if char.isdigit():
            seen += 1
            out.append(char if seen > count - keep else "*")
        else:
            out.append(char)
    return "".join(out)


_NO_DIGITS = str.maketrans("", "", "0123456789")


def _digit_count(text: str) -> int:
    """Cheap pre-check: phone and card numbers need at least 9 digits."""
    return len(text) - len(text.translate(_NO_DIGITS))


def allow_pattern(patterns: list[str] | tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex from the allowed values (public company addresses, a hotline), or None."""
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def _allowed(value: str, allow: re.Pattern[str] | None) -> bool:
    return allow is not None and allow.fullmatch(value) is not None


def find_email(text: str, allow: re.Pattern[str] | None = None) -> str | None:
    """The first e-mail address not allowed, masked (``j***@example.com``)."""
    if "@" not in text:
        return None
    for match in EMAIL.finditer(text):
        if _allowed(match.group(), allow):
            continue
        local, _, domain = match.group().partition("@")
        return f"{local[0]}***@{domain}"
    return None


def find_card(text: str, allow: re.Pattern[str] | None = None) -> str | None:
    """The first Luhn-valid card number, all but its last four digits masked."""
    if _digit_count(text) < 13:
        return None
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if (
            13 <= len(digits) <= 19
            and len(set(digits)) > 1
            and luhn_ok(digits)
            and not _allowed(match.group(), allow)
        ):
            return _mask_digits(match.group(), 4)
    return None


def find_phone(text: str, allow: re.Pattern[str] | None = None) -> str | None:
    """The first phone-shaped number not allowed, all but its last two digits masked."""
    if _digit_count(text) < 9:
        return None
    for match in PHONE.finditer(text):
        value = match.group()
        if _allowed(value, allow):
            continue
        digits = re.sub(r"\D", "", value)
        if not 9 <= len(digits) <= 15 or _DATE.match(value) or _IPV4.match(value):
            continue
        separators = len(re.findall(r"[ .-]", value))
        if not (value.startswith("+") or "(" in value or separators >= 2):
            continue
        if len(digits) >= 13 and luhn_ok(digits):  # a card number, reported as such
            continue
        return _mask_digits(value, 2)
    return None
