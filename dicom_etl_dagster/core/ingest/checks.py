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
class TableFacts:
    procedure_occurrences: int
    image_occurrences: int
    image_features: int  # measurement is not counted: in a CDM it is the largest table
    dicom_vocabulary_version: str | None  # None: the DICOM vocabulary is not loaded


_SERIES_WITHOUT_PROCEDURE = """
SELECT count(*) FROM {io} i WHERE NOT EXISTS
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
"""


@dataclass(frozen=True)
class _ModalityCounts:
    series: int
    unmapped: int


def _count(conn: psycopg.Connection, query: str, tables: Tables, **params: str) -> int:
    statement = sql.SQL(query).format(
        io=tables["image_occurrence"],
        po=tables["procedure_occurrence"],
        log=tables["dicom_ingest_log"],
        md=tables["dicom_file_metadata"],
    )
    row = conn.execute(statement, params).fetchone()
    return 0 if row is None else int(row[0])


def ingest_check_figures(
    conn: psycopg.Connection, tables: Tables, run_id: str
) -> IngestCheckFigures:
    """What the ingest's asset checks look at, for the run ``run_id``."""
    modality = (
        conn.cursor(row_factory=class_row(_ModalityCounts))
        .execute(sql.SQL(_MODALITY_CONCEPTS).format(io=tables["image_occurrence"]))
        .fetchone()
    )
    assert modality is not None
    return IngestCheckFigures(
        series_without_procedure=_count(conn, _SERIES_WITHOUT_PROCEDURE, tables),
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
    for ids in feature_ids:
        if len(ids):
            row = conn.execute(query, [ids.start, ids.stop - 1]).fetchone()
            missing += int(row[0]) if row else 0
    return missing


def table_facts(conn: psycopg.Connection, tables: Tables) -> TableFacts:
    """Row counts of the study and series tables and the DICOM vocabulary version."""
    version = conn.execute(
        sql.SQL("SELECT vocabulary_version FROM {} WHERE vocabulary_id = 'DICOM'").format(
            tables["vocabulary"]
        )
    ).fetchone()
    return TableFacts(
        procedure_occurrences=row_count(conn, tables["procedure_occurrence"]),
        image_occurrences=row_count(conn, tables["image_occurrence"]),
        image_features=row_count(conn, tables["image_feature"]),
        dicom_vocabulary_version=version[0] if version else None,
    )
