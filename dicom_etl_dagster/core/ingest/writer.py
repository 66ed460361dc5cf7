"""Write one batch of parsed files: OMOP rows (studies, series, measurements and image
features: ``core/analytics/write.py``), EAV rows and ledger rows in one transaction.

Everything a batch writes commits together or not at all, so a crash leaves whole batches;
the ledger (dicom_ingest_log) is part of that transaction, so a re-run knows exactly what
is done. Overlapping runs produce exactly the rows one run would: a batch's decisions (is
this SOP instance new? does this series exist?) are checked under locks on what they are
about, and the database's unique indexes arbitrate the rest.

A batch plans optimistically from what it reads without any lock, reserves the ids of that
plan's new series and of its metadata rows, and COPYs its EAV rows (~200 per file, the bulk
of the batch). Uncommitted metadata rows are seen by nobody else and no unique index covers
them, so that COPY waits for no one. Then the batch takes its keyed locks
(``tables.take_keyed_locks``): one per study and series it creates and per SOP instance
its plan calls a duplicate or changed, in a fixed order, under the ingest lock of the
schema in shared mode. Batches about other studies and series never wait for them. Under these
locks the batch reads again; if the database holds the same rows for it, its plan is the one
it would make now, and it writes the rest (studies, series with the reserved ids,
analytics, replaced rows, ledger). A file two batches both record (one path, or one SOP
instance ingested twice) meets the ledger's unique indexes: the second batch waits for the
first's commit, and its write fails.

If the rows changed, or a unique index or a deadlock refused a write, the batch rolls back
to a savepoint taken before the optimistic work (which also releases the locks taken after
it) and writes the whole batch under the schema's ingest lock in exclusive mode: no other batch
of the schema writes meanwhile. A batch that must add dicom_data_element entries to a table
whose unique indexes cannot arbitrate them (a user's table; ``data_elements``) does so from
the start.

The decisions themselves are not made here: ``plan.plan_batch`` makes them from the rows
this module looks up (``lookups.batch_rows``), and this module applies the plan: it deletes
what changed files replace, reserves ids from the ETL's own sequences, a range per table
and batch, fills them into the planned rows and COPYs them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import errors, sql

from dicom_etl_dagster.core.analytics.concepts import MeasurementConcepts
from dicom_etl_dagster.core.analytics.procedures import refine_procedures
from dicom_etl_dagster.core.analytics.write import (
    AnalyticsOptions,
    BatchIds,
    copy_analytics,
    forget_findings,
    plan_analytics,
    visit_keys,
)
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.partitions import PartitionCover, ensure_partitions
from dicom_etl_dagster.core.db.tables import (
    ROW_TIMESTAMP_DEFAULT,
    Tables,
    column_defaults,
    copy_rows,
    release_session_locks,
    reserve_ids,
    take_advisory_lock,
    take_keyed_locks,
    take_shared_advisory_lock,
)
from dicom_etl_dagster.core.dicom.odd_values import ledger_tags
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.data_elements import (
    ensure_data_elements,
    learn_existing_entries,
    needs_entries,
)
from dicom_etl_dagster.core.ingest.lookups import PersonMapping, batch_rows, same_rows
from dicom_etl_dagster.core.ingest.metadata_copy import COLUMNS as METADATA_COLUMNS
from dicom_etl_dagster.core.ingest.metadata_copy import (
    TIMESTAMP_COLUMNS,
    DataElementIds,
    RenderedMetadata,
    fill,
    storable_text,
    timestamp_fields,
)
from dicom_etl_dagster.core.ingest.parse_pool import ParseResult
from dicom_etl_dagster.core.ingest.plan import (
    CHANGED_COPY_REASON,
    EHR_TYPE_CONCEPT_ID,
    BatchPlan,
    InstanceWrite,
    LedgerEntry,
    NewStudy,
    PersonPolicy,
    plan_batch,
    resolve,
)
from dicom_etl_dagster.core.ingest.status import LedgerStatus, MissingPersonPolicy
from dicom_etl_dagster.core.ingest.visits import VisitKey, find_visits, visit_of, visit_outcome

__all__ = ["IngestReport", "PersonMapping", "RunState", "write_batch"]

_PROCEDURE_COLUMNS = (
    "procedure_occurrence_id",
    "person_id",
    "procedure_concept_id",
    "procedure_date",
    "procedure_datetime",
    "procedure_type_concept_id",
    "procedure_source_value",
    "visit_occurrence_id",
)
_IMAGE_COLUMNS = (
    "image_occurrence_id",
    "person_id",
    "procedure_occurrence_id",
    "anatomic_site_concept_id",
    "local_path",
    "image_occurrence_date",
    "image_study_uid",
    "image_series_uid",
    "modality_concept_id",
    "visit_occurrence_id",
    "wadors_uri",
)
_LEDGER_COLUMNS = (
    "ingest_log_id",
    "file_path",
    "file_size",
    "file_mtime_ns",
    "status",
    "error_message",
    "sop_instance_uid",
    "image_occurrence_id",
    "run_id",
    "processed_at",
    "value_warnings",
    "value_warning_tags",
    "metadata_id_first",
    "metadata_row_count",
)


@dataclass
class RunState:
    """What stays the same for every batch of a run (and the caches that make batches cheap)."""

    schemas: Schemas
    run_id: str
    missing_person_policy: MissingPersonPolicy
    mapping: PersonMapping | None  # None: the mapping table does not exist
    concepts: ConceptResolver
    data_elements: DataElementIds  # entry key -> data_element_id, learnt as entries are added
    measurement_concepts: MeasurementConcepts
    analytics: AnalyticsOptions = AnalyticsOptions()
    has_visits: bool = False  # the CDM schema has visit_occurrence: studies are linked to visits
    # dicom_data_element has private_creator: private entries per creator (``data_elements``).
    private_creators: bool = True
    # Its unique indexes decide that an entry is added once: a batch adding entries needs no
    # exclusive lock (``data_elements``).
    entries_arbitrated: bool = False
    # The DICOMweb root the run reads from: new series get wadors_uri <root>/studies/<s>/series/<se>.
    dicomweb_source: str | None = None
    # What the run knows of dicom_file_metadata's partitions (core/db/partitions.py).
    partitions: PartitionCover = field(default_factory=PartitionCover)
    # The columns the metadata COPY gives (``metadata_columns``): all, or all but the
    # timestamps that the ETL's table fills itself.
    metadata_columns: tuple[str, ...] = METADATA_COLUMNS

    @property
    def tables(self) -> Tables:
        return Tables(self.schemas)

    @property
    def person_policy(self) -> PersonPolicy:
        table = None if self.mapping is None else f"{self.mapping.schema}.{self.mapping.table}"
        return PersonPolicy(self.missing_person_policy, table)


@dataclass
class IngestReport:
    files_seen: int = 0
    files_already_done: int = 0
    archives_read: int = 0  # archives opened and read to their end (their members are files)
    archives_skipped: int = 0  # unchanged archives not opened again
    status_counts: Counter = field(default_factory=Counter)
    rows: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    series_by_modality: Counter = field(
        default_factory=Counter
    )  # (modality, body part, concept, site) -> series
    person_misses: int = 0
    # (source value, measurement_concept_id, unit_source_value) -> measurements written
    measurements: Counter = field(default_factory=Counter)
    visits: Counter = field(default_factory=Counter)  # new studies: linked / none / ambiguous
    procedure_concepts: Counter = field(default_factory=Counter)  # by procedure code / modality
    feature_ids: list[range] = field(default_factory=list)  # image_feature ids written
    series_ids: list[range] = field(default_factory=list)  # image_occurrence ids written
    odd_value_files: int = 0  # files read with at least one odd value (see core/dicom/odd_values)
    odd_value_tags: Counter = field(default_factory=Counter)  # tag -> files that have it
    # Per batch written: seconds from taking its locks (keyed or the schema's) to its commit.
    lock_held_seconds: list[float] = field(default_factory=list)
    # Batches whose optimistic plan was stale under their keyed locks, or whose write a unique
    # index or a deadlock refused: written again, wholly under the schema's ingest lock.
    batches_rewritten_under_lock: int = 0

    def merge(self, other: IngestReport) -> None:
        self.files_already_done += other.files_already_done
        self.archives_read += other.archives_read
        self.archives_skipped += other.archives_skipped
        self.status_counts.update(other.status_counts)
        self.rows.update(other.rows)
        self.failures.extend(other.failures)
        self.series_by_modality.update(other.series_by_modality)
        self.person_misses += other.person_misses
        self.measurements.update(other.measurements)
        self.visits.update(other.visits)
        self.procedure_concepts.update(other.procedure_concepts)
        self.feature_ids.extend(other.feature_ids)
        self.series_ids.extend(other.series_ids)
        self.odd_value_files += other.odd_value_files
        self.odd_value_tags.update(other.odd_value_tags)
        self.lock_held_seconds.extend(other.lock_held_seconds)
        self.batches_rewritten_under_lock += other.batches_rewritten_under_lock


class _MetadataWritten(NamedTuple):
    """The metadata ids a batch wrote: all of them, and SOP Instance UID -> (first id, row
    count) of each instance, for its ledger row."""

    ids: range
    by_sop: dict[str, tuple[int, int]]


class _PlanChanged(Exception):
    """Under its locks the database held other rows for the batch than without them."""


#: What makes an optimistic batch start again under the schema's lock: its plan was stale, or
#: the database refused a write another run made first (or a lock order PostgreSQL broke).
_OPTIMISM_FAILED = (_PlanChanged, errors.UniqueViolation, errors.DeadlockDetected)


@dataclass
class _LockClock:
    """When the batch took its locks (monotonic seconds; None: not yet)."""

    taken_at: float | None = None

    def take(self, conn: psycopg.Connection, tables: Tables) -> None:
        """The schema's ingest lock, exclusive: no other batch writes meanwhile."""
        take_advisory_lock(conn, tables.ingest_lock_key)
        self._started()

    def take_shared(self, conn: psycopg.Connection, tables: Tables) -> None:
        """The schema's ingest lock, shared: no batch holding it exclusively writes meanwhile."""
        take_shared_advisory_lock(conn, tables.ingest_lock_key)
        self._started()

    def take_keys(self, conn: psycopg.Connection, tables: Tables, keys: set[str]) -> None:
        """The locks of what the batch's decisions are about (``_decision_keys``)."""
        take_keyed_locks(conn, tables.ingest_lock_key, keys)
        self._started()

    def _started(self) -> None:
        if self.taken_at is None:  # held from the first time on, if taken twice
            self.taken_at = time.monotonic()


