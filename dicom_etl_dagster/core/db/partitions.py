"""Partitions of the EAV table, created ahead of the writers.

A ``dicom_file_metadata`` the ETL created (revision 0007 on) is ``PARTITION BY RANGE
(metadata_id)``, one partition ``dicom_file_metadata_p<n>`` per ``PARTITION_SPAN`` ids
(n = id // span), no DEFAULT partition. A row whose id no partition covers would fail the
batch, so before each batch :func:`ensure_partitions` covers the sequence's current value
and one span beyond, in a short transaction of its own.

Why not ``CREATE TABLE ... PARTITION OF``: it takes ACCESS EXCLUSIVE on the parent, so it
waits for every batch that is COPYing (and they for it). Here the partition is created as a
table of its own (``LIKE`` the parent) and then attached, which takes SHARE UPDATE
EXCLUSIVE on the parent: no conflict with the writers' ROW EXCLUSIVE. Creators take turns
under a short advisory lock and look again under it.

Inside a batch the reserved range is checked against the bound the run knows (no query);
only when it is not covered (a span consumed between the check and the batch) the missing
partitions are created in the batch's transaction. A plain (non-partitioned) table, such as
an upgraded install's, is looked at once per run and left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.tables import Tables, take_advisory_lock

#: 100 million ids: ~520,000 files of ~193 elements, ~20 GB per partition. Large enough that a
#: 100-million-instance archive has ~200 partitions (a look-up that cannot be pruned, such as
#: the SOP check, probes each partition's index), small enough to vacuum or move one at a time.
#: The indexes a batch maintains stay hot whatever the size: ids ascend.
PARTITION_SPAN = 100_000_000
TABLE = "dicom_file_metadata"
SEQUENCE = "dicom_etl_metadata_id_seq"
_BOUND = re.compile(r"FROM \((\S+)\) TO \((\S+)\)")


@dataclass
class PartitionCover:
    """What a run knows of the table: partitioned or not (None: not looked yet), and the id
    below which partitions exist (from the sequence's value at the last check on)."""

    partitioned: bool | None = None
    covered_below: int = 0


def is_partitioned(conn: psycopg.Connection, table: sql.Identifier) -> bool:
    row = conn.execute(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)", [table.as_string(conn)]
    ).fetchone()
    return bool(row and row[0])


def ensure_partitions(
    conn: psycopg.Connection,
    tables: Tables,
    up_to_id: int | None = None,
    cover: PartitionCover | None = None,
    from_id: int | None = None,
) -> None:
    """Partitions for every id from ``from_id`` (default: the sequence's current value) to
    ``up_to_id`` (default: one span beyond it); nothing on a plain table.

    Outside a transaction this is one short transaction of its own; inside one (the batch's
    fallback) its locks last until that commits.
    """
    cover = cover or PartitionCover()
    if cover.partitioned is False:
        return
    if from_id is not None and up_to_id is not None and up_to_id < cover.covered_below:
        return  # the batch's fallback check: the run knows the range is covered
    with conn.transaction():
        if cover.partitioned is None:
            cover.partitioned = is_partitioned(conn, tables[TABLE])
            if not cover.partitioned:
                return
        current = _sequence_value(conn, tables)
        low = current if from_id is None else from_id
        high = current + PARTITION_SPAN if up_to_id is None else up_to_id
        if high < cover.covered_below:
            return
        take_advisory_lock(conn, f"dicom_etl_dagster.partitions:{tables.qualified(TABLE)}")
        _create_missing(conn, tables, low, high)
        cover.covered_below = max(cover.covered_below, high + 1)


def _sequence_value(conn: psycopg.Connection, tables: Tables) -> int:
    """The next id the sequence gives out (about: other writers may be ahead)."""
    row = conn.execute(
        sql.SQL("SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END FROM {}").format(
            tables.sequence(SEQUENCE)
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


def partition_bounds(conn: psycopg.Connection, tables: Tables) -> list[tuple[float, float]]:
    """[from, to) of every partition of the table (MINVALUE/MAXVALUE as infinities)."""
    rows = conn.execute(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        [tables[TABLE].as_string(conn)],
    ).fetchall()
    bounds = []
    for (expression,) in rows:
        match = _BOUND.search(expression or "")
        if match:  # a DEFAULT partition has no range (and the ETL creates none)
            bounds.append((_bound_value(match[1]), _bound_value(match[2])))
    return bounds


def _bound_value(text: str) -> float:
    text = text.strip("'")
    if text == "MINVALUE":
        return float("-inf")
    if text == "MAXVALUE":
        return float("inf")
    return int(text)


def _missing(span: tuple[int, int], bounds: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """The parts of ``span`` [from, to) no partition covers (a converted old table attached
    as one partition may cover part of a span)."""
    gaps = [span]
    for low, high in bounds:
        gaps = [
            piece
            for start, end in gaps
            for piece in (
                (start, int(min(end, max(low, start)))),
                (int(max(start, min(high, end))), end),
            )
            if piece[0] < piece[1]
        ]
    return gaps


def create_ahead(conn: psycopg.Connection, tables: Tables) -> None:
    """Partitions for the sequence's current value and one span beyond, in the caller's
    transaction (the migration that creates the table, so a fresh install is usable at once)."""
    current = _sequence_value(conn, tables)
    _create_missing(conn, tables, current, current + PARTITION_SPAN)


def _create_missing(conn: psycopg.Connection, tables: Tables, low: int, high: int) -> None:
    bounds = partition_bounds(conn, tables)
    for n in range(max(low, 0) // PARTITION_SPAN, high // PARTITION_SPAN + 1):
        span = (n * PARTITION_SPAN, (n + 1) * PARTITION_SPAN)
        for start, end in _missing(span, bounds):
            # A gap in a span partly covered (by a converted old table) is named by its start:
            # the span's own name may be taken.
            whole = (start, end) == span
            _attach(conn, tables, f"{TABLE}_p{n}" + ("" if whole else f"_{start}"), start, end)


def _attach(conn: psycopg.Connection, tables: Tables, name: str, start: int, end: int) -> None:
    """A new empty table LIKE the parent, attached for [start, end): its indexes are built
    (empty) and attached by PostgreSQL, the parent is only SHARE UPDATE EXCLUSIVE locked."""
    partition = sql.Identifier(tables.schema_of(TABLE), name)
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            partition, tables[TABLE]
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            tables[TABLE], partition, sql.Literal(start), sql.Literal(end)
        )
    )
