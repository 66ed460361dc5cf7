"""PostgreSQL resource: a URL from the environment, or an embedded server started on demand."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import psycopg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.db.connection import (
    connect,
    embedded_data_dir,
    embedded_database_url,
    redact_url,
)
from dicom_etl_dagster.core.db.identifiers import Schemas


class PostgresResource(dg.ConfigurableResource):
    """The target OMOP database.

    ``database_url`` comes from ``DICOM_ETL_DATABASE_URL`` (wired with ``dg.EnvVar`` so the
    value never appears in run config). Unset, an embedded PostgreSQL (the ``pgserver``
    package) is started on demand in ``embedded_data_dir`` and reused across runs.
    Schema names are defaults; the options document of a run may override them.
    """

    database_url: str | None = None
    embedded_data_dir: str | None = None
    cdm_schema_name: str = "cdmdefault"
    vocab_schema_name: str = "cdmvocab"
    medical_imaging_schema_name: str = "cdmmedicalimaging"

    def embedded_dir(self) -> Path:
        return Path(self.embedded_data_dir) if self.embedded_data_dir else embedded_data_dir()

    def url(self) -> str:
        return self.database_url or embedded_database_url(self.embedded_dir())

    def describe(self) -> str:
        """Where the data goes, safe to log: the redacted URL or the embedded data folder."""
        if self.database_url:
            return redact_url(self.database_url)
        return f"embedded PostgreSQL with data folder {self.embedded_dir()} (set {settings.DATABASE_URL.name} to use your own)"

    def connect(self) -> psycopg.Connection:
        """An autocommit connection; raises DatabaseUnavailableError with a one-line reason."""
        return connect(self.url())

    def schemas(
        self, cdm: str | None = None, vocab: str | None = None, medical_imaging: str | None = None
    ) -> Schemas:
        return Schemas(
            cdm=cdm or self.cdm_schema_name,
            vocab=vocab or self.vocab_schema_name,
            medical_imaging=medical_imaging or self.medical_imaging_schema_name,
        )
