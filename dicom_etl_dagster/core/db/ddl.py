"""Create the tables and sequences the ETL needs, never touching tables that exist.

The DDL lives in ``dicom_etl_dagster/sql/*.sql``, one file per schema part, split into
blocks by ``-- table: <name>`` markers. A block (the table and its indexes) runs only when
the table is missing, so a user's existing OMOP CDM and Athena vocabulary are never altered.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_BLOCK_MARKER = re.compile(r"^-- table: (\w+)\s*$", re.MULTILINE)

#: (sequence, table, id column): ids come from these sequences, never from max()+1.
SEQUENCES = (
    ("dicom_etl_procedure_occurrence_id_seq", "procedure_occurrence", "procedure_occurrence_id"),
    ("dicom_etl_image_occurrence_id_seq", "image_occurrence", "image_occurrence_id"),
    ("dicom_etl_data_element_id_seq", "dicom_data_element", "data_element_id"),
    ("dicom_etl_metadata_id_seq", "dicom_file_metadata", "metadata_id"),
    ("dicom_etl_dataset_id_seq", "dicom_file_metadata", "parent_dataset_id"),
    ("dicom_etl_ingest_log_id_seq", "dicom_ingest_log", "ingest_log_id"),
    ("dicom_etl_file_upload_id_seq", "file_upload_metadata", "file_upload_id"),
)


def _table_blocks(sql_file: str) -> list[tuple[str, str]]:
    text = (SQL_DIR / sql_file).read_text()
    parts = _BLOCK_MARKER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def _table_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s)", [sql.Identifier(schema, table).as_string(conn)]
    ).fetchone()
    return row[0] is not None


def _schema_for_table(schemas: Schemas) -> dict[str, str]:
    return {
        "vocabulary.sql": schemas.vocab,
        "cdm.sql": schemas.cdm,
        "medical_imaging.sql": schemas.medical_imaging,
    }


def ensure_tables(
    conn: psycopg.Connection, schemas: Schemas, files: tuple[str, ...] | None = None
) -> list[str]:
    """Create missing schemas, tables and ETL sequences; return the tables created.

    Runs in one transaction under an advisory lock so that two runs starting together do
    not race on CREATE.
    """
    created: list[str] = []
    targets = _schema_for_table(schemas)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dicom_etl_dagster.ddl'))")
        for sql_file, schema in targets.items():
            if files is not None and sql_file not in files:
                continue
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            for table, body in _table_blocks(sql_file):
                if _table_exists(conn, schema, table):
                    continue
                conn.execute(sql.SQL(body).format(schema=sql.Identifier(schema)))
                created.append(f"{schema}.{table}")
        if files is None or "medical_imaging.sql" in files:
            _ensure_sequences(conn, schemas)
    return created


def _ensure_sequences(conn: psycopg.Connection, schemas: Schemas) -> None:
    for sequence, table, column in SEQUENCES:
        if _table_exists(conn, schemas.medical_imaging, sequence):
            continue
        seq = sequence_name(schemas, sequence)
        conn.execute(sql.SQL("CREATE SEQUENCE {}").format(seq))
        # Start above whatever a user (or the original plugin) already wrote, once. Columns
        # the original plugin filled with UUID strings have nothing to start above.
        schema = schemas.cdm if table == "procedure_occurrence" else schemas.medical_imaging
        if _numeric_column(conn, schema, table, column):
            conn.execute(
                sql.SQL(
                    "SELECT setval({seq}, coalesce((SELECT max({col}) FROM {tbl}), 0) + 1, false)"
                ).format(
                    seq=sql.Literal(seq.as_string(conn)),
                    col=sql.Identifier(column),
                    tbl=sql.Identifier(schema, table),
                )
            )


def _numeric_column(conn: psycopg.Connection, schema: str, table: str, column: str) -> bool:
    row = conn.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
        " AND column_name = %s",
        [schema, table, column],
    ).fetchone()
    return row is not None and row[0] in ("integer", "bigint", "smallint", "numeric")


def sequence_name(schemas: Schemas, sequence: str) -> sql.Composable:
    return sql.Identifier(schemas.medical_imaging, sequence)
