"""Revision 5: odd values counted per file in the ledger.

``dicom_ingest_log`` gets ``value_warnings`` and ``value_warning_tags`` (nullable, with their
comments): how many elements of the file violate their VR and the first of their tags. Rows
recorded before keep NULL there (not counted). A ledger a user created is not altered.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    add_missing_columns,
    create_missing,
    owned_tables,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import dicom_ingest_log

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    if dicom_ingest_log.name in owned_tables(bind, schemas):
        add_missing_columns(bind, schemas, dicom_ingest_log)
    created = create_missing(bind, schemas, revision)
    run_attributes().setdefault("created", []).extend(created)


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
