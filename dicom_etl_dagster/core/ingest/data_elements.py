"""The dicom_data_element entries of a run: the ones the dictionary has, and the ones the
ingest adds (unknown public tags, and private elements once per private creator).

Why a module of its own: both the run's set-up (which entries exist) and every batch (add the
missing ones, learn their ids) must agree on how an entry is keyed, and that depends on the
table: an ETL-owned dicom_data_element has ``private_creator`` (revision 0004), and private
entries are per creator (``private_entries``); a table a user created and the ETL never
alters may lack it, and then private entries stay keyed by tag alone, as before.

A batch first learns, without a lock, the ids of the entries the table has and the run does
not know yet (``learn_existing_entries``). An entry still missing is added only when no
entry with its key exists, so overlapping runs add every entry once. Who arbitrates depends
on the table. An owned table's unique indexes on the key do (``entries_arbitrated``): the
entries go in with ``ON CONFLICT DO NOTHING``, in key order so that two batches adding some
of the same entries cannot deadlock, and a batch adding an entry another batch added but
has not committed yet waits for that batch only. Such a batch first takes the schema's
ingest lock in shared mode (the writer), so a batch holding it exclusively, which adds
entries too, never waits for entries of a batch that waits for it. A table without them (a user's) has the
batch take the schema's ingest lock in exclusive mode and write the whole batch under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.tables import Tables, column_names
from dicom_etl_dagster.core.ingest.metadata_copy import (
    DataElementIds,
    RenderedMetadata,
    TagCandidate,
)
from dicom_etl_dagster.core.ingest.private_entries import (
    describe_private_entry,
    private_entry_tag,
)

PRIVATE_CREATOR_COLUMN = "private_creator"
# The unique indexes of an owned table on an entry's key (core/db/schema.py).
ENTRY_KEY_INDEXES = ("idx_dicom_data_element_tag", "idx_dicom_data_element_private")


class Entry(NamedTuple):
    """A dicom_data_element row to add; (tag, creator) is its key."""

    tag: str
    creator: str | None
    name: str | None
    keyword: str | None
    vr: str | None
    vm: str | None
    is_private: bool


def has_private_creators(conn: psycopg.Connection, tables: Tables) -> bool:
    """Whether dicom_data_element keeps private entries per creator (has the column)."""
    present = column_names(conn, tables.schemas.medical_imaging, "dicom_data_element")
    return PRIVATE_CREATOR_COLUMN in present


def entries_arbitrated(conn: psycopg.Connection, tables: Tables, per_creator: bool) -> bool:
    """Whether the table's unique indexes decide that an entry is added once: the two the ETL
    creates on an owned table (per creator; a table without the column is a user's)."""
    if not per_creator:
        return False
    unique_indexes = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = format('%%I.%%I', %s::text, 'dicom_data_element')::regclass"
        " AND i.indisunique AND c.relname = ANY(%s)",
        [tables.schema_of("dicom_data_element"), list(ENTRY_KEY_INDEXES)],
    ).fetchall()
    return len(unique_indexes) == len(ENTRY_KEY_INDEXES)


def known_entries(conn: psycopg.Connection, tables: Tables, per_creator: bool) -> DataElementIds:
    """The entries a row finds by its tag alone: public tags, private elements without a
    creator, and (per creator or not) the private entries written before revision 0004.
    Per-creator entries are learnt by the batches that meet them."""
    query = sql.SQL("SELECT data_element_tag, data_element_id FROM {}").format(
        tables["dicom_data_element"]
    )
    if per_creator:
        query += sql.SQL(" WHERE private_creator IS NULL")
    return DataElementIds(conn.execute(query).fetchall())


def entry_of(candidate: TagCandidate, per_creator: bool) -> Entry:
    """The entry a candidate belongs to; a per-creator one is named from its creator's
    dictionary only (else unnamed), whatever name the reader gave the element."""
    _key, tag, name, keyword, vr, is_private, creator = candidate
    if not (per_creator and is_private and creator):
        return Entry(tag, None, name, keyword, vr, None, is_private)
    entry_tag = private_entry_tag(tag)
    described = describe_private_entry(entry_tag, creator)
    return Entry(entry_tag, creator, described.name, None, described.vr or vr, described.vm, True)


def learn_existing_entries(
    conn: psycopg.Connection,
    tables: Tables,
    ids: DataElementIds,
    per_creator: bool,
    rendered: Iterable[RenderedMetadata],
) -> None:
    """Learn the ids of the entries the batch's rows need that the table has and the run does
    not know yet (another run added them, or they are per creator). Without any lock: an
    entry, once there, is never changed or deleted."""
    missing = _missing_entries(ids, per_creator, rendered)
    if missing:
        found = _entry_ids(conn, tables, _distinct(missing), per_creator)
        ids.update(
            (key, found[(e.tag, e.creator)])
            for key, e in missing.items()
            if (e.tag, e.creator) in found
        )


