"""The numbers behind the ingest's asset checks and materialization facts.

The Dagster layer only compares these numbers with its thresholds. The SOP checks look at
one run's instances (through the ledger and the ``sop_instance_id`` index): a full scan of
a billion-row EAV table after every run would not scale. The other queries touch one row
per study or series, never the EAV table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from dicom_etl_dagster.core.analytics.rows import MEASUREMENT_ID_FIELD_CONCEPT_ID
from dicom_etl_dagster.core.db.tables import Tables, row_count


@dataclass(frozen=True)
class IngestCheckFigures:
    series_without_procedure: int
    sop_instances_twice_in_ledger: int
    sop_instances_twice_in_metadata: int
    series: int
    series_with_modality_concept_0: int

    @property
    def share_without_modality_concept(self) -> float:
        return self.series_with_modality_concept_0 / self.series if self.series else 0.0


@dataclass(frozen=True)
class TableSize:
    """Rows in a table: counted when small, else PostgreSQL's estimate (``exact`` False)."""

    rows: int
    exact: bool


@dataclass(frozen=True)
class TableFacts:
    procedure_occurrences: TableSize
    image_occurrences: TableSize
    image_features: TableSize  # measurement is not counted: in a CDM it is the largest table
    dicom_vocabulary_version: str | None  # None: the DICOM vocabulary is not loaded


#: Below this estimate a table is counted exactly (tens of ms); above, a count(*) after
#: every run would cost as much as the run, so the planner's estimate is shown, labelled.
EXACT_COUNT_BELOW = 1_000_000
# reltuples is -1 until the table is first analyzed; a partitioned table's rows are its
# partitions' (pg_partition_tree lists a plain table alone).
_ESTIMATE = """
SELECT sum(c.reltuples) FILTER (WHERE c.reltuples >= 0 AND c.relkind = 'r')
FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid
"""


_SERIES_WITHOUT_PROCEDURE = """
SELECT count(*) FROM {io} i WHERE i.image_occurrence_id BETWEEN %(first)s AND %(last)s
  AND NOT EXISTS
  (SELECT 1 FROM {po} p WHERE p.procedure_occurrence_id = i.procedure_occurrence_id)
"""
_THIS_RUN = "SELECT sop_instance_uid FROM {log} WHERE run_id = %(run)s AND status = 'ingested'"
_TWICE_IN_LEDGER = (
    "SELECT count(*) FROM (SELECT sop_instance_uid FROM {log} WHERE status = 'ingested'"
    " AND sop_instance_uid IN (" + _THIS_RUN + ") GROUP BY 1 HAVING count(*) > 1) d"
)
_TWICE_IN_METADATA = (
    "SELECT count(*) FROM (SELECT sop_instance_id FROM {md} WHERE sop_instance_id IN ("
    + _THIS_RUN
    + ") AND metadata_source_tag = '(0008,0018)' AND parent_sequence_id IS NULL"
    " GROUP BY 1 HAVING count(*) > 1) d"
)
_MODALITY_CONCEPTS = """
SELECT count(*) AS series, count(*) FILTER (WHERE modality_concept_id = 0) AS unmapped FROM {io}
WHERE image_occurrence_id BETWEEN %(first)s AND %(last)s
"""


def coalesced(id_ranges: Iterable[range]) -> list[range]:
    """Adjacent id ranges joined: a run's batches reserve consecutive ids under the ingest
    lock, so its series are usually one range and a check one query, however many batches."""
    merged: list[range] = []
    for ids in sorted((r for r in id_ranges if len(r)), key=lambda r: r.start):
        if merged and merged[-1].stop >= ids.start:
            merged[-1] = range(merged[-1].start, max(merged[-1].stop, ids.stop))
        else:
            merged.append(ids)
    return merged


@dataclass(frozen=True)
class _ModalityCounts:
    series: int
    unmapped: int


def _count(conn: psycopg.Connection, query: str, tables: Tables, **params: object) -> int:
    statement = sql.SQL(query).format(
        io=tables["image_occurrence"],
        po=tables["procedure_occurrence"],
        log=tables["dicom_ingest_log"],
        md=tables["dicom_file_metadata"],
    )
    row = conn.execute(statement, params).fetchone()
    return 0 if row is None else int(row[0])


