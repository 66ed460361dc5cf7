"""${message}

(Describe why this revision exists and what an ETL-owned table of the older shape lacks.)

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import owned_tables, run_schemas

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    owned = owned_tables(bind, schemas)
    # Check the catalog before each change: a no-op on tables created at head.
    raise NotImplementedError(f"write the upgrade of {sorted(owned)}")


def downgrade() -> None:
    raise NotImplementedError("the ETL never downgrades a schema")
