"""Revision 4: private dictionary entries per private creator.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import create_missing, run_attributes, run_schemas

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    created = create_missing(op.get_bind(), run_schemas(), revision)
    run_attributes().setdefault("created", []).extend(created)


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
