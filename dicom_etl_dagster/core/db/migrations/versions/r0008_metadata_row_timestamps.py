"""Revision 8: the EAV table fills its rows' timestamps itself.

``dicom_file_metadata.etl_created_datetime`` and ``etl_modified_datetime`` get the default
``LOCALTIMESTAMP`` (the start of the batch's transaction), so the writer leaves both out
of its COPY: parsing two text timestamps per row was about a fifth of PostgreSQL's CPU per
metadata row. A catalog change only: no row is rewritten, partitions included. The ETL's
table, plain or partitioned, gets it; a user's table is left alone, and the writer keeps
sending the same values to it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    add_missing_defaults,
    create_missing,
    owned_tables,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import dicom_file_metadata

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    if dicom_file_metadata.name in owned_tables(bind, schemas):
        add_missing_defaults(bind, schemas, dicom_file_metadata)
    run_attributes().setdefault("created", []).extend(create_missing(bind, schemas, revision))


def downgrade() -> None:
    raise NotImplementedError("the ETL never downgrades a schema")
