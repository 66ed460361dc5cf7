"""Write one batch of parsed files: OMOP rows, EAV rows and ledger rows in one transaction.

Everything a batch writes commits together or not at all, so a crash leaves whole batches;
the ledger (dicom_ingest_log) is part of that transaction, so a re-run knows exactly what
is done. Batches of concurrent runs are serialised by a transaction-level advisory lock and
every decision (is this SOP instance new? does this series exist?) is made under it, which
makes overlapping runs produce exactly the rows one run would. Ids come from the ETL's own
sequences, reserved a batch at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.dicom.reader import DicomInstance
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.metadata_copy import COLUMNS as METADATA_COLUMNS
from dicom_etl_dagster.core.ingest.metadata_copy import (
    DataElementIds,
    RenderedMetadata,
    fill,
    storable_text,
)
from dicom_etl_dagster.core.ingest.parse_pool import ParseOutcome

EHR_TYPE_CONCEPT_ID = 32817
PROCEDURE_SOURCE_VALUE_LENGTH = 50
INGESTED, FAILED, DUPLICATE = "ingested", "failed", "duplicate"

_PROCEDURE_COLUMNS = (
    "procedure_occurrence_id",
    "person_id",
    "procedure_concept_id",
    "procedure_date",
    "procedure_type_concept_id",
    "procedure_source_value",
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
)


@dataclass(frozen=True)
class PersonMapping:
    """The validated mapping table (identifiers checked by the caller); None fields = no table."""

    schema: str
    table: str
    person_column: str
    patient_column: str


@dataclass
class RunState:
    """What stays the same for every batch of a run (and the caches that make batches cheap)."""

    schemas: Schemas
    run_id: str
    missing_person_policy: str  # "skip" | "use_id_zero"
    mapping: PersonMapping | None  # None: the mapping table does not exist
    concepts: ConceptResolver
    data_elements: DataElementIds  # dictionary tag -> data_element_id, learnt as tags are added


@dataclass
class IngestReport:
    files_seen: int = 0
    files_already_done: int = 0
    status_counts: Counter = field(default_factory=Counter)
    rows: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    series_by_modality: Counter = field(
        default_factory=Counter
    )  # (modality, body part, concept, site) -> series
    person_misses: int = 0

    def merge(self, other: IngestReport) -> None:
        self.files_already_done += other.files_already_done
        self.status_counts.update(other.status_counts)
        self.rows.update(other.rows)
        self.failures.extend(other.failures)
        self.series_by_modality.update(other.series_by_modality)
        self.person_misses += other.person_misses


def patient_reference(patient_id: str) -> str:
    """A stable, non-identifying reference to a patient id for logs and ledger reasons."""
    return "sha256:" + hashlib.sha256(patient_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _reserve_ids(conn: psycopg.Connection, schemas: Schemas, sequence: str, count: int) -> int:
    """Reserve ``count`` consecutive ids and return the first.

    Safe because every writer of the ETL's sequences holds the ingest advisory lock.
    """
    if count == 0:
        return 0
    name = Tables(schemas).sequence(sequence).as_string(conn)
    last = conn.execute(
        "SELECT setval(%s::regclass, nextval(%s::regclass) + %s - 1)", [name, name, count]
    ).fetchone()[0]
    return last - count + 1


def _copy(conn: psycopg.Connection, table: sql.Composable, columns: tuple[str, ...], rows) -> int:
    written = 0
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
    ) as copy:
        for row in rows:
            copy.write_row(row)
            written += 1
    return written


def _copy_metadata(
    conn: psycopg.Connection,
    table: sql.Composable,
    data_elements: DataElementIds,
    rendered: list[RenderedMetadata],
    image_occurrence_ids: list[int],
    metadata_id: int,
    dataset_id: int,
    timestamp_text: str,
) -> int:
    """COPY every file's rendered rows; its ids are the next ones of the reserved ranges."""
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, METADATA_COLUMNS))
        )
    ) as copy:
        for file_rows, image_occurrence_id in zip(rendered, image_occurrence_ids, strict=True):
            copy.write(
                fill(
                    file_rows,
                    metadata_id,
                    dataset_id,
                    image_occurrence_id,
                    data_elements,
                    timestamp_text,
                )
            )
            metadata_id += file_rows.row_count
            dataset_id += file_rows.item_count
    return sum(r.row_count for r in rendered)


