"""Every decision about one batch of files, as a pure function: parse results + rows -> plan.

Why a plan: what a file becomes in OMOP (already done, changed, failed, a duplicate, which
person, a new or an existing study and series) is the ETL's core logic and it has many
cases. Made over plain, typed inputs, with no database and no I/O, every case is a fast
test that states the exact plan; the writer (``writer.write_batch``) only looks the rows
up under the ingest lock, reserves ids and COPYs what the plan lists.

Ids are not known here: the plan lists the new studies, series and ledger rows in order,
and refers to a new row by its position (``NewId``), to a row that exists by its id
(``ExistingId``). The writer reserves one range of ids per table and fills them in.

The inputs are the database's rows for the batch (``DatabaseRows``), looked up for every
file of the batch that is not already done: persons, series and studies of files that turn
out to be duplicates or to have no person are looked up too, which costs nothing that
matters and lets one query per kind serve the whole batch before any decision is made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

from dicom_etl_dagster.core.analytics.findings import AcquisitionValue
from dicom_etl_dagster.core.dicom.reader import DicomInstance
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import storable_text
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Opened, Parsed, ParseResult
from dicom_etl_dagster.core.ingest.status import LedgerStatus, MissingPersonPolicy

EHR_TYPE_CONCEPT_ID = 32817  # procedure_type_concept_id of every procedure_occurrence row
PROCEDURE_SOURCE_VALUE_LENGTH = 50  # procedure_source_value is varchar(50): longer text is cut
#: error_message of the duplicates of an ingested instance whose file changed: they become
#: 'failed' (keeping their ledger row) so that the next run, which retries failures, ingests one.
CHANGED_COPY_REASON = (
    "the ingested copy of this SOP instance (another path) changed; the next run ingests this one"
)


# --------------------------------------------------------------------------
# Inputs: the database's rows for the batch (psycopg builds them with class_row)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerRow:
    """dicom_ingest_log's row for a path of the batch."""

    file_path: str
    file_size: int | None
    file_mtime_ns: int | None
    status: LedgerStatus
    sop_instance_uid: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", LedgerStatus(self.status))  # text from the database


@dataclass(frozen=True)
class IngestedSop:
    """The ledger's 'ingested' row of a SOP instance the batch holds (at most one per SOP)."""

    sop_instance_uid: str
    file_path: str
    image_occurrence_id: int | None


@dataclass(frozen=True)
class PersonMatch:
    """The mapping table's persons for one patient id, compared case-insensitively."""

    patient_key: str  # upper(patient id)
    person_id: str  # min(person id) as text: the column may hold anything
    persons: int  # distinct person ids for the patient


@dataclass(frozen=True)
class ExistingSeries:
    image_series_uid: str
    image_occurrence_id: int


@dataclass(frozen=True)
class ExistingStudy:
    """A study already in image_occurrence for a person, and its procedure_occurrence_id."""

    image_study_uid: str
    person_id: int
    procedure_occurrence_id: int


@dataclass(frozen=True)
class DatabaseRows:
    """What the database holds for the files of a batch (the writer's decisions use its look-up
    under the lock)."""

    ledger: Sequence[LedgerRow] = ()
    ingested: Sequence[IngestedSop] = ()
    persons: Sequence[PersonMatch] = ()
    series: Sequence[ExistingSeries] = ()
    studies: Sequence[ExistingStudy] = ()


@dataclass(frozen=True)
class PersonPolicy:
    """How a patient becomes a person in this run."""

    missing: MissingPersonPolicy
    mapping_table: str | None  # "schema.table" for reasons; None: the mapping table does not exist


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ExistingId:
    """A row that is in the database already."""

    value: int


@dataclass(frozen=True)
class NewId:
    """The ``index``-th new row of its kind in the plan; its id is reserved by the writer."""

    index: int


IdRef: TypeAlias = ExistingId | NewId


