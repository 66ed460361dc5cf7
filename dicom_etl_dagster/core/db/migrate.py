"""Put the ETL's tables in place before a run writes: create what is missing, upgrade what an
earlier release of the ETL created, never alter a user's table.

Every asset calls :func:`ensure_tables` first, so the common case costs two psycopg queries
and no SQLAlchemy connection: every table and sequence exists and the version table says
head. Otherwise the Alembic migrations (``core/db/migrations``) run on a SQLAlchemy
connection to the same database, in one transaction under an advisory lock (two runs
starting together take turns; the second finds head and does nothing), with the run's schema
names mapped onto the metadata's placeholder schemas. Alembic is configured in code, so no
alembic.ini is needed.

SQLAlchemy and Alembic are imported when the check or a migration runs, not with this module:
parse workers re-import their parent's main module, and a script that imports
``ensure_tables`` (scripts/benchmark.py) would otherwise give each of them ~35 MiB of
modules and a slower start (measured: 2% of the benchmark's parse CPU).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import SEQUENCES, VERSION_TABLE, table_exists

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

#: The newest revision in core/db/migrations/versions (a test checks that they agree).
HEAD = "0008"
SCRIPT_LOCATION = "dicom_etl_dagster.core.db:migrations"
#: The key of the advisory lock schema changes take (the same as the releases before versioning).
LOCK_KEY = "dicom_etl_dagster.ddl"
_ALEMBIC_LOCK = threading.Lock()


def ensure_tables(conn: psycopg.Connection, schemas: Schemas) -> list[str]:
    """Create missing schemas, tables and sequences and upgrade ETL-owned tables to head.

    Returns the ``schema.table`` names created. ``conn`` should not be inside a transaction
    that has touched the ETL's tables: the migration runs on a connection of its own.
    """
    if _is_current(conn, schemas):
        return []
    return _migrate(conn, schemas)


def schema_version(conn: psycopg.Connection, schemas: Schemas) -> str | None:
    """The schema version recorded in the medical-imaging schema (None: never versioned)."""
    if not table_exists(conn, schemas.medical_imaging, VERSION_TABLE):
        return None
    row = conn.execute(
        sql.SQL("SELECT version_num FROM {}").format(
            sql.Identifier(schemas.medical_imaging, VERSION_TABLE)
        )
    ).fetchone()
    return None if row is None else str(row[0])


def alembic_config(connection: sa.Connection | None, schemas: Schemas) -> Config:
    """Alembic's Config for the ETL's migrations, without an ini file."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    # New revision files start with a letter: mypy and importers refuse module names like 0003_x.
    config.set_main_option("file_template", "r%%(rev)s_%%(slug)s")
    config.attributes.update(connection=connection, schemas=schemas, created=[])
    return config


def _relations(conn: psycopg.Connection, schemas: Schemas) -> list[str]:
    """Quoted names of every relation a current schema has."""
    from dicom_etl_dagster.core.db.schema import metadata, owned_table, real_schema

    mi = schemas.medical_imaging
    names = [sql.Identifier(real_schema(t, schemas), t.name) for t in metadata.tables.values()]
    names += [sql.Identifier(mi, sequence) for sequence, _, _ in SEQUENCES]
    names += [sql.Identifier(mi, VERSION_TABLE), sql.Identifier(mi, owned_table.name)]
    return [name.as_string(conn) for name in names]


def _is_current(conn: psycopg.Connection, schemas: Schemas) -> bool:
    """Everything exists and the version is head: one query, and one for the version."""
    with conn.transaction() if not conn.autocommit else contextlib.nullcontext():
        row = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS r(name) WHERE to_regclass(r.name) IS NULL",
            [_relations(conn, schemas)],
        ).fetchone()
        if row is None or row[0]:
            return False
        versions = conn.execute(
            sql.SQL("SELECT version_num FROM {}").format(
                sql.Identifier(schemas.medical_imaging, VERSION_TABLE)
            )
        ).fetchall()
    return [v for (v,) in versions] == [HEAD]


def engine_like(conn: psycopg.Connection) -> sa.Engine:
    """A SQLAlchemy engine whose connections go where ``conn`` goes (socket or host, same
    user, password and options); NullPool, so each use opens and closes its own connection."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    parameters = conn.info.get_parameters()
    if conn.info.password:
        parameters["password"] = conn.info.password
    conninfo = make_conninfo("", **parameters)
    return sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=NullPool
    )


def _migrate(conn: psycopg.Connection, schemas: Schemas) -> list[str]:
    # Alembic's ``op`` and ``context`` are module-wide proxies: one migration per process at a
    # time. Taken before the database's advisory lock, so the two are always taken in one order.
    with _ALEMBIC_LOCK:
        return _migrate_locked(conn, schemas)


def _migrate_locked(conn: psycopg.Connection, schemas: Schemas) -> list[str]:
    import sqlalchemy as sa
    from alembic import command
    from sqlalchemy.schema import CreateSchema

    from dicom_etl_dagster.core.db.migrations.support import create_missing
    from dicom_etl_dagster.core.db.schema import schema_translate_map

    engine = engine_like(conn)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": LOCK_KEY}
            )
            for schema in dict.fromkeys((schemas.vocab, schemas.cdm, schemas.medical_imaging)):
                connection.execute(CreateSchema(schema, if_not_exists=True))
            connection.execution_options(schema_translate_map=schema_translate_map(schemas))
            config = alembic_config(connection, schemas)
            command.upgrade(config, "head")
            # At head already, a table someone dropped (or a new CDM schema) is created here.
            created: list[str] = config.attributes["created"]
            created += create_missing(connection, schemas, HEAD)
    finally:
        engine.dispose()
    return created
