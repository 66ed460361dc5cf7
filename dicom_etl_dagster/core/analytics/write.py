"""Write a batch's measurements and image features, inside the batch's transaction.

Called by ``ingest.writer.write_batch`` after the batch's studies and series are written,
under the same lock and in the same transaction, so measurements exist exactly when their
series and instances do, a re-run adds none and overlapping runs write each once:

- acquisition parameters are written for a series when the series is new (from the first
  instance ingested for it: the plan's ``NewSeries.acquisition``);
- SR and SEG findings are written when their instance is ingested (its first copy), and
  recorded in ``dicom_etl_feature_source`` so that a changed file replaces them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.analytics.acquisition import in_profile
from dicom_etl_dagster.core.analytics.concepts import MeasurementConcepts
from dicom_etl_dagster.core.analytics.findings import (
    AcquisitionValue,
    Code,
    NumericFinding,
    SegmentFinding,
)
from dicom_etl_dagster.core.analytics.rows import (
    FEATURE_COLUMNS,
    MEASUREMENT_COLUMNS,
    Context,
    Measurement,
    NonStandardConcepts,
    chosen,
    measurement_feature_row,
    measurement_row,
    segment_feature_row,
)
from dicom_etl_dagster.core.analytics.units import ATTRIBUTE_UNITS
from dicom_etl_dagster.core.db.tables import Tables, copy_rows, reserve_ids
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.plan import BatchPlan, InstanceWrite, NewSeries, resolve
from dicom_etl_dagster.core.ingest.status import LedgerStatus
from dicom_etl_dagster.core.ingest.visits import VisitKey, visit_of

SOURCE_COLUMNS = ("image_feature_id", "measurement_id", "sop_instance_uid")


@dataclass(frozen=True)
class AnalyticsOptions:
    """What the run writes into measurement / image_feature (the options document's keys)."""

    enabled: bool = True  # measurements
    attributes: frozenset[str] | None = None  # acquisition_attributes; None: the default profile
    non_standard: NonStandardConcepts = NonStandardConcepts.DICOM


@dataclass
class AnalyticsWrite:
    """One batch's rows, built before their ids are reserved."""

    measurements: list[tuple[Measurement, Context, tuple[int | None, int | None], str | None]]
    segments: list[tuple[SegmentFinding, Context, int, str]]  # (segment, context, finding, sop)

    def __init__(self) -> None:
        self.measurements, self.segments = [], []


def report_instances(plan: BatchPlan) -> list[InstanceWrite]:
    """The batch's instances that carry SR or SEG findings."""
    return [w for w in plan.instances if w.parsed.findings.numeric or w.parsed.findings.segments]


def visit_keys(plan: BatchPlan) -> Iterable[VisitKey]:
    """Every (person, study date) whose visit the batch's analytics rows need."""
    for s in plan.new_series:
        if s.study_date is not None:
            yield (s.person_id, s.study_date)
    for w in report_instances(plan):
        yield (w.person_id, w.parsed.instance.procedure_date)


def _codes_of(reports: Sequence[InstanceWrite]) -> Iterable[Code | None]:
    for w in reports:
        for f in w.parsed.findings.numeric:
            yield from (f.concept, f.unit, f.finding, f.finding_site)
        for s in w.parsed.findings.segments:
            yield from (s.property_type, s.anatomic_region)


def prepare_concepts(
    concepts: MeasurementConcepts,
    profile: Sequence[tuple[NewSeries, list[AcquisitionValue]]],
    reports: Sequence[InstanceWrite],
) -> None:
    values = [v for _, values in profile for v in values]
    units = {ATTRIBUTE_UNITS.get(v.keyword) for v in values}
    codes = [c for c in _codes_of(reports) if c is not None]
    codes += [Code("UCUM", unit) for unit in units if unit]
    concepts.prepare(
        {v.tag for v in values}, {(v.tag, v.text) for v in values if v.number is None}, codes
    )


def acquisition_measurement(
    value: AcquisitionValue, concepts: MeasurementConcepts, policy: NonStandardConcepts
) -> Measurement | None:
    """An attribute's measurement; None for a coded value the vocabulary has no concept for."""
    attribute = concepts.attribute(value.tag)
    value_concept = None
    if value.number is None:
        coded = concepts.value(value.tag, value.text)
        if not coded.source:
            return None
        value_concept = coded.standard or coded.source
    unit = ATTRIBUTE_UNITS.get(value.keyword) if value.number is not None else None
    return Measurement(
        concept_id=chosen(attribute, policy),
        source_value=value.keyword,
        source_concept_id=attribute.source,
        number=value.number,
        value_concept_id=value_concept,
        value_text=value.text,
        unit_concept_id=concepts.unit(unit),
        unit_source_value=unit,
    )


def numeric_measurement(
    finding: NumericFinding, concepts: MeasurementConcepts, policy: NonStandardConcepts
) -> Measurement:
    """An SR NUM item's measurement: concept by coding scheme, unit from its units code."""
    match = concepts.code(finding.concept)
    unit = finding.unit
    if unit is None:
        unit_source, unit_concept = None, 0
    elif unit.scheme == "UCUM":
        unit_source, unit_concept = unit.value, concepts.unit(unit.value)
    else:
        unit_source, unit_concept = unit.source_value(), concepts.code(unit).standard
    return Measurement(
        concept_id=chosen(match, policy),
        source_value=finding.concept.source_value(),
        source_concept_id=match.source,
        number=finding.number,
        value_concept_id=None,
        value_text=finding.text,
        unit_concept_id=unit_concept,
        unit_source_value=unit_source,
    )


class SeriesReferences:
    """image_occurrence ids of the series and SOP instances SR / SEG findings refer to."""

    def __init__(
        self, conn: psycopg.Connection, tables: Tables, plan: BatchPlan, first_image_id: int
    ) -> None:
        self.series = {s.series_uid: first_image_id + i for i, s in enumerate(plan.new_series)}
        self.sops = {
            w.parsed.instance.sop_instance_uid: resolve(w.image_occurrence, first_image_id)
            for w in plan.instances
        }
        wanted_series: set[str] = set()
        wanted_sops: set[str] = set()
        for w in report_instances(plan):
            findings = w.parsed.findings
            for f in (*findings.numeric, *findings.segments):
                wanted_series.update(f.referenced_series)
            for n in findings.numeric:
                wanted_sops.update(n.referenced_sops)
        self._look_up(conn, tables, wanted_series - self.series.keys(), wanted_sops - self.sops.keys())

    def _look_up(
        self, conn: psycopg.Connection, tables: Tables, series: set[str], sops: set[str]
    ) -> None:
        if series:
            query = sql.SQL(
                "SELECT image_series_uid, image_occurrence_id FROM {} WHERE image_series_uid = ANY(%s)"
            ).format(tables["image_occurrence"])
            self.series.update(conn.execute(query, [sorted(series)]).fetchall())
        if sops:
            # A literal status, for the partial unique index (see ingest.lookups).
            query = sql.SQL(
                "SELECT sop_instance_uid, image_occurrence_id FROM {} WHERE status = {}"
                " AND sop_instance_uid = ANY(%s) AND image_occurrence_id IS NOT NULL"
            ).format(tables["dicom_ingest_log"], sql.Literal(LedgerStatus.INGESTED.value))
            self.sops.update(conn.execute(query, [sorted(sops)]).fetchall())

    def target(self, series: Sequence[str], sops: Sequence[str], own: int) -> int:
        """The first referenced series that is ingested, else a referenced instance's series,
        else the report's own series."""
        for uid in series:
            if uid in self.series:
                return self.series[uid]
        for uid in sops:
            if uid in self.sops:
                return self.sops[uid]
        return own


def forget_findings(conn: psycopg.Connection, tables: Tables, sops: Sequence[str]) -> int:
    """Delete the SR / SEG rows of instances whose files changed; returns the features deleted."""
    if not sops:
        return 0
    source = tables["dicom_etl_feature_source"]
    conn.execute(
        sql.SQL(
            "DELETE FROM {m} WHERE measurement_id IN"
            " (SELECT measurement_id FROM {s} WHERE sop_instance_uid = ANY(%s))"
        ).format(m=tables["measurement"], s=source),
        [list(sops)],
    )
    conn.execute(
        sql.SQL(
            "DELETE FROM {f} WHERE image_feature_id IN"
            " (SELECT image_feature_id FROM {s} WHERE sop_instance_uid = ANY(%s))"
        ).format(f=tables["image_feature"], s=source),
        [list(sops)],
    )
    return conn.execute(
        sql.SQL("DELETE FROM {} WHERE sop_instance_uid = ANY(%s)").format(source), [list(sops)]
    ).rowcount


def copy_analytics(
    conn: psycopg.Connection, tables: Tables, batch: AnalyticsWrite, finding_count: int
) -> tuple[int, int, range]:
    """Reserve the ids and COPY the rows; returns (measurements, features, feature ids)."""
    n_measurements, n_segments = len(batch.measurements), len(batch.segments)
    first_m = reserve_ids(conn, tables.sequence("dicom_etl_measurement_id_seq"), n_measurements)
    first_f = reserve_ids(
        conn, tables.sequence("dicom_etl_image_feature_id_seq"), n_measurements + n_segments
    )
    first_g = reserve_ids(conn, tables.sequence("dicom_etl_image_finding_id_seq"), finding_count)
    measurements, features, sources = [], [], []
    for i, (m, context, (finding_concept, finding), sop) in enumerate(batch.measurements):
        finding_id = None if finding is None else first_g + finding
        measurements.append(measurement_row(first_m + i, m, context))
        features.append(
            measurement_feature_row(first_f + i, first_m + i, m, context, (finding_concept, finding_id))
        )
        if sop is not None:
            sources.append((first_f + i, first_m + i, sop))
    for j, (segment, context, finding, sop) in enumerate(batch.segments):
        feature_id = first_f + n_measurements + j
        features.append(
            segment_feature_row(
                feature_id,
                first_g + finding,
                context.site_concept_id if False else segment.number,  # replaced below
                context,
                segment.alg_system,
                segment.alg_datetime,
            )
        )
        sources.append((feature_id, None, sop))
    if measurements:
        copy_rows(conn, tables["measurement"], MEASUREMENT_COLUMNS, measurements)
    if features:
        copy_rows(conn, tables["image_feature"], FEATURE_COLUMNS, features)
    if sources:
        copy_rows(conn, tables["dicom_etl_feature_source"], SOURCE_COLUMNS, sources)
    return n_measurements, len(features), range(first_f, first_f + len(features))
