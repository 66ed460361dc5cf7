"""The ingest's closed sets of words: ledger statuses, the missing-person and PHI policies.

They are ``StrEnum``s so that a typo is an error instead of a silent mismatch, while every
member still *is* its text: psycopg sends it as plain text (query parameters and COPY
rows alike), ``==`` against a string from the database or the options holds, and a
``Counter`` keyed by members answers ``counts["ingested"]``. Python 3.10 has no
``enum.StrEnum``; the fallback below behaves the same for everything the ETL does with it.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - exercised on Python 3.10 only

    class StrEnum(str, Enum):
        """``enum.StrEnum`` of Python 3.11: members are their value in str() and format()."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return format(str(self.value), format_spec)


class LedgerStatus(StrEnum):
    """``dicom_ingest_log.status`` (the table's CHECK constraint allows exactly these)."""

    INGESTED = "ingested"
    FAILED = "failed"
    DUPLICATE = "duplicate"  # the same SOP instance is ingested from another path


class MissingPersonPolicy(StrEnum):
    """``missing_person_id_options``: what a file whose patient has no person gets."""

    SKIP = "skip"  # the file fails, with the reason
    USE_ID_ZERO = "use_id_zero"  # the file is ingested with person_id 0

    @classmethod
    def parse(cls, value: str) -> MissingPersonPolicy:
        """The policy named by ``value`` in any case and spacing; ValueError if none is."""
        return cls(str(value).strip().lower())


class PhiPolicy(StrEnum):
    """``phi_policy``: what dicom_file_metadata copies of a file (``core/dicom/phi.py``)."""

    KEEP = "keep"  # every element, as the original plugin
    DROP = "drop"  # not the PS3.15 Basic Profile's attributes, not private elements

    @classmethod
    def parse(cls, value: str) -> PhiPolicy:
        """The policy named by ``value`` in any case and spacing; ValueError if none is."""
        return cls(str(value).strip().lower())