def write_batch(
    conn: psycopg.Connection, state: RunState, outcomes: list[ParseOutcome]
) -> IngestReport:
    """Record every outcome of the batch; returns what was written."""
    report = IngestReport()
    if not outcomes:
        return report
    mi = state.schemas.medical_imaging
    ledger = sql.Identifier(mi, "dicom_ingest_log")
    metadata = sql.Identifier(mi, "dicom_file_metadata")
    image_occurrence = sql.Identifier(mi, "image_occurrence")
    procedure_occurrence = sql.Identifier(state.schemas.cdm, "procedure_occurrence")
    # etl_created/modified_datetime, as psycopg would send a naive datetime in text format.
    now_text = dt.datetime.now().isoformat(sep=" ")
    processed_at = dt.datetime.now(dt.timezone.utc)

    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"dicom_etl_dagster.ingest:{mi}"]
        )

        # 1. Under the lock, look again at the ledger: another run may have done these files.
        paths = [o.entry.path for o in outcomes]
        previous = {
            row[0]: row
            for row in conn.execute(
                sql.SQL(
                    "SELECT file_path, file_size, file_mtime_ns, status, sop_instance_uid FROM {}"
                    " WHERE file_path = ANY(%s)"
                ).format(ledger),
                [paths],
            )
        }
        todo: list[ParseOutcome] = []
        for outcome in outcomes:
            old = previous.get(outcome.entry.path)
            if (
                old
                and old[3] != FAILED
                and (old[1], old[2]) == (outcome.entry.size, outcome.entry.mtime_ns)
            ):
                report.files_already_done += 1  # another run wrote it while this one was parsing
                continue
            todo.append(outcome)
        if not todo:
            return report

        # 2. Files changed since they were ingested: their old instance's rows go, and paths
        #    that were duplicates of it become 'failed' (keeping their ledger row) so that the
        #    next run, which retries failures, ingests one of them instead.
        replaced_paths = [o.entry.path for o in todo if o.entry.path in previous]
        changed_sops = [
            previous[p][4] for p in replaced_paths if previous[p][3] == INGESTED and previous[p][4]
        ]
        if changed_sops:
            report.rows["dicom_file_metadata_replaced"] += conn.execute(
                sql.SQL("DELETE FROM {} WHERE sop_instance_id = ANY(%s)").format(metadata),
                [changed_sops],
            ).rowcount
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET status = 'failed', image_occurrence_id = NULL, error_message = %s"
                    " WHERE status = 'duplicate' AND sop_instance_uid = ANY(%s)"
                ).format(ledger),
                [
                    "the ingested copy of this SOP instance (another path) changed; the next run ingests this one",
                    changed_sops,
                ],
            )
        if replaced_paths:
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE file_path = ANY(%s)").format(ledger), [replaced_paths]
            )

        ledger_rows: list[tuple] = []
        failure_reasons: dict[str, str] = {}

        def record(
            outcome: ParseOutcome,
            status: str,
            reason: str | None = None,
            sop: str | None = None,
            image_occurrence_id: int | None = None,
        ) -> None:
            ledger_rows.append(
                (
                    outcome.entry.path,
                    outcome.entry.size,
                    outcome.entry.mtime_ns,
                    status,
                    storable_text(reason),
                    sop,
                    image_occurrence_id,
                )
            )
            report.status_counts[status] += 1
            if status == FAILED:
                report.failures.append((outcome.entry.path, reason))
                failure_reasons[outcome.entry.path] = reason

        # 3. Duplicates: SOP instances already ingested from another path, or twice in this batch.
        parsed = [o for o in todo if o.instance is not None]
        for o in todo:
            if o.instance is None:
                record(o, FAILED, o.error)
        existing_sops = dict(
            conn.execute(
                sql.SQL(
                    "SELECT sop_instance_uid, image_occurrence_id FROM {} WHERE status = 'ingested'"
                    " AND sop_instance_uid = ANY(%s)"
                ).format(ledger),
                [[o.instance.sop_instance_uid for o in parsed]],
            ).fetchall()
        )
        fresh: list[ParseOutcome] = []
        first_path_of_sop: dict[str, ParseOutcome] = {}
        in_batch_duplicates: list[ParseOutcome] = []
        for o in parsed:
            sop = o.instance.sop_instance_uid
            if sop in existing_sops:
                record(o, DUPLICATE, sop=sop, image_occurrence_id=existing_sops[sop])
            elif sop in first_path_of_sop:
                in_batch_duplicates.append(o)
            else:
                first_path_of_sop[sop] = o
                fresh.append(o)

        # 4. Persons.
        persons = _persons(
            conn, state, {o.instance.patient_id for o in fresh if o.instance.patient_id}
        )
        ready: list[tuple[ParseOutcome, int]] = []
        for o in fresh:
            person_id, reason = _person_for(state, persons, o.instance.patient_id)
            if reason:
                report.person_misses += 1
                record(o, FAILED, reason, sop=o.instance.sop_instance_uid)
            else:
                ready.append((o, person_id))

        # 5. Studies -> procedure_occurrence, series -> image_occurrence (existing or new).
        instances = [o.instance for o, _ in ready]
        series_ids = dict(
            conn.execute(
                sql.SQL(
                    "SELECT image_series_uid, image_occurrence_id FROM {} WHERE image_series_uid = ANY(%s)"
                ).format(image_occurrence),
                [sorted({i.series_instance_uid for i in instances})],
            ).fetchall()
        )
        new_series: dict[str, tuple[ParseOutcome, int]] = {}
        for o, person_id in ready:
            uid = o.instance.series_instance_uid
            if uid not in series_ids and uid not in new_series:
                new_series[uid] = (o, person_id)

        study_keys = {
            (o.instance.study_instance_uid, person_id) for o, person_id in new_series.values()
        }
        procedure_ids = {
            (study, person): pid
            for study, person, pid in conn.execute(
                sql.SQL(
                    "SELECT image_study_uid, person_id, min(procedure_occurrence_id) FROM {}"
                    " WHERE image_study_uid = ANY(%s) GROUP BY 1, 2"
                ).format(image_occurrence),
                [sorted({s for s, _ in study_keys})],
            )
        }
        new_studies: dict[tuple[str, int], DicomInstance] = {}
        for o, person_id in new_series.values():
            key = (o.instance.study_instance_uid, person_id)
            if key not in procedure_ids and key not in new_studies:
                new_studies[key] = o.instance
        first = _reserve_ids(
            conn, state.schemas, "dicom_etl_procedure_occurrence_id_seq", len(new_studies)
        )
        procedure_rows = []
        for offset, (key, inst) in enumerate(new_studies.items()):
            procedure_ids[key] = first + offset
            procedure_rows.append(
                (
                    first + offset,
                    key[1],
                    0,
                    inst.procedure_date,
                    EHR_TYPE_CONCEPT_ID,
                    storable_text(inst.study_description, PROCEDURE_SOURCE_VALUE_LENGTH),
                )
            )
        report.rows["procedure_occurrence"] += _copy(
            conn, procedure_occurrence, _PROCEDURE_COLUMNS, procedure_rows
        )

        state.concepts.prepare(
            {o.instance.modality for o, _ in new_series.values()},
            {o.instance.body_part_examined for o, _ in new_series.values()},
        )
        first = _reserve_ids(
            conn, state.schemas, "dicom_etl_image_occurrence_id_seq", len(new_series)
        )
        image_rows = []
        for offset, (uid, (o, person_id)) in enumerate(new_series.items()):
            inst = o.instance
            series_ids[uid] = first + offset
            modality_id = state.concepts.modality(inst.modality)
            site_id = state.concepts.anatomic_site(inst.body_part_examined)
            image_rows.append(
                (
                    first + offset,
                    person_id,
                    procedure_ids[(inst.study_instance_uid, person_id)],
                    site_id,
                    _parent_folder(o.entry.path),
                    inst.image_date,
                    inst.study_instance_uid,
                    uid,
                    modality_id,
                )
            )
            report.series_by_modality[
                (inst.modality or "", inst.body_part_examined or "", modality_id, site_id)
            ] += 1
        report.rows["image_occurrence"] += _copy(conn, image_occurrence, _IMAGE_COLUMNS, image_rows)

        # 6. Every element of every instance into the EAV table, as the workers rendered it.
        rendered = [o.metadata for o, _ in ready]
        _ensure_data_elements(conn, state, rendered)
        # Reserved before COPY starts: the connection can run no other statement during COPY.
        first_metadata_id = _reserve_ids(
            conn, state.schemas, "dicom_etl_metadata_id_seq", sum(r.row_count for r in rendered)
        )
        first_dataset_id = _reserve_ids(
            conn, state.schemas, "dicom_etl_dataset_id_seq", sum(r.item_count for r in rendered)
        )
        report.rows["dicom_file_metadata"] += _copy_metadata(
            conn,
            metadata,
            state.data_elements,
            rendered,
            [series_ids[i.series_instance_uid] for i in instances],
            first_metadata_id,
            first_dataset_id,
            now_text,
        )
        for o, _ in ready:
            record(
                o,
                INGESTED,
                sop=o.instance.sop_instance_uid,
                image_occurrence_id=series_ids[o.instance.series_instance_uid],
            )
        for o in in_batch_duplicates:
            first_holder = first_path_of_sop[o.instance.sop_instance_uid]
            holder_series = series_ids.get(first_holder.instance.series_instance_uid)
            if (
                holder_series is None
            ):  # the first copy failed (no person): this copy fails the same way
                record(
                    o,
                    FAILED,
                    failure_reasons[first_holder.entry.path],
                    sop=o.instance.sop_instance_uid,
                )
            else:
                record(
                    o, DUPLICATE, sop=o.instance.sop_instance_uid, image_occurrence_id=holder_series
                )

        # 7. The ledger, in the same transaction.
        first = _reserve_ids(conn, state.schemas, "dicom_etl_ingest_log_id_seq", len(ledger_rows))
        report.rows["dicom_ingest_log"] += _copy(
            conn,
            ledger,
            _LEDGER_COLUMNS,
            (
                (first + i, *row[:7], state.run_id, processed_at)
                for i, row in enumerate(ledger_rows)
            ),
        )
    return report


