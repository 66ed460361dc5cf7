"""What every asset does: one-line failures, a database session with the schema in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import dagster as dg
import psycopg

from dicom_etl_dagster.config import EtlOptions, run_schemas
from dicom_etl_dagster.core.db.connection import connection_lost
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.resources.database import PostgresResource


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A small markdown table for materialization metadata (the UI renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def dagster_failures() -> Iterator[None]:
    """The one place where the product's errors become the run's failure.

    A ``DicomEtlError`` carries a one-line message without PHI or secrets, so the run fails
    with exactly that line (and its metadata) instead of a stack trace; it is retried only
    when the error says a retry may succeed.
    """
    try:
        yield
    except DicomEtlError as exc:
        raise dg.Failure(
            description=str(exc), metadata=exc.metadata or None, allow_retries=exc.retryable
        ) from None


@contextlib.contextmanager
def database_session(
    context: dg.AssetExecutionContext, options: EtlOptions, database: PostgresResource
) -> Iterator[tuple[psycopg.Connection, Tables]]:
    """A connection to the target database with the ETL's tables in place.

    Call it inside ``dagster_failures()``: a lost connection becomes a ``DicomEtlError``.
    The options are checked first (unknown keys, a document meant for the other job), so a
    mistaken document changes nothing.
    """
    options.check_for(context.job_name)
    tables = Tables(run_schemas(options, database))  # validates names before any SQL runs
    context.log.info(f"Target database: {database.describe()}; schemas {tables.schemas}")
    with database.connect() as conn:
        try:
            created = ensure_tables(conn, tables.schemas)
            if created:
                context.log.info(f"Created tables: {', '.join(created)}")
            yield conn, tables
        except psycopg.OperationalError as exc:
            # The server went away mid-run (restart, failover, network): whole batches are
            # committed or not, so the message can tell the user what to do.
            raise connection_lost(exc, database.describe()) from None
