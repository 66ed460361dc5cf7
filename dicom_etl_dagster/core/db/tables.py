"""Where the ETL's tables are, and the few statements every domain shares.

``Tables(schemas)`` turns the run's three schema names into quoted identifiers once, so no
module composes a table name itself; the helpers below exist once, not once per domain
(existence checks, column look-ups, COPY, id reservation, row counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas

#: (sequence, table, id column): ids come from these sequences, never from max()+1. They live
#: in the medical-imaging schema so that the user's CDM schema only receives rows.
SEQUENCES = (
    ("dicom_etl_procedure_occurrence_id_seq", "procedure_occurrence", "procedure_occurrence_id"),
    ("dicom_etl_image_occurrence_id_seq", "image_occurrence", "image_occurrence_id"),
    ("dicom_etl_data_element_id_seq", "dicom_data_element", "data_element_id"),
    ("dicom_etl_metadata_id_seq", "dicom_file_metadata", "metadata_id"),
    ("dicom_etl_dataset_id_seq", "dicom_file_metadata", "parent_dataset_id"),
    ("dicom_etl_ingest_log_id_seq", "dicom_ingest_log", "ingest_log_id"),
    ("dicom_etl_file_upload_id_seq", "file_upload_metadata", "file_upload_id"),
    ("dicom_etl_measurement_id_seq", "measurement", "measurement_id"),
    ("dicom_etl_image_feature_id_seq", "image_feature", "image_feature_id"),
    ("dicom_etl_image_finding_id_seq", "image_feature", "image_finding_id"),
)

#: Alembic's version table of the ETL's schema, in the medical-imaging schema.
VERSION_TABLE = "dicom_etl_schema_version"

#: Tables of the OMOP CDM schema and of the vocabulary schema; every other table is in the
#: medical-imaging schema.
CDM_TABLES = frozenset({"person", "procedure_occurrence", "measurement", "visit_occurrence"})
VOCABULARY_TABLES = frozenset({"vocabulary", "concept_class", "concept", "concept_relationship"})


@dataclass(frozen=True)
class Tables:
    """The quoted names of the ETL's tables, sequences and lock keys for one set of schemas."""

    schemas: Schemas

    def schema_of(self, table: str) -> str:
        if table in CDM_TABLES:
            return self.schemas.cdm
        if table in VOCABULARY_TABLES:
            return self.schemas.vocab
        return self.schemas.medical_imaging

    def __getitem__(self, table: str) -> sql.Identifier:
        """``tables["image_occurrence"]``: the schema-qualified, quoted table name."""
        return sql.Identifier(self.schema_of(table), table)

    def qualified(self, table: str) -> str:
        """``schema.table`` for messages and metadata (names are validated identifiers)."""
        return f"{self.schema_of(table)}.{table}"

    def sequence(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schemas.medical_imaging, name)

    def sequence_text(self, name: str, conn: psycopg.Connection) -> str:
        """The sequence as a quoted SQL string, for ``nextval(%s::regclass)`` parameters."""
        return self.sequence(name).as_string(conn)

    @property
    def ingest_lock_key(self) -> str:
        """Advisory lock serialising the ingest batches written into this medical-imaging schema."""
        return f"dicom_etl_dagster.ingest:{self.schemas.medical_imaging}"

    @property
    def upload_lock_key(self) -> str:
        return "dicom_etl_dagster.file_upload_metadata"


def take_advisory_lock(conn: psycopg.Connection, key: str) -> None:
    """A transaction-level advisory lock on ``key`` (released at commit or rollback)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])


def table_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s)", [sql.Identifier(schema, table).as_string(conn)]
    ).fetchone()
    return row is not None and row[0] is not None


def column_names(conn: psycopg.Connection, schema: str, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        [schema, table],
    ).fetchall()
    return {row[0] for row in rows}


def column_type(conn: psycopg.Connection, schema: str, table: str, column: str) -> str | None:
    """information_schema's data_type of the column, or None if there is no such column."""
    row = conn.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = %s AND column_name = %s",
        [schema, table, column],
    ).fetchone()
    return None if row is None else str(row[0])


def copy_rows(
    conn: psycopg.Connection,
    table: sql.Composable,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> int:
    """COPY ``rows`` into ``table``; returns how many were written."""
    written = 0
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        table, sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            written += 1
    return written


def reserve_ids(conn: psycopg.Connection, sequence: sql.Identifier, count: int) -> int:
    """Reserve ``count`` consecutive ids of ``sequence`` and return the first (0 if none).

    One round trip whatever the count. Consecutive only while every writer of the sequence
    holds the same lock (the ingest lock for the ingest's sequences).
    """
    if count == 0:
        return 0
    name = sequence.as_string(conn)
    row = conn.execute(
        "SELECT setval(%s::regclass, nextval(%s::regclass) + %s - 1)", [name, name, count]
    ).fetchone()
    assert row is not None
    return int(row[0]) - count + 1


def row_count(conn: psycopg.Connection, table: sql.Identifier) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    return 0 if row is None else int(row[0])