def resolve(ref: IdRef, first_new_id: int) -> int:
    """The id ``ref`` stands for, once the new rows' ids start at ``first_new_id``."""
    return ref.value if isinstance(ref, ExistingId) else first_new_id + ref.index


@dataclass(frozen=True)
class NewStudy:
    """A procedure_occurrence row: one per StudyInstanceUID and person."""

    study_uid: str
    person_id: int
    procedure_date: dt.date
    source_value: str | None  # StudyDescription, storable and cut to the column's width
    procedure_datetime: dt.datetime | None = None


@dataclass(frozen=True)
class NewSeries:
    """An image_occurrence row: one per SeriesInstanceUID, described by its first file."""

    series_uid: str
    study_uid: str
    person_id: int
    procedure: IdRef  # its study's procedure_occurrence
    local_path: str  # the series folder
    image_date: dt.date
    modality: str | None  # the writer maps these two to concepts
    body_part: str | None
    image_datetime: dt.datetime | None = None
    study_date: dt.date | None = None  # the study's date: its visit is the series' visit
    acquisition: tuple[AcquisitionValue, ...] = ()  # the first instance's profile attributes


@dataclass(frozen=True)
class InstanceWrite:
    """An instance whose metadata rows are written, into the series ``image_occurrence``."""

    parsed: Parsed
    image_occurrence: IdRef
    person_id: int = 0
    procedure: IdRef | None = None  # its study's procedure_occurrence (None: not known)


@dataclass(frozen=True)
class LedgerEntry:
    """A dicom_ingest_log row to write (its id and the run's columns come from the writer)."""

    entry: FileEntry
    status: LedgerStatus
    reason: str | None = None  # set exactly when status is failed
    sop_instance_uid: str | None = None
    image_occurrence: IdRef | None = None
    # Tags of the file's odd values (elements that violate their VR); None: the file was not read.
    odd_value_tags: tuple[str, ...] | None = None
    archive: bool = False  # the row of an archive read to its end (``archives.py``)


@dataclass(frozen=True)
class BatchPlan:
    """What the writer does for a batch, in this order, in one transaction."""

    already_done: int = 0  # files another run wrote while this one parsed them
    replaced_paths: tuple[str, ...] = ()  # their ledger rows go: the files are recorded again
    changed_sops: tuple[str, ...] = ()  # metadata goes, 'duplicate' rows fail (CHANGED_COPY_REASON)
    new_studies: tuple[NewStudy, ...] = ()
    new_series: tuple[NewSeries, ...] = ()
    instances: tuple[InstanceWrite, ...] = ()  # metadata rows, in this order
    ledger: tuple[LedgerEntry, ...] = ()  # one per file not already done, in batch order
    person_misses: int = 0  # files that failed because no person matched their patient


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------
def is_done(row: LedgerRow | None, entry: FileEntry) -> bool:
    """The ledger holds the file as ingested or duplicate, with the same size and mtime.

    The one rule for "nothing to do": the scan's pre-check and the writer's re-check under
    the lock both use it. A failed file is always tried again; a changed one is recorded again.
    """
    return (
        row is not None
        and row.status != LedgerStatus.FAILED
        and row.file_size == entry.size
        and row.file_mtime_ns == entry.mtime_ns
    )


def pending(results: Iterable[ParseResult], ledger: Iterable[LedgerRow]) -> list[ParseResult]:
    """The results whose files are not done (``is_done``), in batch order."""
    rows = {row.file_path: row for row in ledger}
    return [r for r in results if not is_done(rows.get(r.entry.path), r.entry)]