def _parent_folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def _persons(
    conn: psycopg.Connection, state: RunState, patient_ids: set[str]
) -> dict[str, tuple[str, int]]:
    """upper(patient id) -> (person id as text, number of distinct persons), one query per batch."""
    if state.mapping is None or not patient_ids:
        return {}
    m = state.mapping
    query = sql.SQL(
        "SELECT upper(CAST({patient} AS text)), CAST(min({person}) AS text), count(DISTINCT {person})"
        " FROM {table} WHERE upper(CAST({patient} AS text)) = ANY(%s) GROUP BY 1"
    ).format(
        patient=sql.Identifier(m.patient_column),
        person=sql.Identifier(m.person_column),
        table=sql.Identifier(m.schema, m.table),
    )
    return {
        key: (person, n)
        for key, person, n in conn.execute(query, [sorted({p.upper() for p in patient_ids})])
    }


def _person_for(
    state: RunState, persons: dict[str, tuple[str, int]], patient_id: str | None
) -> tuple[int, str | None]:
    """(person_id, None) or (0, failure reason). Lookup is case-insensitive, like the original."""
    if patient_id and patient_id.upper() in persons:
        person, n = persons[patient_id.upper()]
        if n > 1:
            return (
                0,
                f"patient {patient_reference(patient_id)} maps to {n} different persons in the mapping table",
            )
        try:
            return int(person), None
        except ValueError:
            return (
                0,
                f"patient {patient_reference(patient_id)} maps to a person id that is not an integer",
            )
    if state.missing_person_policy == "use_id_zero":
        return 0, None
    if state.mapping is None:
        return 0, "no person: the mapping table does not exist (missing_person_id_options: skip)"
    m = state.mapping
    who = f"patient {patient_reference(patient_id)}" if patient_id else "the file has no PatientID"
    return 0, f"no person for {who} in {m.schema}.{m.table} (missing_person_id_options: skip)"


