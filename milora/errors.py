"""The library's promise about its errors: the ones a user fixes from the message alone.

Such errors (a missing adapter, a suite file in the wrong format, a run folder holding
another run, a loss that went non-finite) derive from :class:`UserFacingError`: a command
prints the message without a traceback and exits 1, instead of a stack trace for a problem
that is not a bug.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message says what to fix; printed without a traceback."""
