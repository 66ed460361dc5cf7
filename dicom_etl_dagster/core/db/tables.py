"""Where the ETL's tables are, and the few statements every domain shares.

``Tables(schemas)`` turns the run's three schema names into quoted identifiers once, so no
module composes a table name itself; the helpers below exist once, not once per domain
(existence checks, column look-ups, COPY, id reservation, row counts).

Id reservation (``reserve_ids``) hands out consecutive ranges to concurrent callers that hold
no common lock (the ingest reserves its metadata ids before it takes the ingest lock): each
reservation takes a session-level advisory lock keyed on the sequence, moves the sequence and
releases the lock, all inside one statement, so the lock is never held between statements.
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

#: The default of dicom_file_metadata's etl_created_datetime and etl_modified_datetime in
#: the ETL's table (revision 0008 on): the start of the batch's transaction, in the session's
#: time zone. The writer leaves both to it.
ROW_TIMESTAMP_DEFAULT = "LOCALTIMESTAMP"

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


def take_shared_advisory_lock(conn: psycopg.Connection, key: str) -> None:
    """``key``'s transaction-level advisory lock in shared mode: holders exclude only the
    holders of ``take_advisory_lock(key)``."""
    conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", [key])


def take_keyed_locks(conn: psycopg.Connection, key: str, items: Iterable[str]) -> None:
    """``key``'s advisory lock in shared mode, then one exclusive lock per item (transaction-
    level).

    Holders of ``key`` in exclusive mode (``take_advisory_lock``) exclude every holder of
    item locks; holders of item locks exclude each other only where their items meet. The
    item locks are taken in ascending order of their hashes, so two transactions cannot each
    hold an item the other waits for. They live in the two-integer advisory lock space
    (namespace ``hashtext(key)``), apart from the one-bigint locks of ``take_advisory_lock``
    and ``reserve_ids``; two items whose hashes collide only wait for each other needlessly.
    """
    take_shared_advisory_lock(conn, key)
    # The sorted subquery feeds the locking call row by row, in its order.
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(%s), item) FROM"
        " (SELECT DISTINCT hashtext(i) AS item FROM unnest(%s::text[]) AS i ORDER BY 1) AS s",
        [key, sorted(set(items))],
    )


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


def column_defaults(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str | None]:
    """Column name -> its default expression as the catalog writes it (None: no default)."""
    rows = conn.execute(
        "SELECT column_name, column_default FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        [schema, table],
    ).fetchall()
    return dict(rows)


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


#: One reservation: lock (keyed on the sequence), move the sequence by ``n``, unlock. Each step
#: reads the previous one's row, so PostgreSQL runs them in this order; MATERIALIZED keeps each
#: step evaluated exactly once.
_RESERVE = (
    "WITH locked AS MATERIALIZED (SELECT pg_advisory_lock(hashtext(%(key)s))::text AS done),"
    " reserved AS MATERIALIZED (SELECT setval(%(seq)s::regclass,"
    " nextval(%(seq)s::regclass) + %(n)s - 1) AS last FROM locked),"
    " unlocked AS MATERIALIZED (SELECT pg_advisory_unlock(hashtext(%(key)s)) AS released"
    " FROM reserved)"
    " SELECT reserved.last, unlocked.released FROM reserved, unlocked"
)


def sequence_lock_key(sequence_text: str) -> str:
    """The advisory lock key of a sequence's reservations (its quoted name)."""
    return f"dicom_etl_dagster.sequence:{sequence_text}"


def reserve_ids(conn: psycopg.Connection, sequence: sql.Identifier, count: int) -> int:
    """Reserve ``count`` consecutive ids of ``sequence`` and return the first (0 if none).

    One round trip whatever the count, and consecutive whoever else reserves from the same
    sequence at the same time (see the module docstring). Plain ``nextval`` callers of the
    sequence (none for the sequences reserved from) would not take part in that lock.
    """
    if count == 0:
        return 0
    name = sequence.as_string(conn)
    row = conn.execute(
        _RESERVE, {"key": sequence_lock_key(name), "seq": name, "n": count}
    ).fetchone()
    assert row is not None and row[1], "the sequence's reservation lock was not held"
    return int(row[0]) - count + 1


def release_session_locks(conn: psycopg.Connection) -> None:
    """After a failed statement: release the session-level advisory locks it may have kept.

    ``reserve_ids``'s lock is held only inside its statement; if that statement fails between
    lock and unlock, the session keeps it and every later reservation from the sequence would
    wait for ever. The ETL holds no other session-level advisory lock, so releasing all is
    safe. A broken connection needs nothing: its session (and its locks) is gone.
    """
    if conn.closed or conn.broken:
        return
    try:
        conn.execute("SELECT pg_advisory_unlock_all()")
    except psycopg.Error:  # a connection failing now is closed by its owner: nothing is held
        pass


def row_count(conn: psycopg.Connection, table: sql.Identifier) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    return 0 if row is None else int(row[0])
