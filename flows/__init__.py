"""The Prefect flows. Importing the package sets up what every flow needs before Prefect loads:
nothing calls out (``OFFLINE_ENV``), the stages' own loggers reach the run's logs, and the
temporary server's start is one line (Prefect's adds a docs link to every start), and no log
line carries a credential (:mod:`milora.redact`)."""

import logging
import os

from milora.offline import OFFLINE_ENV
from milora.redact import install_log_redaction

for _key, _value in {**OFFLINE_ENV, "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,milora"}.items():
    os.environ.setdefault(_key, _value)

import prefect  # noqa: E402  (after the environment: Prefect reads it once, at import)

TEMPORARY_SERVER = "Starting temporary server on "


class _OneLineServerStart(logging.Filter):
    """Prefect's "Starting temporary server on URL / See <docs> ..." as one line, without the link."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(TEMPORARY_SERVER):
            address = message.splitlines()[0].removeprefix(TEMPORARY_SERVER)
            record.msg = (
                f"temporary Prefect server on {address} (set PREFECT_API_URL to use a server of your own)"
            )
            record.args = ()
        return True


logging.getLogger(prefect.__name__).addFilter(_OneLineServerStart())
install_log_redaction()  # Prefect's console and API handlers: no credential reaches its database