def patient_reference(patient_id: str) -> str:
    """A stable, non-identifying reference to a patient id for logs and ledger reasons."""
    return "sha256:" + hashlib.sha256(patient_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class NoPerson:
    """The file's patient has no usable person; ``reason`` goes into the ledger."""

    reason: str


def person_for(
    policy: PersonPolicy, persons: Mapping[str, PersonMatch], patient_id: str | None
) -> int | NoPerson:
    """The person of ``patient_id`` (looked up case-insensitively, like the original plugin)."""
    if patient_id and (match := persons.get(patient_id.upper())) is not None:
        # Every reason starts "no person: " (the materialization groups reasons by the clause
        # before ": "; the reference itself holds a colon, "sha256:...").
        who = f"no person: patient {patient_reference(patient_id)}"
        if match.persons > 1:
            return NoPerson(f"{who} maps to {match.persons} different persons in the mapping table")
        try:
            return int(match.person_id)
        except ValueError:
            return NoPerson(f"{who} maps to a person id that is not an integer")
    if policy.missing == MissingPersonPolicy.USE_ID_ZERO:
        return 0
    if policy.mapping_table is None:
        return NoPerson(
            "no person: the mapping table does not exist (missing_person_id_options: skip)"
        )
    if not patient_id:
        return NoPerson("no person: the file has no PatientID (missing_person_id_options: skip)")
    return NoPerson(
        f"no person: patient {patient_reference(patient_id)} is not in {policy.mapping_table}"
        " (missing_person_id_options: skip)"
    )


def parent_folder(path: str) -> str:
    folder = path.rsplit("/", 1)[0] if "/" in path else path
    # An instance read over DICOMweb (<root>/studies/<s>/series/<se>/instances/<sop>): its
    # "folder" is its series' URL, not the .../instances collection.
    return folder.removesuffix("/instances") if "://" in path else folder


# --------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------
def plan_batch(
    results: Sequence[ParseResult], rows: DatabaseRows, policy: PersonPolicy
) -> BatchPlan:
    """Decide what every file of the batch becomes, in batch order (see the module docstring)."""
    ledger = {row.file_path: row for row in rows.ledger}
    todo = pending(results, rows.ledger)
    replaced = tuple(r.entry.path for r in todo if r.entry.path in ledger)
    changed = tuple(
        sop
        for path in replaced
        if ledger[path].status == LedgerStatus.INGESTED
        and (sop := ledger[path].sop_instance_uid) is not None
    )
    planner = _Planner(rows, policy, set(replaced), _profiles(todo))
    for result in todo:
        planner.add(result)
    return BatchPlan(
        already_done=len(results) - len(todo),
        replaced_paths=replaced,
        changed_sops=changed,
        new_studies=tuple(planner.new_studies),
        new_series=tuple(planner.new_series),
        instances=tuple(planner.instances),
        ledger=tuple(planner.ledger),
        person_misses=planner.person_misses,
    )


def _profiles(results: Iterable[ParseResult]) -> dict[str, tuple[AcquisitionValue, ...]]:
    """Each series' acquisition profile from the first file of the batch that carries one
    (the workers extract it once per series and chunk: see ``parse_pool.parse_chunk``)."""
    profiles: dict[str, tuple[AcquisitionValue, ...]] = {}
    for r in results:
        if isinstance(r, Parsed) and r.findings.acquisition:
            profiles.setdefault(r.instance.series_instance_uid, r.findings.acquisition)
    return profiles


class _Planner:
    """One pass over the pending files in batch order; what earlier files decided is kept."""

    def __init__(
        self,
        rows: DatabaseRows,
        policy: PersonPolicy,
        replaced: set[str],
        profiles: dict[str, tuple[AcquisitionValue, ...]],
    ) -> None:
        self.policy = policy
        self.profiles = profiles
        # Paths recorded again: their old 'ingested' rows go, so they hold no SOP any more.
        self.ingested = {
            r.sop_instance_uid: r for r in rows.ingested if r.file_path not in replaced
        }
        self.persons = {p.patient_key: p for p in rows.persons}
        self.series: dict[str, IdRef] = {
            s.image_series_uid: ExistingId(s.image_occurrence_id) for s in rows.series
        }
        self.studies: dict[tuple[str, int], IdRef] = {
            (s.image_study_uid, s.person_id): ExistingId(s.procedure_occurrence_id)
            for s in rows.studies
        }
        self.first_copies: dict[str, LedgerEntry] = {}  # SOP -> the batch's first file of it
        self.new_studies: list[NewStudy] = []
        self.new_series: list[NewSeries] = []
        self.instances: list[InstanceWrite] = []
        self.ledger: list[LedgerEntry] = []
        self.person_misses = 0

    def add(self, result: ParseResult) -> None:
        if isinstance(result, Failed):
            self.ledger.append(LedgerEntry(result.entry, LedgerStatus.FAILED, result.reason))
        elif isinstance(result, Opened):  # its members are rows of their own
            self.ledger.append(LedgerEntry(result.entry, LedgerStatus.INGESTED, archive=True))
        else:
            entry = self._parsed(result)
            self.ledger.append(replace(entry, odd_value_tags=result.instance.odd_value_tags))

    def _parsed(self, parsed: Parsed) -> LedgerEntry:
        entry, sop = parsed.entry, parsed.instance.sop_instance_uid
        ingested = self.ingested.get(sop)
        if ingested is not None:  # ingested from another path by an earlier batch
            io_id = ingested.image_occurrence_id
            ref = None if io_id is None else ExistingId(io_id)
            return LedgerEntry(entry, LedgerStatus.DUPLICATE, None, sop, ref)
        first = self.first_copies.get(sop)
        if first is None:
            first = self.first_copies[sop] = self._first_copy(parsed)
            return first
        if first.status == LedgerStatus.FAILED:  # no person for the first copy: nor for this one
            return LedgerEntry(entry, LedgerStatus.FAILED, first.reason, sop)
        return LedgerEntry(entry, LedgerStatus.DUPLICATE, None, sop, first.image_occurrence)

    def _first_copy(self, parsed: Parsed) -> LedgerEntry:
        instance, sop = parsed.instance, parsed.instance.sop_instance_uid
        person = person_for(self.policy, self.persons, instance.patient_id)
        if isinstance(person, NoPerson):
            self.person_misses += 1
            return LedgerEntry(parsed.entry, LedgerStatus.FAILED, person.reason, sop)
        series = self._series_of(parsed, person)
        procedure = self.studies.get((instance.study_instance_uid, person))
        self.instances.append(InstanceWrite(parsed, series, person, procedure))
        return LedgerEntry(parsed.entry, LedgerStatus.INGESTED, None, sop, series)

    def _series_of(self, parsed: Parsed, person_id: int) -> IdRef:
        """The file's series; a new one is described by its first file (and its person)."""
        instance = parsed.instance
        ref = self.series.get(instance.series_instance_uid)
        if ref is None:
            ref = self.series[instance.series_instance_uid] = NewId(len(self.new_series))
            self.new_series.append(
                NewSeries(
                    series_uid=instance.series_instance_uid,
                    study_uid=instance.study_instance_uid,
                    person_id=person_id,
                    procedure=self._study_of(instance, person_id),
                    local_path=parent_folder(parsed.entry.path),
                    image_date=instance.image_date,
                    modality=instance.modality,
                    body_part=instance.body_part_examined,
                    image_datetime=instance.image_datetime,
                    study_date=instance.procedure_date,
                    # Its own profile; the batch's earlier read of the series when the workers
                    # gave it there (that file was a duplicate, or had no person).
                    acquisition=parsed.findings.acquisition
                    or self.profiles.get(instance.series_instance_uid, ()),
                )
            )
        return ref

    def _study_of(self, instance: DicomInstance, person_id: int) -> IdRef:
        key = (instance.study_instance_uid, person_id)
        ref = self.studies.get(key)
        if ref is None:
            ref = self.studies[key] = NewId(len(self.new_studies))
            self.new_studies.append(
                NewStudy(
                    study_uid=instance.study_instance_uid,
                    person_id=person_id,
                    procedure_date=instance.procedure_date,
                    source_value=storable_text(
                        instance.study_description, PROCEDURE_SOURCE_VALUE_LENGTH
                    ),
                    procedure_datetime=instance.procedure_datetime,
                )
            )
        return ref
