"""Revision 6: uploads the server rejected for their content.

Creates ``file_upload_rejection`` (medical-imaging schema, owned by the ETL since this
revision) when it is missing. It is a table of its own, so ``file_upload_metadata``, which
may be the original plugin's, is not altered. A database created at head already has it
(revision 1 creates everything missing): then this is a no-op.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import create_missing, run_attributes, run_schemas

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    created = create_missing(op.get_bind(), run_schemas(), revision)
    run_attributes().setdefault("created", []).extend(created)


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
