"""Credentials never shown or stored: URIs with a password or token are redacted wherever
the pipeline prints, logs or records text (run records, report pages, Prefect's state
messages and logs, ``register show``).

``MLFLOW_TRACKING_URI=https://user:secret@host`` is a normal way to reach an authenticated
server; its password must not travel further than the client that uses it.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://user:password@  or  scheme://token@  (the user info of any URI)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^\s/@?#]+)@")
# ?password=... &token=... (query parameters that carry a secret)
_QUERY = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|api_key|apikey|secret|client_secret|sig|"
    r"signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;\s#'\"]+",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["info"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def redact(text: str) -> str:
    """``text`` with every URI's password (or bare token) and secret query values masked."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", _USERINFO.sub(_userinfo, text))


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record's message and traceback with credentials masked (in place)."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when the record is emitted
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    return record


def install_log_redaction() -> None:
    """Mask credentials in every log record this process creates, whichever handler (console,
    file, Prefect's API) emits it later: a record factory, so handlers that a library adds or
    reconfigures afterwards are covered too. Idempotent."""
    current = logging.getLogRecordFactory()
    if getattr(current, "redacting", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return redact_record(current(*args, **kwargs))

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