def write_batch(
    conn: psycopg.Connection, state: RunState, results: Sequence[ParseResult]
) -> IngestReport:
    """Record every parse result of the batch; returns what was written."""
    report = IngestReport()
    if not results:
        return report
    # Before the batch's transaction: the DDL never runs while the batch holds its locks.
    ensure_partitions(conn, state.tables, cover=state.partitions)
    clock = _LockClock()
    try:
        with conn.transaction():
            plan = _write_batch_transaction(conn, state, results, clock, report)
    except BaseException:
        release_session_locks(conn)  # a reservation that failed half-way (``reserve_ids``)
        raise
    if clock.taken_at is not None:
        report.lock_held_seconds.append(time.monotonic() - clock.taken_at)
    report.files_already_done += plan.already_done
    report.person_misses += plan.person_misses
    return report


def _write_batch_transaction(
    conn: psycopg.Connection,
    state: RunState,
    results: Sequence[ParseResult],
    clock: _LockClock,
    report: IngestReport,
) -> BatchPlan:
    """The batch's writes, optimistically before the lock where they can be (module docstring)."""
    tables = state.tables
    rows = batch_rows(conn, tables, state.mapping, results)
    plan = plan_batch(results, rows, state.person_policy)
    rendered = [w.parsed.metadata for w in plan.instances]
    learn_existing_entries(conn, tables, state.data_elements, state.private_creators, rendered)
    adds_entries = needs_entries(state.data_elements, rendered)
    if adds_entries and not state.entries_arbitrated:
        return _write_under_lock(conn, state, results, clock, report)
    # Entries the attempt adds go with its savepoint if it fails: then the run forgets them.
    entries_before = dict(state.data_elements) if adds_entries else None
    attempt = IngestReport()  # counted only if the optimistic plan holds
    try:
        with conn.transaction():  # a savepoint: the optimistic rows go if the plan is stale
            if adds_entries:
                # Before the entries: a batch under the exclusive lock, which adds entries
                # too, must never wait for this batch's while this batch waits for its lock.
                clock.take_shared(conn, tables)
            first_image_id = _reserve_image_ids(conn, tables, plan)
            metadata = _write_metadata(conn, state, plan.instances, first_image_id, attempt)
            clock.take_keys(conn, tables, _decision_keys(plan))
            if not same_rows(rows, batch_rows(conn, tables, state.mapping, results)):
                raise _PlanChanged
            _write_decided(conn, state, plan, first_image_id, metadata, attempt)
    except _OPTIMISM_FAILED:
        report.batches_rewritten_under_lock += 1
        # A partition the attempt attached (``_write_metadata``'s fallback) went with it.
        state.partitions.covered_below = 0
        if entries_before is not None:
            state.data_elements.clear()
            state.data_elements.update(entries_before)
        clock.taken_at = None  # its locks went with the savepoint
        return _write_under_lock(conn, state, results, clock, report)
    report.merge(attempt)
    return plan


