"""What every asset does first: turn known errors into one-line failures, open the database."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dagster as dg
import psycopg

from dicom_etl_dagster.config import EtlOptions, run_schemas
from dicom_etl_dagster.core.db.identifiers import InvalidIdentifierError, Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.vocabulary.files import VocabularyFileError
from dicom_etl_dagster.resources.database import (
    DatabaseUnavailableError,
    PostgresResource,
    redact_url,
)

#: Errors whose message is the whole story: the run fails with that line, not a traceback.
CLEAR_ERRORS = (VocabularyFileError, InvalidIdentifierError, DatabaseUnavailableError)


def markdown_table(header: tuple[str, ...], rows) -> str:
    """A small markdown table for materialization metadata (the UI renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def clear_failures() -> Iterator[None]:
    try:
        yield
    except CLEAR_ERRORS as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


@contextlib.contextmanager
def database_session(
    context: dg.AssetExecutionContext, options: EtlOptions, database: PostgresResource
) -> Iterator[tuple[psycopg.Connection, Schemas]]:
    """A connection to the target database with the ETL's tables in place."""
    with clear_failures():
        schemas = run_schemas(options, database)  # validates names before any SQL runs
        context.log.info(f"Target database: {database.describe()}; schemas {schemas}")
        with database.connect() as conn:
            created = ensure_tables(conn, schemas)
            if created:
                context.log.info(f"Created tables: {', '.join(created)}")
            try:
                yield conn, schemas
            except psycopg.OperationalError as exc:
                # The server went away mid-run (restart, failover, network): whole batches
                # are committed or not, so the message can tell the user what to do.
                reason = redact_url((str(exc).strip().splitlines() or [type(exc).__name__])[0])
                raise dg.Failure(
                    description=f"lost the connection to PostgreSQL ({database.describe()}): {reason}. "
                    "Batches committed before are kept; re-run to finish the rest.",
                    allow_retries=False,
                ) from None
