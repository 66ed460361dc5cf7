"""Alembic environment: online only, on the connection ``core/db/migrate.py`` hands over.

There is no alembic.ini: migrate.py builds the Config in code and passes the open SQLAlchemy
connection (already in a transaction, holding the advisory lock, with the schema translate
map of the run) and the run's ``Schemas`` through ``config.attributes``. The version table
lives in the medical-imaging schema, next to the tables it describes.
"""

from __future__ import annotations

from alembic import context

from dicom_etl_dagster.core.db.schema import metadata
from dicom_etl_dagster.core.db.tables import VERSION_TABLE

if context.is_offline_mode():
    raise RuntimeError("the DICOM ETL migrates online only (core/db/migrate.ensure_tables)")

_attributes = context.config.attributes
context.configure(
    connection=_attributes["connection"],
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    version_table_schema=_attributes["schemas"].medical_imaging,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