def _decision_keys(plan: BatchPlan) -> set[str]:
    """What the batch's decisions that another batch could make differently are about: the
    studies and series it creates (what exists stays: the ETL never deletes either) and the
    SOP instances it calls duplicates or changed (a changed instance's duplicates fail).
    A file it ingests is arbitrated by the ledger's unique indexes instead."""
    keys = {f"study:{s.study_uid}" for s in plan.new_studies}
    keys.update(f"series:{s.series_uid}" for s in plan.new_series)
    keys.update(f"sop:{sop}" for sop in plan.changed_sops)
    keys.update(
        f"sop:{e.sop_instance_uid}"
        for e in plan.ledger
        if e.status == LedgerStatus.DUPLICATE and e.sop_instance_uid
    )
    return keys


def _write_under_lock(
    conn: psycopg.Connection,
    state: RunState,
    results: Sequence[ParseResult],
    clock: _LockClock,
    report: IngestReport,
) -> BatchPlan:
    """The whole batch under the ingest lock: look up, plan and write."""
    tables = state.tables
    clock.take(conn, tables)
    # Under the lock, look again: another run may have written some of these files.
    rows = batch_rows(conn, tables, state.mapping, results)
    plan = plan_batch(results, rows, state.person_policy)
    first_image_id = _reserve_image_ids(conn, tables, plan)
    metadata = _write_metadata(conn, state, plan.instances, first_image_id, report)
    _write_decided(conn, state, plan, first_image_id, metadata, report)
    return plan


