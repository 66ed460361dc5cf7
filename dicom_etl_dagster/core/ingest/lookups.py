"""What the planner needs to know from the database about a batch, read as typed rows.

Why a module of its own: the writer reads these rows twice, without and under the ingest
lock (``same_rows`` compares the two), the scan reads the ledger rows without it (to skip
what is done before parsing), and the planner's input
types (``plan.DatabaseRows``) say exactly what they are. Every look-up is one query for
the whole batch, built into the planner's dataclasses by psycopg's ``class_row``; a look-up
with nothing to look up is not sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.ingest.parse_pool import Parsed, ParseResult
from dicom_etl_dagster.core.ingest.plan import (
    DatabaseRows,
    ExistingSeries,
    ExistingStudy,
    IngestedSop,
    LedgerRow,
    PersonMatch,
    pending,
)
from dicom_etl_dagster.core.ingest.status import LedgerStatus

Row = TypeVar("Row")


@dataclass(frozen=True)
class PersonMapping:
    """The validated mapping table (identifiers checked by the caller)."""

    schema: str
    table: str
    person_column: str
    patient_column: str


def _rows(
    conn: psycopg.Connection, row_type: type[Row], query: sql.Composed, params: Sequence[Any]
) -> list[Row]:
    return conn.cursor(row_factory=class_row(row_type)).execute(query, params).fetchall()


def ledger_rows(conn: psycopg.Connection, tables: Tables, paths: Sequence[str]) -> list[LedgerRow]:
    """The ledger's rows for ``paths`` (whatever their status)."""
    query = sql.SQL(
        "SELECT file_path, file_size, file_mtime_ns, status, sop_instance_uid FROM {}"
        " WHERE file_path = ANY(%s)"
    ).format(tables["dicom_ingest_log"])
    return _rows(conn, LedgerRow, query, [list(paths)]) if paths else []


def batch_rows(
    conn: psycopg.Connection,
    tables: Tables,
    mapping: PersonMapping | None,
    results: Sequence[ParseResult],
) -> DatabaseRows:
    """Everything the planner reads for ``results``; the files already done are not looked up."""
    ledger = ledger_rows(conn, tables, [r.entry.path for r in results])
    instances = [r.instance for r in pending(results, ledger) if isinstance(r, Parsed)]
    patient_ids = {i.patient_id for i in instances if i.patient_id}
    return DatabaseRows(
        ledger=ledger,
        ingested=_ingested(conn, tables, sorted({i.sop_instance_uid for i in instances})),
        persons=_persons(conn, mapping, patient_ids) if mapping else [],
        series=_series(conn, tables, sorted({i.series_instance_uid for i in instances})),
        studies=_studies(conn, tables, sorted({i.study_instance_uid for i in instances})),
    )


def same_rows(a: DatabaseRows, b: DatabaseRows) -> bool:
    """Whether two look-ups found the same rows, whatever order the queries returned them in
    (the planner's decisions depend on the rows, not on their order)."""
    return all(Counter(getattr(a, f.name)) == Counter(getattr(b, f.name)) for f in fields(a))


def _ingested(conn: psycopg.Connection, tables: Tables, sops: list[str]) -> list[IngestedSop]:
    # The status is a literal, not a parameter: only a predicate the planner can see lets it use
    # the partial unique index (WHERE status = 'ingested'). psycopg prepares a statement after
    # five executions, and PostgreSQL's generic plan for "status = $1" scans the whole ledger,
    # which made every batch slower than the one before.
    query = sql.SQL(
        "SELECT sop_instance_uid, file_path, image_occurrence_id FROM {} WHERE status = {}"
        " AND sop_instance_uid = ANY(%s)"
    ).format(tables["dicom_ingest_log"], sql.Literal(LedgerStatus.INGESTED.value))
    return _rows(conn, IngestedSop, query, [sops]) if sops else []


def _persons(
    conn: psycopg.Connection, mapping: PersonMapping, patient_ids: set[str]
) -> list[PersonMatch]:
    """The persons of the patients, compared case-insensitively like the original plugin."""
    query = sql.SQL(
        "SELECT upper(CAST({patient} AS text)) AS patient_key,"
        " CAST(min({person}) AS text) AS person_id, count(DISTINCT {person}) AS persons"
        " FROM {table} WHERE upper(CAST({patient} AS text)) = ANY(%s) GROUP BY 1"
    ).format(
        patient=sql.Identifier(mapping.patient_column),
        person=sql.Identifier(mapping.person_column),
        table=sql.Identifier(mapping.schema, mapping.table),
    )
    keys = sorted({p.upper() for p in patient_ids})
    return _rows(conn, PersonMatch, query, [keys]) if keys else []


def _series(conn: psycopg.Connection, tables: Tables, uids: list[str]) -> list[ExistingSeries]:
    query = sql.SQL(
        "SELECT image_series_uid, image_occurrence_id FROM {} WHERE image_series_uid = ANY(%s)"
    ).format(tables["image_occurrence"])
    return _rows(conn, ExistingSeries, query, [uids]) if uids else []


def _studies(conn: psycopg.Connection, tables: Tables, uids: list[str]) -> list[ExistingStudy]:
    """A study's procedure per person: the first one written, if several were."""
    query = sql.SQL(
        "SELECT image_study_uid, person_id, min(procedure_occurrence_id) AS procedure_occurrence_id"
        " FROM {} WHERE image_study_uid = ANY(%s) GROUP BY 1, 2"
    ).format(tables["image_occurrence"])
    return _rows(conn, ExistingStudy, query, [uids]) if uids else []
