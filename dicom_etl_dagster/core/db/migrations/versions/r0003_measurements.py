"""Revision 3: measurements and image features.

Creates the OMOP ``measurement`` table in the CDM schema when it is missing (an existing one,
the normal case in a CDM, is used as it is), the ETL's provenance table of SR / SEG rows and
the id sequences of measurement, image_feature and image_finding_id, each starting above the
ids already there. Nothing existing is altered.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import create_missing, run_attributes, run_schemas

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    created = create_missing(op.get_bind(), run_schemas(), revision)
    run_attributes().setdefault("created", []).extend(created)


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