def ensure_data_elements(
    conn: psycopg.Connection,
    tables: Tables,
    ids: DataElementIds,
    per_creator: bool,
    rendered: Iterable[RenderedMetadata],
) -> None:
    """Add the entries the batch's rows need and the table lacks, once; learn their ids."""
    missing = _missing_entries(ids, per_creator, rendered)
    if missing:
        _insert_missing(conn, tables, _distinct(missing), per_creator)
        learn_existing_entries(conn, tables, ids, per_creator, rendered)


def _missing_entries(
    ids: DataElementIds, per_creator: bool, rendered: Iterable[RenderedMetadata]
) -> dict[str, Entry]:
    """Entry key -> entry, of the rows' keys the run does not know."""
    missing: dict[str, Entry] = {}
    for candidate in _unknown_candidates(ids, rendered):  # first seen first
        key = candidate[0]
        if key not in missing:
            missing[key] = entry_of(candidate, per_creator)
    return missing


def _distinct(missing: dict[str, Entry]) -> list[Entry]:
    """The entries in key order (the order every batch inserts them in). Several keys can
    share an entry: (0019,1060) and (0019,1160) of one creator."""
    unique: dict[tuple[str, str], Entry] = {}
    for entry in missing.values():
        unique.setdefault((entry.tag, entry.creator or ""), entry)
    return [unique[key] for key in sorted(unique)]


def needs_entries(ids: DataElementIds, rendered: Iterable[RenderedMetadata]) -> bool:
    """Whether ``ensure_data_elements`` would have to add (or look up) an entry for these rows:
    some key of theirs is not among the ids the run knows."""
    return next(_unknown_candidates(ids, rendered), None) is not None


def _unknown_candidates(
    ids: DataElementIds, rendered: Iterable[RenderedMetadata]
) -> Iterator[TagCandidate]:
    """The rows' candidates whose key the run does not know yet, first seen first."""
    # Files with the same tags usually share one candidates object (see metadata_copy): look at it once.
    distinct = {id(r.new_tag_candidates): r.new_tag_candidates for r in rendered}.values()
    for candidates in distinct:
        for candidate in candidates:
            if candidate[0] not in ids:
                yield candidate


def _insert_missing(
    conn: psycopg.Connection, tables: Tables, entries: list[Entry], per_creator: bool
) -> None:
    table = tables["dicom_data_element"]
    creator_column = sql.SQL(", private_creator") if per_creator else sql.SQL("")
    conn.execute(
        sql.SQL(
            "INSERT INTO {table} (data_element_id, data_element_tag, data_element_name,"
            " data_element_keyword, value_representation, value_multiplicity, is_private,"
            " is_retired, etl_created_datetime, etl_modified_datetime{creator_column})"
            " SELECT nextval({seq}::regclass), n.tag, n.name, n.keyword, n.vr, n.vm, n.private,"
            " false, now(), now(){creator_value}"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::bool[]) WITH ORDINALITY AS n(tag, creator, name, keyword, vr, vm, private, i)"
            " WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {same_entry})"
            " ORDER BY n.i ON CONFLICT DO NOTHING"
        ).format(
            table=table,
            creator_column=creator_column,
            creator_value=sql.SQL(", n.creator") if per_creator else sql.SQL(""),
            seq=sql.Literal(tables.sequence_text("dicom_etl_data_element_id_seq", conn)),
            same_entry=_same_entry(per_creator),
        ),
        [list(column) for column in zip(*entries)],
    )


def _entry_ids(
    conn: psycopg.Connection, tables: Tables, entries: list[Entry], per_creator: bool
) -> dict[tuple[str, str | None], int]:
    """(tag, creator) -> data_element_id of the entries."""
    creator = sql.SQL("t.private_creator") if per_creator else sql.SQL("NULL::text")
    rows = conn.execute(
        sql.SQL(
            "SELECT t.data_element_tag, {creator}, t.data_element_id FROM {table} t"
            " JOIN unnest(%s::text[], %s::text[]) AS n(tag, creator) ON {same_entry}"
        ).format(
            creator=creator, table=tables["dicom_data_element"], same_entry=_same_entry(per_creator)
        ),
        [[e.tag for e in entries], [e.creator for e in entries]],
    ).fetchall()
    return {(tag, owner): data_element_id for tag, owner, data_element_id in rows}


def _same_entry(per_creator: bool) -> sql.Composable:
    """``t`` is the entry of ``n``: the same tag, and (per creator) the same creator or both none."""
    if per_creator:
        return sql.SQL(
            "t.data_element_tag = n.tag AND t.private_creator IS NOT DISTINCT FROM n.creator"
        )
    return sql.SQL("t.data_element_tag = n.tag")
