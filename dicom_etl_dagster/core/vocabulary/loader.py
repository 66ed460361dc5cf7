"""Load the DICOM2OMOP vocabulary into OMOP vocabulary tables and dicom_data_element.

Each table is synchronised in one transaction: the file's rows are COPYed into a temporary
staging table and only the rows whose key is not yet present are inserted, so re-running
never duplicates. With ``truncate`` the DICOM rows (and only those) are deleted first, in
the same transaction, so a user's Athena rows are untouched and readers never see a
half-loaded vocabulary. The table is locked for writing while it is synchronised so that two
loads running at once cannot both insert the same missing row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.vocabulary import files

VALID_START = dt.date(1993, 1, 1)
VALID_END = dt.date(2099, 12, 31)
VOCABULARY_CONCEPT_ID = 2128000000
DICOM_VOCABULARY_NAME = (
    "Digital Imaging and Communications in Medicine (National Electrical Manufacturers Association)"
)
# The original plugin gave both classes 2128000002; each class gets its own concept here.
CONCEPT_CLASSES = (("DICOM Attributes", 2128000001), ("DICOM Value Sets", 2128000002))


@dataclass(frozen=True)
class LoadResult:
    table: str
    rows_in_source: int
    rows_written: int
    rows_already_present: int
    rows_removed: int = 0
    rows_refreshed: int = 0

    def as_metadata(self) -> dict[str, int | str]:
        return {
            "rows_in_source": self.rows_in_source,
            "rows_written": self.rows_written,
            "rows_already_present": self.rows_already_present,
            "rows_removed_by_truncate": self.rows_removed,
            "rows_refreshed": self.rows_refreshed,
            "source_version": files.SOURCE_VERSION,
        }


# --- rows, as read from the pinned files ------------------------------------------------


def vocabulary_rows(folder: Path | None = None) -> list[tuple]:
    return [
        (
            "DICOM",
            DICOM_VOCABULARY_NAME,
            "https://www.dicomstandard.org/current",
            f"{files.SOURCE_VERSION} (NEMA PS3)",
            VOCABULARY_CONCEPT_ID,
        )
    ]


def concept_class_rows(folder: Path | None = None) -> list[tuple]:
    return [(name, name, concept_id) for name, concept_id in CONCEPT_CLASSES]


def concept_rows(folder: Path | None = None) -> list[tuple]:
    """The 8,811 DICOM2OMOP concepts plus the vocabulary and concept-class concepts."""
    metadata_concepts = [
        (
            VOCABULARY_CONCEPT_ID,
            DICOM_VOCABULARY_NAME,
            "Metadata",
            "Vocabulary",
            "Vocabulary",
            None,
            "OMOP generated",
            VALID_START,
            VALID_END,
            None,
        ),
        *[
            (
                concept_id,
                name,
                "Metadata",
                "Concept Class",
                "Concept Class",
                None,
                "OMOP generated",
                VALID_START,
                VALID_END,
                None,
            )
            for name, concept_id in CONCEPT_CLASSES
        ],
    ]
    # Upstream dates and empty flags are not trusted: the contract fixes them (the original
    # plugin swapped the dates and wrote ' ' into the flag columns).
    return metadata_concepts + [
        (
            int(r["concept_id"]),
            r["concept_name"][:255],
            r["domain_id"],
            r["vocabulary_id"],
            r["concept_class_id"],
            None,
            r["concept_code"],
            VALID_START,
            VALID_END,
            None,
        )
        for r in files.read_rows(files.CONCEPTS, folder)
    ]


def concept_relationship_rows(folder: Path | None = None) -> list[tuple]:
    return [
        (
            int(r["concept_id_1"]),
            int(r["concept_id_2"]),
            r["relationship_id"],
            VALID_START,
            VALID_END,
            None,
        )
        for spec in (files.MAPS_TO, files.MAPS_TO_VALUE)
        for r in files.read_rows(spec, folder)
    ]


def data_element_rows(folder: Path | None = None) -> list[tuple]:
    """PS3.6 dictionary rows; keywords and names without zero-width spaces."""
    return [
        (
            r["Tag"],
            r["Name"] or None,
            r["Keyword"] or None,
            r["VR"] or None,
            r["VM"] or None,
            False,
            r["Remarks"].startswith("RET"),
            r["Remarks"] or None,
        )
        for r in files.read_rows(files.DATA_ELEMENTS, folder)
    ]


# --- table specs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rows: Callable[[Path | None], list[tuple]]
    #: WHERE clause selecting the DICOM rows that ``truncate`` deletes; may use the staging table ``stage``.
    dicom_rows: str


VOCABULARY = TableSpec(
    "vocabulary",
    (
        "vocabulary_id",
        "vocabulary_name",
        "vocabulary_reference",
        "vocabulary_version",
        "vocabulary_concept_id",
    ),
    ("vocabulary_id",),
    vocabulary_rows,
    "vocabulary_id = 'DICOM'",
)
CONCEPT_CLASS = TableSpec(
    "concept_class",
    ("concept_class_id", "concept_class_name", "concept_class_concept_id"),
    ("concept_class_id",),
    concept_class_rows,
    "concept_class_id IN ('DICOM Attributes', 'DICOM Value Sets')",
)
CONCEPT = TableSpec(
    "concept",
    (
        "concept_id",
        "concept_name",
        "domain_id",
        "vocabulary_id",
        "concept_class_id",
        "standard_concept",
        "concept_code",
        "valid_start_date",
        "valid_end_date",
        "invalid_reason",
    ),
    ("concept_id",),
    concept_rows,
    "vocabulary_id = 'DICOM' OR concept_id IN (2128000000, 2128000001, 2128000002)",
)
CONCEPT_RELATIONSHIP = TableSpec(
    "concept_relationship",
    (
        "concept_id_1",
        "concept_id_2",
        "relationship_id",
        "valid_start_date",
        "valid_end_date",
        "invalid_reason",
    ),
    ("concept_id_1", "concept_id_2", "relationship_id"),
    concept_relationship_rows,
    # The DICOM vocabulary owns the 'Maps to' / 'Maps to value' rows leaving its concepts.
    "concept_id_1 IN (SELECT concept_id_1 FROM stage)"
    " AND relationship_id IN (SELECT DISTINCT relationship_id FROM stage)",
)
VOCABULARY_TABLES = (VOCABULARY, CONCEPT_CLASS, CONCEPT, CONCEPT_RELATIONSHIP)

_DATA_ELEMENT_COLUMNS = (
    "data_element_tag",
    "data_element_name",
    "data_element_keyword",
    "value_representation",
    "value_multiplicity",
    "is_private",
    "is_retired",
    "retired_remarks",
)


def _stage(
    conn: psycopg.Connection, target: sql.Identifier, columns: tuple[str, ...], rows: list[tuple]
) -> None:
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE stage ON COMMIT DROP AS SELECT {cols} FROM {target} WITH NO DATA"
        ).format(cols=cols, target=target)
    )
    with conn.cursor().copy(sql.SQL("COPY stage ({cols}) FROM STDIN").format(cols=cols)) as copy:
        for row in rows:
            copy.write_row(row)


def _key_match(key: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("t.{k} = s.{k}").format(k=sql.Identifier(k)) for k in key)


def load_table(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TableSpec,
    truncate: bool,
    folder: Path | None = None,
) -> LoadResult:
    """Synchronise one OMOP vocabulary table with the DICOM2OMOP rows."""
    rows = spec.rows(folder)  # read (and verify) before any transaction is opened
    target = sql.Identifier(schemas.vocab, spec.table)
    cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
    removed = 0
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
        _stage(conn, target, spec.columns, rows)
        if truncate:
            removed = conn.execute(
                sql.SQL("DELETE FROM {} WHERE " + spec.dicom_rows).format(target)
            ).rowcount
        written = conn.execute(
            sql.SQL(
                "INSERT INTO {target} ({cols}) SELECT DISTINCT {cols} FROM stage s"
                " WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE {match})"
            ).format(target=target, cols=cols, match=_key_match(spec.key))
        ).rowcount
    return LoadResult(spec.table, len(rows), written, len(rows) - written, removed)


def load_data_elements(
    conn: psycopg.Connection, schemas: Schemas, truncate: bool, folder: Path | None = None
) -> LoadResult:
    """Synchronise dicom_data_element with the PS3.6 dictionary.

    Ingested metadata rows point at data_element_id, so rows are never deleted here:
    ``truncate`` refreshes every dictionary row in place (same id, file's values) instead,
    and tags added by ingest (private or unknown) are kept.
    """
    rows = data_element_rows(folder)
    target = sql.Identifier(schemas.medical_imaging, "dicom_data_element")
    cols = sql.SQL(", ").join(map(sql.Identifier, _DATA_ELEMENT_COLUMNS))
    refreshed = 0
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
        _stage(conn, target, _DATA_ELEMENT_COLUMNS, rows)
        if truncate:
            settable = [c for c in _DATA_ELEMENT_COLUMNS if c != "data_element_tag"]
            refreshed = conn.execute(
                sql.SQL(
                    "UPDATE {target} t SET {assign}, etl_modified_datetime = now()"
                    " FROM stage s WHERE t.data_element_tag = s.data_element_tag"
                    " AND ({old}) IS DISTINCT FROM ({new})"
                ).format(
                    target=target,
                    assign=sql.SQL(", ").join(
                        sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in settable
                    ),
                    old=sql.SQL(", ").join(
                        sql.SQL("t.{}").format(sql.Identifier(c)) for c in settable
                    ),
                    new=sql.SQL(", ").join(
                        sql.SQL("s.{}").format(sql.Identifier(c)) for c in settable
                    ),
                )
            ).rowcount
        # ctid order is the COPY order, so fresh ids follow the dictionary's order.
        written = conn.execute(
            sql.SQL(
                "INSERT INTO {target} (data_element_id, {cols}, etl_created_datetime, etl_modified_datetime)"
                " SELECT nextval({seq}), {cols}, now(), now() FROM (SELECT * FROM stage ORDER BY ctid) s"
                " WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.data_element_tag = s.data_element_tag)"
            ).format(
                target=target,
                cols=cols,
                seq=sql.Literal(
                    Tables(schemas).sequence("dicom_etl_data_element_id_seq").as_string(conn)
                ),
            )
        ).rowcount
    return LoadResult(
        "dicom_data_element", len(rows), written, len(rows) - written, rows_refreshed=refreshed
    )