def _modality_counts(
    conn: psycopg.Connection, tables: Tables, series_ids: list[range]
) -> _ModalityCounts:
    cursor = conn.cursor(row_factory=class_row(_ModalityCounts))
    query = sql.SQL(_MODALITY_CONCEPTS).format(io=tables["image_occurrence"])
    series = unmapped = 0
    for ids in series_ids:
        counts = cursor.execute(query, {"first": ids.start, "last": ids.stop - 1}).fetchone()
        assert counts is not None
        series, unmapped = series + counts.series, unmapped + counts.unmapped
    return _ModalityCounts(series, unmapped)


def ingest_check_figures(
    conn: psycopg.Connection, tables: Tables, run_id: str, series_ids: Iterable[range]
) -> IngestCheckFigures:
    """What the ingest's asset checks look at, for the run ``run_id``.

    The series checks read the image_occurrence rows the run wrote (``series_ids``, through
    the primary key), not the whole table: their cost is the run's, not the table's."""
    ranges = coalesced(series_ids)
    modality = _modality_counts(conn, tables, ranges)
    return IngestCheckFigures(
        series_without_procedure=sum(
            _count(conn, _SERIES_WITHOUT_PROCEDURE, tables, first=r.start, last=r.stop - 1)
            for r in ranges
        ),
        sop_instances_twice_in_ledger=_count(conn, _TWICE_IN_LEDGER, tables, run=run_id),
        sop_instances_twice_in_metadata=_count(conn, _TWICE_IN_METADATA, tables, run=run_id),
        series=modality.series,
        series_with_modality_concept_0=modality.unmapped,
    )


_FEATURES_WITHOUT_MEASUREMENT = """
SELECT count(*) FROM {feature} f
WHERE f.image_feature_id BETWEEN %s AND %s AND f.image_feature_event_field_concept_id = {field}
  AND NOT EXISTS (SELECT 1 FROM {measurement} m WHERE m.measurement_id = f.image_feature_event_id)
"""


def features_without_measurement(
    conn: psycopg.Connection, tables: Tables, feature_ids: Iterable[range]
) -> int:
    """image_feature rows written by the run (``feature_ids``) whose measurement is missing.

    Only the run's own id ranges are looked at (through the primary keys), so the check
    costs what the run wrote, not the size of the tables."""
    query = sql.SQL(_FEATURES_WITHOUT_MEASUREMENT).format(
        feature=tables["image_feature"],
        measurement=tables["measurement"],
        field=sql.Literal(MEASUREMENT_ID_FIELD_CONCEPT_ID),
    )
    missing = 0
    for ids in coalesced(feature_ids):
        if len(ids):
            row = conn.execute(query, [ids.start, ids.stop - 1]).fetchone()
            missing += int(row[0]) if row else 0
    return missing


def table_size(conn: psycopg.Connection, table: sql.Identifier) -> TableSize:
    row = conn.execute(_ESTIMATE, [table.as_string(conn)]).fetchone()
    estimate = None if row is None or row[0] is None else int(row[0])
    if estimate is None or estimate < EXACT_COUNT_BELOW:
        return TableSize(row_count(conn, table), exact=True)
    return TableSize(estimate, exact=False)


def table_facts(conn: psycopg.Connection, tables: Tables) -> TableFacts:
    """Sizes of the study and series tables (see TableSize) and the DICOM vocabulary version."""
    version = conn.execute(
        sql.SQL("SELECT vocabulary_version FROM {} WHERE vocabulary_id = 'DICOM'").format(
            tables["vocabulary"]
        )
    ).fetchone()
    return TableFacts(
        procedure_occurrences=table_size(conn, tables["procedure_occurrence"]),
        image_occurrences=table_size(conn, tables["image_occurrence"]),
        image_features=table_size(conn, tables["image_feature"]),
        dicom_vocabulary_version=version[0] if version else None,
    )
