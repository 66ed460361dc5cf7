"""Validation of SQL identifiers that come from configuration.

Schema, table and column names from the options document end up in SQL. They are checked
against a plain-identifier pattern *before* any statement runs, and then always quoted
with psycopg.sql.Identifier; values never go through this path, they are parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dicom_etl_dagster.core.errors import DicomEtlError

_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


class InvalidIdentifierError(DicomEtlError, ValueError):
    """A configured schema/table/column name is not a plain SQL identifier."""


def validate_identifier(name: str, what: str) -> str:
    if not isinstance(name, str) or not _PLAIN_IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not a plain SQL identifier (letters, digits, _ and $, "
            "starting with a letter or _, at most 63 characters); nothing was run"
        )
    return name


@dataclass(frozen=True)
class Schemas:
    """The three schemas the ETL writes to (names validated on construction)."""

    cdm: str = "cdmdefault"
    vocab: str = "cdmvocab"
    medical_imaging: str = "cdmmedicalimaging"

    def __post_init__(self) -> None:
        validate_identifier(self.cdm, "cdm_schema_name")
        validate_identifier(self.vocab, "vocab_schema_name")
        validate_identifier(self.medical_imaging, "medical_imaging_schema_name")
