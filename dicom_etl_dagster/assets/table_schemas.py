"""Column schemas (``dg.TableSchema``) of every table asset, so the UI documents the OMOP tables.

They are built once, at import, from the SQLAlchemy metadata the ETL creates its tables
from (``dicom_etl_dagster/core/db/schema.py``): the same columns, types and constraints, and
the same descriptions PostgreSQL gets as column comments. What the UI shows can therefore
not drift from what is created, nor from what ``\\d+`` says.
"""

from __future__ import annotations

import dagster as dg
import sqlalchemy as sa

from dicom_etl_dagster.core.db.schema import metadata


def type_name(type_: sa.types.TypeEngine) -> str:
    """The column type as the DDL always wrote it: ``integer``, ``varchar(250)``, ``timestamptz``."""
    if isinstance(type_, sa.BigInteger):
        return "bigint"
    if isinstance(type_, sa.Integer):
        return "integer"
    if isinstance(type_, sa.Text):
        return "text"
    if isinstance(type_, sa.String) and type_.length:
        return f"varchar({type_.length})"
    if isinstance(type_, sa.DateTime):
        return "timestamptz" if type_.timezone else "timestamp"
    if isinstance(type_, sa.Date):
        return "date"
    if isinstance(type_, sa.Boolean):
        return "boolean"
    if isinstance(type_, sa.Numeric):
        return "numeric"
    raise ValueError(f"no UI type name for {type_!r}")


def _unique_indexes(table: sa.Table) -> list[tuple[list[str], str]]:
    """(columns, ``WHERE ...`` or "") of the table's unique indexes on plain columns."""
    found = []
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        if not index.unique:
            continue
        where = index.dialect_options["postgresql"]["where"]
        columns = [str(getattr(e, "name", e)) for e in index.expressions]
        found.append((columns, "" if where is None else f"WHERE {where}"))
    return found


def _column(
    column: sa.Column, primary_key: list[str], unique_sets: list[tuple[list[str], str]]
) -> dg.TableColumn:
    name = column.name
    other = ["primary key"] if name in primary_key else []
    unique = primary_key == [name] or any(
        cols == [name] and not where for cols, where in unique_sets
    )
    other += [f"unique {where}" for cols, where in unique_sets if cols == [name] and where]
    return dg.TableColumn(
        name=name,
        type=type_name(column.type),
        description=column.comment,
        constraints=dg.TableColumnConstraints(
            nullable=bool(column.nullable), unique=unique, other=other or None
        ),
    )


def table_schema(table: sa.Table) -> dg.TableSchema:
    """The TableSchema of one metadata table."""
    primary_key = [c.name for c in table.primary_key.columns]
    unique_sets = _unique_indexes(table)
    constraints = []
    if len(primary_key) > 1:
        constraints.append(f"primary key ({', '.join(primary_key)})")
    constraints += [
        f"unique ({', '.join(cols)}){' ' + where if where else ''}"
        for cols, where in unique_sets
        if len(cols) > 1
    ]
    checks = [c for c in table.constraints if isinstance(c, sa.CheckConstraint)]
    constraints += [
        f"{c.name}: CHECK ({c.sqltext})" for c in sorted(checks, key=lambda c: str(c.name))
    ]
    return dg.TableSchema(
        columns=[_column(c, primary_key, unique_sets) for c in table.columns],
        constraints=dg.TableConstraints(other=constraints) if constraints else None,
    )


#: Every table the ETL creates, by table name (names are unique across the three schemas).
TABLE_SCHEMAS: dict[str, dg.TableSchema] = {
    table.name: table_schema(table) for table in metadata.tables.values()
}


def column_schema(table: str) -> dict[str, dg.TableSchema]:
    """Asset metadata documenting ``table``'s columns (shown in the UI's asset page)."""
    return {"dagster/column_schema": TABLE_SCHEMAS[table]}