def _reserve_image_ids(conn: psycopg.Connection, tables: Tables, plan: BatchPlan) -> int:
    """The first image_occurrence id of the plan's new series (their ids are reserved)."""
    sequence = tables.sequence("dicom_etl_image_occurrence_id_seq")
    return reserve_ids(conn, sequence, len(plan.new_series))


def _write_decided(
    conn: psycopg.Connection,
    state: RunState,
    plan: BatchPlan,
    first_image_id: int,
    metadata: _MetadataWritten,
    report: IngestReport,
) -> None:
    """Under the batch's locks, with its metadata rows written: everything else of it."""
    tables = state.tables
    _forget_replaced(conn, tables, plan, metadata.ids, report)
    visits = _visits(conn, state, plan)
    first_procedure_id = _write_studies(conn, state, plan.new_studies, visits, report)
    _write_series(conn, state, plan, first_image_id, first_procedure_id, visits, report)
    ids = BatchIds(first_procedure_id, first_image_id, visits)
    _write_analytics(conn, state, plan, ids, report)
    _write_ledger(conn, state, plan.ledger, first_image_id, metadata.by_sop, report)


def _copy_any(
    conn: psycopg.Connection, table: sql.Composable, columns: Sequence[str], rows: list[Any]
) -> int:
    """COPY the rows, sending nothing when there are none."""
    return copy_rows(conn, table, columns, rows) if rows else 0


def _forget_replaced(
    conn: psycopg.Connection,
    tables: Tables,
    plan: BatchPlan,
    own_metadata_ids: range,
    report: IngestReport,
) -> None:
    """Files changed since they were recorded: their old instance's rows go, the paths that
    were duplicates of it become 'failed', and the changed paths' ledger rows go.

    The batch's own metadata rows (``own_metadata_ids``) are in the table already, written
    for the new content of those SOP instances: they stay."""
    if plan.changed_sops:
        report.rows["image_feature_replaced"] += forget_findings(conn, tables, plan.changed_sops)
        report.rows["dicom_file_metadata_replaced"] += _delete_metadata(
            conn, tables, plan.changed_sops, own_metadata_ids
        )
        conn.execute(
            sql.SQL(
                "UPDATE {} SET status = %s, image_occurrence_id = NULL, error_message = %s"
                " WHERE status = %s AND sop_instance_uid = ANY(%s)"
            ).format(tables["dicom_ingest_log"]),
            [
                LedgerStatus.FAILED,
                CHANGED_COPY_REASON,
                LedgerStatus.DUPLICATE,
                list(plan.changed_sops),
            ],
        )
    if plan.replaced_paths:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE file_path = ANY(%s)").format(tables["dicom_ingest_log"]),
            [list(plan.replaced_paths)],
        )


