"""The one base class of the errors a user can act on.

A ``DicomEtlError`` message is the whole story in one line: what is wrong and what to do,
with no patient data and no secrets, so the Dagster layer can show it as the run's failure
as it is (``assets.common.dagster_failures`` turns it into a ``dg.Failure``, in one place)
instead of a stack trace. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class DicomEtlError(Exception):
    """An error with a one-line, PHI-free, secret-free message; optional metadata for the UI."""

    #: Whether running the same step again may succeed (a server that comes back); most
    #: errors are about configuration or data, which a retry would meet again.
    retryable = False

    def __init__(self, message: str, *, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metadata = metadata or {}


class OptionsError(DicomEtlError):
    """A value of the options document cannot be used (the message names the key)."""
