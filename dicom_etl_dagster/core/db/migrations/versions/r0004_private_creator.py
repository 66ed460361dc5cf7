"""Revision 4: private dictionary entries per private creator.

A private tag means nothing without its creator, and its block number varies per file, so
``dicom_data_element`` keys private entries by (private creator, ``(gggg,xxee)``) from now
on (``core/ingest/private_entries.py``). An ETL-owned dicom_data_element gets the nullable
``private_creator`` column (NULL in every existing row), the unique index on the tag becomes
partial (public tags, and everything written before, keep their key: the tag, creator NULL)
and a second unique index keys the per-creator entries. The comments that described the old
keying are replaced where nobody edited them.

Existing rows are not changed: private entries written before stay as they are (keyed by
tag, named after whichever creator's file came first) and the metadata rows that point at
them keep pointing there; files ingested from now on get per-creator entries. A
dicom_data_element a user created is not altered (the ingest then keys private entries by
tag, as before). Tables created at head have all of this already: a no-op for them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    add_missing_columns,
    create_missing,
    ensure_index,
    metadata_index,
    owned_tables,
    replace_earlier_comments,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import dicom_data_element

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: What revisions up to 0003 wrote (frozen here: the metadata has the new texts).
EARLIER_COMMENTS: dict[str | None, str] = {
    None: "The DICOM data dictionary (PS3.6, from DICOM2OMOP) plus the unknown and private "
    "tags met while ingesting, once each.",
    "is_private": "Private tag added by the ingest (keyed by tag, whatever the creator).",
}
INDEXES = ("idx_dicom_data_element_tag", "idx_dicom_data_element_private")


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    if dicom_data_element.name in owned_tables(bind, schemas):
        add_missing_columns(bind, schemas, dicom_data_element)  # before the indexes use it
        for name in INDEXES:
            ensure_index(bind, schemas, metadata_index(dicom_data_element.name, name))
        replace_earlier_comments(bind, schemas, dicom_data_element, EARLIER_COMMENTS)
    created = create_missing(bind, schemas, revision)
    run_attributes().setdefault("created", []).extend(created)


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