def _delete_metadata(
    conn: psycopg.Connection, tables: Tables, sops: Sequence[str], own_ids: range
) -> int:
    """Delete the old metadata rows of the SOP instances: by the id ranges their ledger rows
    record (the primary key, partition by partition), and by sop_instance_id only for files
    ingested before revision 0007 recorded ranges (their tables have the hash index), keeping
    the batch's own new rows (``own_ids``) for the same instances."""
    ranges = conn.execute(
        sql.SQL(
            "SELECT sop_instance_uid, metadata_id_first, metadata_row_count FROM {}"
            " WHERE status = 'ingested' AND sop_instance_uid = ANY(%s)"
            " AND metadata_id_first IS NOT NULL"
        ).format(tables["dicom_ingest_log"]),
        [list(sops)],
    ).fetchall()
    deleted = 0
    if ranges:
        between = sql.SQL(" OR ").join(
            sql.SQL("metadata_id BETWEEN {} AND {}").format(
                sql.Literal(first), sql.Literal(first + count - 1)
            )
            for _, first, count in ranges
        )
        deleted += conn.execute(
            sql.SQL("DELETE FROM {} WHERE {}").format(tables["dicom_file_metadata"], between)
        ).rowcount
    without_range = sorted(set(sops) - {sop for sop, _, _ in ranges})
    if without_range:
        deleted += conn.execute(
            sql.SQL(
                "DELETE FROM {} WHERE sop_instance_id = ANY(%s)"
                " AND metadata_id NOT BETWEEN %s AND %s"  # an empty range excludes nothing
            ).format(tables["dicom_file_metadata"]),
            [without_range, own_ids.start, own_ids.stop - 1],
        ).rowcount
    return deleted


def _visits(conn: psycopg.Connection, state: RunState, plan: BatchPlan) -> dict[VisitKey, int]:
    """The visits of the batch's new studies, series and reports (none without the table)."""
    if not state.has_visits:
        return {}
    keys = [(s.person_id, s.procedure_date) for s in plan.new_studies]
    keys += visit_keys(plan)
    return find_visits(conn, state.tables, keys)


def _write_studies(
    conn: psycopg.Connection,
    state: RunState,
    studies: Sequence[NewStudy],
    visits: dict[VisitKey, int],
    report: IngestReport,
) -> int:
    """procedure_occurrence rows of the new studies; returns the first of their ids.

    procedure_concept_id starts at 0: ``procedures.refine_procedures`` sets it from what the
    batch's instances say, for new and earlier studies alike."""
    tables = state.tables
    first = reserve_ids(
        conn, tables.sequence("dicom_etl_procedure_occurrence_id_seq"), len(studies)
    )
    rows = []
    for i, s in enumerate(studies):
        key = (s.person_id, s.procedure_date)
        if state.has_visits:  # without the table there is nothing to count
            report.visits[visit_outcome(visits, key)] += 1
        rows.append(
            (
                first + i,
                s.person_id,
                0,
                s.procedure_date,
                s.procedure_datetime,
                EHR_TYPE_CONCEPT_ID,
                s.source_value,
                visit_of(visits, key),
            )
        )
    report.rows["procedure_occurrence"] += _copy_any(
        conn, tables["procedure_occurrence"], _PROCEDURE_COLUMNS, rows
    )
    return first


