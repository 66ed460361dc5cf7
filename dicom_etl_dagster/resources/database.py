"""PostgreSQL resource: a URL from the environment, or an embedded server started on demand."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dagster as dg
import psycopg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.db.identifiers import Schemas

_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to log or show."""
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def default_embedded_data_dir() -> Path:
    if os.geteuid() == 0:
        # As root, pgserver runs PostgreSQL as its own user, which must be able to reach the
        # folder: keep it out of /root (pgserver would otherwise open up its permissions).
        return Path("/var/lib/dicom_etl_dagster/pgdata")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "dicom_etl_dagster" / "pgdata"


class DatabaseUnavailableError(Exception):
    """PostgreSQL cannot be reached; the message is one line and carries no password."""


def embedded_database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL kept in ``data_dir`` and return its URL.

    The server is left running after the process exits (cleanup_mode=None) so later runs
    and other step processes reuse it instead of paying a start-up each time.
    """
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    return server.get_uri()


def connect(url: str) -> psycopg.Connection:
    """An autocommit connection; callers open explicit transactions for their batches."""
    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=10, application_name="dicom_etl_dagster"
        )
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {redact_url(reason)}"
        ) from None


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
        return Path(
            self.embedded_data_dir
            or settings.EMBEDDED_PGDATA.value()
            or default_embedded_data_dir()
        )

    def url(self) -> str:
        return self.database_url or embedded_database_url(self.embedded_dir())

    def describe(self) -> str:
        """Where the data goes, safe to log: the redacted URL or the embedded data folder."""
        if self.database_url:
            return redact_url(self.database_url)
        return f"embedded PostgreSQL with data folder {self.embedded_dir()} (set {settings.DATABASE_URL.name} to use your own)"

    def connect(self) -> psycopg.Connection:
        try:
            return connect(self.url())
        except DatabaseUnavailableError as exc:
            # A one-line reason for the run's failure, not a stack of driver internals.
            raise dg.Failure(description=str(exc), allow_retries=False) from None

    def schemas(
        self, cdm: str | None = None, vocab: str | None = None, medical_imaging: str | None = None
    ) -> Schemas:
        return Schemas(
            cdm=cdm or self.cdm_schema_name,
            vocab=vocab or self.vocab_schema_name,
            medical_imaging=medical_imaging or self.medical_imaging_schema_name,
        )