def _ensure_data_elements(
    conn: psycopg.Connection, state: RunState, rendered: list[RenderedMetadata]
) -> None:
    """Add tags the dictionary lacks (private, unknown) once, and learn their ids."""
    missing: dict[str, tuple] = {}
    # Files with the same tags usually share one candidates object (see metadata_copy): look at it once.
    distinct = {
        id(r.new_tag_candidates): r.new_tag_candidates for r in rendered
    }.values()  # first seen first
    for candidates in distinct:
        for candidate in candidates:  # (tag, name, keyword, vr, is_private), cut to width
            tag = candidate[0]
            if tag not in state.data_elements and tag not in missing:
                missing[tag] = candidate
    if not missing:
        return
    table = sql.Identifier(state.schemas.medical_imaging, "dicom_data_element")
    tags, names, keywords, vrs, private = (list(col) for col in zip(*missing.values()))
    conn.execute(
        sql.SQL(
            "INSERT INTO {table} (data_element_id, data_element_tag, data_element_name, data_element_keyword,"
            " value_representation, is_private, is_retired, etl_created_datetime, etl_modified_datetime)"
            " SELECT nextval({seq}::regclass), n.tag, n.name, n.keyword, n.vr, n.private, false, now(), now()"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bool[]) AS n(tag, name, keyword, vr, private)"
            " WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.data_element_tag = n.tag)"
            " ON CONFLICT DO NOTHING"
        ).format(
            table=table,
            seq=sql.Literal(
                Tables(state.schemas).sequence("dicom_etl_data_element_id_seq").as_string(conn)
            ),
        ),
        [tags, names, keywords, vrs, private],
    )
    state.data_elements.update(
        conn.execute(
            sql.SQL(
                "SELECT data_element_tag, data_element_id FROM {} WHERE data_element_tag = ANY(%s)"
            ).format(table),
            [tags],
        ).fetchall()
    )
