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
from dataclasses import dataclass, field
from typing import NamedTuple

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


class PlannedMeasurement(NamedTuple):
    measurement: Measurement
    context: Context
    finding_concept_id: int | None  # the SR group's Finding
    finding: int | None  # index of its finding (SR group) among the batch's findings
    sop_instance_uid: str | None  # the SR it came from; None for acquisition parameters


class PlannedSegment(NamedTuple):
    segment: SegmentFinding
    context: Context
    property_concept_id: int
    finding: int
    sop_instance_uid: str


@dataclass
class AnalyticsWrite:
    """One batch's rows, built before their ids are reserved."""

    measurements: list[PlannedMeasurement] = field(default_factory=list)
    segments: list[PlannedSegment] = field(default_factory=list)
    findings: int = 0  # image_finding_ids to reserve


def report_instances(plan: BatchPlan) -> list[InstanceWrite]:
    """The batch's instances that carry SR or SEG findings."""
    return [w for w in plan.instances if w.parsed.findings.numeric or w.parsed.findings.segments]


def visit_keys(plan: BatchPlan) -> Iterable[VisitKey]:
    """Every (person, study date) whose visit the batch's analytics rows need."""
    for s in plan.new_series:
        yield (s.person_id, s.study_date or s.image_date)
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
            for n in findings.numeric:
                wanted_series.update(n.referenced_series)
                wanted_sops.update(n.referenced_sops)
            for segment in findings.segments:
                wanted_series.update(segment.referenced_series)
        self._look_up(
            conn, tables, wanted_series - self.series.keys(), wanted_sops - self.sops.keys()
        )

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
    conn: psycopg.Connection, tables: Tables, batch: AnalyticsWrite
) -> tuple[int, int, range]:
    """Reserve the ids and COPY the rows; returns (measurements, features, feature ids)."""
    n_measurements, n_segments = len(batch.measurements), len(batch.segments)
    first_m = reserve_ids(conn, tables.sequence("dicom_etl_measurement_id_seq"), n_measurements)
    first_f = reserve_ids(
        conn, tables.sequence("dicom_etl_image_feature_id_seq"), n_measurements + n_segments
    )
    first_g = reserve_ids(conn, tables.sequence("dicom_etl_image_finding_id_seq"), batch.findings)
    measurements: list[tuple] = []
    features: list[tuple] = []
    sources: list[tuple[int, int | None, str]] = []
    for i, p in enumerate(batch.measurements):
        measurement_id, feature_id = first_m + i, first_f + i
        finding_id = None if p.finding is None else first_g + p.finding
        measurements.append(measurement_row(measurement_id, p.measurement, p.context))
        features.append(
            measurement_feature_row(
                feature_id,
                measurement_id,
                p.measurement,
                p.context,
                (p.finding_concept_id, finding_id),
            )
        )
        if p.sop_instance_uid is not None:
            sources.append((feature_id, measurement_id, p.sop_instance_uid))
    for j, seg in enumerate(batch.segments):
        feature_id = first_f + n_measurements + j
        features.append(
            segment_feature_row(
                feature_id,
                first_g + seg.finding,
                seg.property_concept_id,
                seg.context,
                seg.segment.alg_system,
                seg.segment.alg_datetime,
            )
        )
        sources.append((feature_id, None, seg.sop_instance_uid))
    for table, columns, rows in (
        ("measurement", MEASUREMENT_COLUMNS, measurements),
        ("image_feature", FEATURE_COLUMNS, features),
        ("dicom_etl_feature_source", SOURCE_COLUMNS, sources),
    ):
        if rows:
            copy_rows(conn, tables[table], columns, rows)
    return n_measurements, len(features), range(first_f, first_f + len(features))


@dataclass(frozen=True)
class BatchIds:
    """Where the batch's new rows start, and the visits found for it."""

    first_procedure_id: int
    first_image_id: int
    visits: dict[VisitKey, int]


def plan_analytics(
    conn: psycopg.Connection,
    tables: Tables,
    options: AnalyticsOptions,
    concepts: MeasurementConcepts,
    sites: ConceptResolver,
    plan: BatchPlan,
    ids: BatchIds,
) -> AnalyticsWrite:
    """Every measurement / feature row of the batch, with its context (ids not reserved)."""
    batch = AnalyticsWrite()
    if not options.enabled:
        return batch
    profile = [
        (s, [v for v in s.acquisition if in_profile(v, options.attributes)])
        for s in plan.new_series
    ]
    reports = report_instances(plan)
    prepare_concepts(concepts, profile, reports)
    for i, (series, values) in enumerate(profile):
        context = Context(
            series.person_id,
            ids.first_image_id + i,
            visit_of(ids.visits, (series.person_id, series.study_date or series.image_date)),
            series.image_date,
            series.image_datetime,
            sites.anatomic_site(series.body_part),
        )
        for value in values:
            m = acquisition_measurement(value, concepts, options.non_standard)
            if m is not None:
                batch.measurements.append(PlannedMeasurement(m, context, None, None, None))
    if reports:
        references = SeriesReferences(conn, tables, plan, ids.first_image_id)
        for w in reports:
            _plan_report(batch, w, references, concepts, options.non_standard, ids)
    return batch


def _plan_report(
    batch: AnalyticsWrite,
    w: InstanceWrite,
    references: SeriesReferences,
    concepts: MeasurementConcepts,
    policy: NonStandardConcepts,
    ids: BatchIds,
) -> None:
    """The rows of one SR or SEG instance: its NUM items by group, its segments."""
    instance, findings = w.parsed.instance, w.parsed.findings
    own = resolve(w.image_occurrence, ids.first_image_id)
    base = Context(
        w.person_id,
        own,
        visit_of(ids.visits, (w.person_id, instance.procedure_date)),
        instance.image_date,
        instance.image_datetime,
        0,
    )
    sop = instance.sop_instance_uid
    groups: dict[int, int] = {}  # the report's group -> the batch's finding index
    for f in findings.numeric:
        if f.group not in groups:
            groups[f.group] = batch.findings
            batch.findings += 1
        context = base._replace(
            image_occurrence_id=references.target(f.referenced_series, f.referenced_sops, own),
            site_concept_id=chosen(concepts.code(f.finding_site), policy),
        )
        finding_concept = chosen(concepts.code(f.finding), policy) if f.finding else None
        m = numeric_measurement(f, concepts, policy)
        batch.measurements.append(
            PlannedMeasurement(m, context, finding_concept, groups[f.group], sop)
        )
    for segment in findings.segments:
        context = base._replace(
            image_occurrence_id=references.target(segment.referenced_series, (), own),
            site_concept_id=chosen(concepts.code(segment.anatomic_region), policy),
        )
        prop = chosen(concepts.code(segment.property_type), policy)
        batch.segments.append(PlannedSegment(segment, context, prop, batch.findings, sop))
        batch.findings += 1