def _write_series(
    conn: psycopg.Connection,
    state: RunState,
    plan: BatchPlan,
    first: int,
    first_procedure_id: int,
    visits: dict[VisitKey, int],
    report: IngestReport,
) -> None:
    """image_occurrence rows of the new series, with their concepts; their ids (from ``first``
    on) are reserved already: the batch's metadata rows may be written with them."""
    tables, concepts, series = state.tables, state.concepts, plan.new_series
    concepts.prepare({s.modality for s in series}, {s.body_part for s in series})
    rows = []
    for i, s in enumerate(series):
        modality_id = concepts.modality(s.modality)
        site_id = concepts.anatomic_site(s.body_part)
        procedure_id = resolve(s.procedure, first_procedure_id)
        visit = visit_of(visits, (s.person_id, s.study_date or s.image_date))
        rows.append(
            (
                first + i,
                s.person_id,
                procedure_id,
                site_id,
                s.local_path,
                s.image_date,
                s.study_uid,
                s.series_uid,
                modality_id,
                visit,
                _wadors_uri(state.dicomweb_source, s.study_uid, s.series_uid),
            )
        )
        report.series_by_modality[(s.modality or "", s.body_part or "", modality_id, site_id)] += 1
    report.rows["image_occurrence"] += _copy_any(
        conn, tables["image_occurrence"], _IMAGE_COLUMNS, rows
    )
    report.series_ids.append(range(first, first + len(series)))


def _wadors_uri(root: str | None, study_uid: str, series_uid: str) -> str | None:
    """The series' WADO-RS URL on the source it is read from (as ``file_upload``'s, unquoted)."""
    return None if root is None else f"{root}/studies/{study_uid}/series/{series_uid}"


def _write_analytics(
    conn: psycopg.Connection, state: RunState, plan: BatchPlan, ids: BatchIds, report: IngestReport
) -> None:
    """Procedure concepts, then measurements and image features (``core/analytics``)."""
    tables = state.tables
    refine_procedures(
        conn,
        tables,
        state.measurement_concepts,
        state.concepts,
        plan.instances,
        ids.first_procedure_id,
        report.procedure_concepts,
    )
    batch = plan_analytics(
        conn, tables, state.analytics, state.measurement_concepts, state.concepts, plan, ids
    )
    measurements, features, feature_ids = copy_analytics(conn, tables, batch)
    report.rows["measurement"] += measurements
    report.rows["image_feature"] += features
    if features:
        report.feature_ids.append(feature_ids)
    for p in batch.measurements:
        m = p.measurement
        report.measurements[(m.source_value, m.concept_id, m.unit_source_value or "")] += 1


def _write_metadata(
    conn: psycopg.Connection,
    state: RunState,
    instances: Sequence[InstanceWrite],
    first_image_id: int,
    report: IngestReport,
) -> _MetadataWritten:
    """Every element of every instance into the EAV table, as the workers rendered it."""
    if not instances:
        return _MetadataWritten(range(0), {})
    rendered = [w.parsed.metadata for w in instances]
    tables = state.tables
    ensure_data_elements(conn, tables, state.data_elements, state.private_creators, rendered)
    # Reserved before COPY starts: the connection can run no other statement during COPY.
    row_count = sum(r.row_count for r in rendered)
    first_metadata_id = reserve_ids(conn, tables.sequence("dicom_etl_metadata_id_seq"), row_count)
    # Covered before the batch but for a span consumed since (then the DDL runs here).
    ensure_partitions(
        conn, tables, first_metadata_id + row_count - 1, state.partitions, first_metadata_id
    )
    first_dataset_id = reserve_ids(
        conn, tables.sequence("dicom_etl_dataset_id_seq"), sum(r.item_count for r in rendered)
    )
    timestamps = ""
    if state.metadata_columns[-len(TIMESTAMP_COLUMNS) :] == TIMESTAMP_COLUMNS:
        # A table without the ETL's defaults gets the value they would give.
        started = conn.execute(f"SELECT {ROW_TIMESTAMP_DEFAULT}").fetchone()
        assert started is not None  # a SELECT without FROM returns its one row
        timestamps = timestamp_fields(started[0].isoformat(sep=" "))
    # Element rows phi_policy left out: counted for the files written, not for duplicates.
    report.rows["dicom_file_metadata_phi_dropped"] += sum(w.parsed.phi_dropped for w in instances)
    written = _copy_metadata(
        conn,
        sql.SQL("{} ({})").format(
            tables["dicom_file_metadata"],
            sql.SQL(", ").join(map(sql.Identifier, state.metadata_columns)),
        ),
        state.data_elements,
        rendered,
        [resolve(w.image_occurrence, first_image_id) for w in instances],
        first_metadata_id,
        first_dataset_id,
        timestamps,
    )
    report.rows["dicom_file_metadata"] += written
    return _MetadataWritten(
        range(first_metadata_id, first_metadata_id + written),
        _id_ranges(instances, first_metadata_id),
    )


