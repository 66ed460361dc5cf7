"""What the revisions share: ownership, catalog checks and the changes they make.

Every helper takes the migration's SQLAlchemy connection. DDL from the metadata goes through
it (so the schema translate map places it in the run's schemas); catalog look-ups use the
shared psycopg helpers of ``core/db/tables.py`` on the same underlying connection, so they
see the migration's own uncommitted changes. Each helper looks before it changes anything:
a revision built from them is a no-op where there is nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import psycopg
import sqlalchemy as sa
from alembic import op
from psycopg import sql
from sqlalchemy.schema import CreateIndex, SetColumnComment, SetTableComment

from dicom_etl_dagster.core.db import partitions
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.schema import MI, metadata, owned_table, real_schema
from dicom_etl_dagster.core.db.tables import (
    SEQUENCES,
    Tables,
    column_names,
    column_type,
    table_exists,
)

_NUMERIC = ("integer", "bigint", "smallint", "numeric")


def psycopg_connection(bind: sa.Connection) -> psycopg.Connection:
    """The psycopg connection under ``bind`` (same session, same transaction)."""
    return cast(psycopg.Connection, bind.connection.driver_connection)


def run_attributes() -> dict:
    """``config.attributes`` of the running migration (set by core/db/migrate.py)."""
    config = op.get_context().config
    assert config is not None, "the ETL's migrations run through core/db/migrate.py"
    return config.attributes


def run_schemas() -> Schemas:
    return cast(Schemas, run_attributes()["schemas"])


def metadata_index(table: str, name: str) -> sa.Index:
    """The metadata's index ``name`` of ``table``."""
    found = [
        index
        for t in metadata.tables.values()
        if t.name == table
        for index in t.indexes
        if index.name == name
    ]
    assert len(found) == 1, f"no index {name} on {table} in the metadata"
    return found[0]


# --------------------------------------------------------------------------
# Ownership
# --------------------------------------------------------------------------
def _owned_table_name(schemas: Schemas) -> sql.Identifier:
    return sql.Identifier(schemas.medical_imaging, owned_table.name)


def owned_tables(bind: sa.Connection, schemas: Schemas) -> set[str]:
    """Names of the medical-imaging tables the ETL owns (may upgrade)."""
    conn = psycopg_connection(bind)
    if not table_exists(conn, schemas.medical_imaging, owned_table.name):
        return set()
    rows = conn.execute(
        sql.SQL("SELECT table_name FROM {} WHERE table_schema = %s").format(
            _owned_table_name(schemas)
        ),
        [schemas.medical_imaging],
    ).fetchall()
    return {row[0] for row in rows}


def record_owned(
    bind: sa.Connection, schemas: Schemas, tables: Iterable[str], revision: str
) -> None:
    """Record ``tables`` (medical-imaging schema) as the ETL's; a table recorded before keeps
    the revision it was first recorded at. Creates the ownership table when missing."""
    owned_table.create(bind, checkfirst=True)
    conn = psycopg_connection(bind)
    for table in tables:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_schema, table_name, owned_since_revision)"
                " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
            ).format(_owned_table_name(schemas)),
            [schemas.medical_imaging, table, revision],
        )


def index_methods(bind: sa.Connection, schema: str, table: str) -> dict[str, str]:
    """Index name -> access method (btree, hash, ...) of the indexes of ``schema.table``."""
    conn = psycopg_connection(bind)
    rows = conn.execute(
        "SELECT ic.relname, am.amname FROM pg_index i"
        " JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam"
        " WHERE i.indrelid = to_regclass(%s)",
        [sql.Identifier(schema, table).as_string(conn)],
    ).fetchall()
    return {str(name): str(method) for name, method in rows}


# --------------------------------------------------------------------------
# Creating what is missing
# --------------------------------------------------------------------------
def create_missing(bind: sa.Connection, schemas: Schemas, revision: str) -> list[str]:
    """Create the metadata's missing tables (with indexes and comments) and sequences.

    Returns the ``schema.table`` names created; created medical-imaging tables are recorded
    as owned since ``revision``. Existing tables are not looked at.
    """
    conn = psycopg_connection(bind)
    created, owned = [], []
    for table in metadata.tables.values():
        schema = real_schema(table, schemas)
        if table_exists(conn, schema, table.name):
            continue
        table.create(bind)
        created.append(f"{schema}.{table.name}")
        if table.schema == MI:
            owned.append(table.name)
    record_owned(bind, schemas, owned, revision)
    ensure_sequences(bind, schemas)
    if f"{schemas.medical_imaging}.{partitions.TABLE}" in created:
        # Partitioned (the metadata's layout): usable at once, the writers add the rest.
        partitions.create_ahead(conn, Tables(schemas))
    return created


def ensure_sequences(bind: sa.Connection, schemas: Schemas) -> None:
    """Create missing id sequences, each starting above the ids its table already holds.

    Once, at creation: a user's (or the original plugin's) rows keep their ids. Columns the
    original plugin filled with UUID strings have nothing to start above.
    """
    conn = psycopg_connection(bind)
    tables = Tables(schemas)
    for sequence, table, column in SEQUENCES:
        if table_exists(conn, schemas.medical_imaging, sequence):
            continue
        conn.execute(sql.SQL("CREATE SEQUENCE {}").format(tables.sequence(sequence)))
        if column_type(conn, tables.schema_of(table), table, column) in _NUMERIC:
            conn.execute(
                sql.SQL(
                    "SELECT setval({seq}, coalesce((SELECT max({col}) FROM {tbl}), 0) + 1, false)"
                ).format(
                    seq=sql.Literal(tables.sequence_text(sequence, conn)),
                    col=sql.Identifier(column),
                    tbl=tables[table],
                )
            )


