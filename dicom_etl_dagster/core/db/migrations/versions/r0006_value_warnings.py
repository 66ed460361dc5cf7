"""Revision 6: odd values counted per file in the ledger.

``dicom_ingest_log`` gets ``value_warnings`` and ``value_warning_tags`` (nullable, with their
comments): how many elements of the file violate their VR and the first of their tags. The
ledger is always the ETL's own table; rows recorded before keep NULL there (not counted).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrations.support import (
    create_missing,
    owned_tables,
    psycopg_connection,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import dicom_ingest_log, real_schema
from dicom_etl_dagster.core.db.tables import column_names

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ADDED_COLUMNS = ("value_warnings", "value_warning_tags")


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    created = create_missing(bind, schemas, revision)
    run_attributes().setdefault("created", []).extend(created)
    if dicom_ingest_log.name in owned_tables(bind, schemas):
        add_missing_columns(bind, schemas, dicom_ingest_log, ADDED_COLUMNS)


def add_missing_columns(
    bind: sa.Connection, schemas: Schemas, table: sa.Table, names: tuple[str, ...]
) -> list[str]:
    """ALTER TABLE ... ADD COLUMN for each of ``names`` the table lacks, as the metadata has
    it (type, nullability, comment); returns the names added. Nullable columns only: rows
    already there get NULL, nothing is rewritten."""
    schema = real_schema(table, schemas)
    present = column_names(psycopg_connection(bind), schema, table.name)
    added = []
    for name in names:
        if name in present:
            continue
        column = table.c[name]
        assert column.nullable, f"{table.name}.{name}: only nullable columns can be added"
        op.add_column(
            table.name,
            sa.Column(name, column.type, nullable=True, comment=column.comment),
            schema=schema,
        )
        added.append(name)
    return added


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