def metadata_columns(conn: psycopg.Connection, tables: Tables) -> tuple[str, ...]:
    """The columns the run's metadata COPY gives: all but the two timestamps when the table
    fills both with the ETL's default (its own table), all of them otherwise (a user's)."""
    defaults = column_defaults(conn, tables.schema_of("dicom_file_metadata"), "dicom_file_metadata")
    if all(defaults.get(c) == ROW_TIMESTAMP_DEFAULT for c in TIMESTAMP_COLUMNS):
        return METADATA_COLUMNS[: -len(TIMESTAMP_COLUMNS)]
    return METADATA_COLUMNS


def _id_ranges(
    instances: Sequence[InstanceWrite], first_metadata_id: int
) -> dict[str, tuple[int, int]]:
    """Each instance's rows are consecutive ids, in the order _copy_metadata writes them."""
    ranges = {}
    for w in instances:
        ranges[w.parsed.instance.sop_instance_uid] = (
            first_metadata_id,
            w.parsed.metadata.row_count,
        )
        first_metadata_id += w.parsed.metadata.row_count
    return ranges


def _copy_metadata(
    conn: psycopg.Connection,
    table_and_columns: sql.Composable,
    data_elements: DataElementIds,
    rendered: list[RenderedMetadata],
    image_occurrence_ids: list[int],
    metadata_id: int,
    dataset_id: int,
    timestamps: str,
) -> int:
    """COPY every file's rendered rows; its ids are the next ones of the reserved ranges."""
    with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(table_and_columns)) as copy:
        for file_rows, image_occurrence_id in zip(rendered, image_occurrence_ids, strict=True):
            copy.write(
                fill(
                    file_rows,
                    metadata_id,
                    dataset_id,
                    image_occurrence_id,
                    data_elements,
                    timestamps,
                )
            )
            metadata_id += file_rows.row_count
            dataset_id += file_rows.item_count
    return sum(r.row_count for r in rendered)


def _write_ledger(
    conn: psycopg.Connection,
    state: RunState,
    entries: Sequence[LedgerEntry],
    first_image_id: int,
    metadata_ranges: dict[str, tuple[int, int]],
    report: IngestReport,
) -> None:
    """The ledger rows, in the same transaction as what they record; an ingested file's row
    records where its metadata rows are."""
    tables = state.tables
    first = reserve_ids(conn, tables.sequence("dicom_etl_ingest_log_id_seq"), len(entries))
    processed_at = dt.datetime.now(dt.timezone.utc)
    rows = []
    for i, e in enumerate(entries):
        io_id = None if e.image_occurrence is None else resolve(e.image_occurrence, first_image_id)
        rows.append(
            (
                first + i,
                e.entry.path,
                e.entry.size,
                e.entry.mtime_ns,
                e.status,
                storable_text(e.reason),
                e.sop_instance_uid,
                io_id,
                state.run_id,
                processed_at,
                *_odd_value_columns(e.odd_value_tags, report),
                *_metadata_range(e, metadata_ranges),
            )
        )
        if e.archive:  # not a file of the counts: its members are
            report.archives_read += 1
        else:
            report.status_counts[e.status.value] += 1  # plain text keys, as reports print them
        if e.status == LedgerStatus.FAILED:
            report.failures.append((e.entry.path, e.reason or ""))
    report.rows["dicom_ingest_log"] += _copy_any(
        conn, tables["dicom_ingest_log"], _LEDGER_COLUMNS, rows
    )


def _metadata_range(
    e: LedgerEntry, metadata_ranges: dict[str, tuple[int, int]]
) -> tuple[int | None, int | None]:
    if e.status != LedgerStatus.INGESTED or e.sop_instance_uid is None:
        return None, None
    return metadata_ranges.get(e.sop_instance_uid, (None, None))


def _odd_value_columns(
    tags: tuple[str, ...] | None, report: IngestReport
) -> tuple[int | None, str | None]:
    """The ledger's value_warnings and value_warning_tags of a file; counted in the report."""
    if tags is None:
        return None, None
    if tags:
        report.odd_value_files += 1
        report.odd_value_tags.update(set(tags))
    return len(tags), ledger_tags(tags)