# --------------------------------------------------------------------------
# Upgrading owned tables
# --------------------------------------------------------------------------
def _comments(
    bind: sa.Connection, schemas: Schemas, table: sa.Table
) -> dict[str | None, str | None]:
    """Column name -> its comment in the database, and None -> the table's comment."""
    conn = psycopg_connection(bind)
    name = sql.Identifier(real_schema(table, schemas), table.name).as_string(conn)
    current: dict[str | None, str | None] = dict(
        conn.execute(
            "SELECT attname, col_description(attrelid, attnum) FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            [name],
        ).fetchall()
    )
    row = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [name]).fetchone()
    current[None] = None if row is None else row[0]
    return current


def add_missing_comments(bind: sa.Connection, schemas: Schemas, table: sa.Table) -> int:
    """COMMENT ON the table and on its columns that have no comment yet; returns how many.

    A comment someone wrote on an owned table is kept; columns the table lacks are skipped.
    """
    current = _comments(bind, schemas, table)
    changes = 0
    if table.comment and current.get(None, "") is None:
        bind.execute(SetTableComment(table))
        changes += 1
    for column in table.columns:
        if column.comment and column.name in current and current[column.name] is None:
            bind.execute(SetColumnComment(column))
            changes += 1
    return changes


def add_missing_columns(bind: sa.Connection, schemas: Schemas, table: sa.Table) -> list[str]:
    """ADD COLUMN the metadata's columns the table lacks, with their comments; returns their
    names. Only nullable columns without a default: existing rows get NULL and keep the rest."""
    conn = psycopg_connection(bind)
    schema = real_schema(table, schemas)
    present = column_names(conn, schema, table.name)
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        assert column.nullable and column.server_default is None, f"{column}: not addable"
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                sql.Identifier(schema, table.name),
                sql.Identifier(column.name),
                sql.SQL(column.type.compile(dialect=bind.dialect)),  # the metadata's type
            )
        )
        added.append(column.name)
    if added:
        add_missing_comments(bind, schemas, table)
    return added


def add_missing_defaults(bind: sa.Connection, schemas: Schemas, table: sa.Table) -> list[str]:
    """SET DEFAULT of the metadata's columns with a server default where the table's column
    has none (a catalog change: no row is rewritten); returns their names."""
    conn = psycopg_connection(bind)
    schema = real_schema(table, schemas)
    without_default = {
        name
        for (name,) in conn.execute(
            "SELECT a.attname FROM pg_attribute a LEFT JOIN pg_attrdef d"
            " ON (d.adrelid, d.adnum) = (a.attrelid, a.attnum)"
            " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
            " AND d.adbin IS NULL",
            [sql.Identifier(schema, table.name).as_string(conn)],
        )
    }
    changed = []
    for column in table.columns:
        if column.server_default is None or column.name not in without_default:
            continue
        conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                sql.Identifier(schema, table.name),
                sql.Identifier(column.name),
                sql.SQL(str(cast(sa.DefaultClause, column.server_default).arg)),  # the metadata's
            )
        )
        changed.append(column.name)
    return changed


def replace_earlier_comments(
    bind: sa.Connection, schemas: Schemas, table: sa.Table, earlier: Mapping[str | None, str]
) -> int:
    """Comments an earlier release wrote and the metadata has changed since: where the table
    still has the earlier text (``earlier``: column name, or None for the table, -> text), it
    gets the metadata's; a comment someone else wrote is kept. Returns how many changed."""
    current = _comments(bind, schemas, table)
    changes = 0
    for column_name, text in earlier.items():
        if current.get(column_name) != text:
            continue
        if column_name is None:
            bind.execute(SetTableComment(table))
        else:
            bind.execute(SetColumnComment(table.columns[column_name]))
        changes += 1
    return changes


def _index_shape(bind: sa.Connection, schema: str, name: str) -> tuple[str, bool, bool] | None:
    """(access method, unique, partial) of the index ``schema.name``; None if there is none."""
    conn = psycopg_connection(bind)
    row = conn.execute(
        "SELECT am.amname, i.indisunique, i.indpred IS NOT NULL FROM pg_index i"
        " JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam"
        " WHERE i.indexrelid = to_regclass(%s)",
        [sql.Identifier(schema, name).as_string(conn)],
    ).fetchone()
    return None if row is None else (str(row[0]), bool(row[1]), bool(row[2]))


def ensure_index(bind: sa.Connection, schemas: Schemas, index: sa.Index) -> bool:
    """Give the table the metadata's ``index`` if it lacks it or has it in another shape:
    another method, uniqueness, or partial where the metadata's is not (or the other way).

    The old index is renamed, the new one built, then the old one dropped, all in the
    migration's transaction. Returns whether anything changed.
    """
    table = index.table
    assert table is not None and index.name is not None
    schema = real_schema(table, schemas)
    options = index.dialect_options["postgresql"]
    wanted = (options["using"] or "btree", bool(index.unique), options["where"] is not None)
    shape = _index_shape(bind, schema, str(index.name))
    if shape == wanted:
        return False
    found = None if shape is None else shape[0]
    conn = psycopg_connection(bind)
    old = f"{index.name}_{found}_old"
    if found is not None:
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(schema, str(index.name)), sql.Identifier(old)
            )
        )
    bind.execute(CreateIndex(index))
    if found is not None:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, old)))
    return True
