"""Ingest a folder: scan, skip what the ledger says is done, parse in workers, write batches.

The scan looks the ledger up before parsing so that a re-run of a large folder costs a
directory walk and one query per batch, not a parse of every file; the writer looks again
under its lock (another run may have written a file meanwhile), with the same rule
(``plan.is_done``).

Archives (``archives.py``) are looked up like files: one unchanged since it was read to its
end is not opened; otherwise its members take the place of the archive in the stream of work,
each looked up again (a changed archive may still hold members recorded before).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg

from dicom_etl_dagster.core.analytics.concepts import MeasurementConcepts
from dicom_etl_dagster.core.analytics.write import AnalyticsOptions
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import Tables, column_names, table_exists
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.ingest.archives import is_archive, iter_members, split_member_path
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.data_elements import (
    entries_arbitrated,
    has_private_creators,
    known_entries,
)
from dicom_etl_dagster.core.ingest.file_scan import FileEntry, count_files, iter_files
from dicom_etl_dagster.core.ingest.lookups import PersonMapping, ledger_rows
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Member, WorkItem, parse_batches
from dicom_etl_dagster.core.ingest.plan import is_done
from dicom_etl_dagster.core.ingest.status import MissingPersonPolicy, PhiPolicy
from dicom_etl_dagster.core.ingest.visits import has_visits
from dicom_etl_dagster.core.ingest.writer import (
    IngestReport,
    RunState,
    metadata_columns,
    write_batch,
)
from dicom_etl_dagster.core.progress import ProgressReporter


class IngestSetupError(DicomEtlError):
    """The run cannot start (mapping table unusable, folder missing); the message says why."""


def missing_person_policy(value: str) -> MissingPersonPolicy:
    """``missing_person_id_options`` in any case; IngestSetupError if it names no policy."""
    try:
        return MissingPersonPolicy.parse(value)
    except ValueError:
        choices = ", ".join(MissingPersonPolicy)
        raise IngestSetupError(
            f"missing_person_id_options must be one of {choices} (any case), not {value!r}"
        ) from None


def resolve_mapping(
    conn: psycopg.Connection,
    mapping: PersonMapping,
    policy: MissingPersonPolicy,
    warn: Callable[[str], None],
) -> PersonMapping | None:
    """The mapping table if usable; None (everyone -> person 0) only under use_id_zero."""
    where = f"{mapping.schema}.{mapping.table}"
    if not table_exists(conn, mapping.schema, mapping.table):
        if policy == MissingPersonPolicy.SKIP:
            raise IngestSetupError(
                f"person_to_patient_mapping table {where} does not exist "
                "(missing_person_id_options: skip needs it)"
            )
        warn(f"person_to_patient_mapping table {where} does not exist: every file gets person_id 0")
        return None
    columns = column_names(conn, mapping.schema, mapping.table)
    missing = [c for c in (mapping.person_column, mapping.patient_column) if c not in columns]
    if missing:
        raise IngestSetupError(
            f"person_to_patient_mapping table {where} has no column {', '.join(missing)}"
        )
    return mapping


def prepare_run(
    conn: psycopg.Connection,
    schemas: Schemas,
    run_id: str,
    policy: str | MissingPersonPolicy,
    mapping: PersonMapping,
    warn: Callable[[str], None],
    analytics: AnalyticsOptions | None = None,
) -> RunState:
    """What every batch of the run needs; ``policy`` is ``missing_person_id_options``."""
    person_policy = missing_person_policy(policy)
    private_creators = has_private_creators(conn, Tables(schemas))
    data_elements = known_entries(conn, Tables(schemas), private_creators)
    if not data_elements:
        warn(
            "dicom_data_element is empty: run load_vocab first so that tags get their dictionary entries"
        )
    return RunState(
        schemas=schemas,
        run_id=run_id,
        missing_person_policy=person_policy,
        mapping=resolve_mapping(conn, mapping, person_policy, warn),
        concepts=ConceptResolver(conn, schemas),
        data_elements=data_elements,
        measurement_concepts=MeasurementConcepts(conn, Tables(schemas)),
        analytics=analytics or AnalyticsOptions(),
        has_visits=has_visits(conn, Tables(schemas)),
        private_creators=private_creators,
        entries_arbitrated=entries_arbitrated(conn, Tables(schemas), private_creators),
        metadata_columns=metadata_columns(conn, Tables(schemas)),
    )


def _unchanged_paths(
    conn: psycopg.Connection, schemas: Schemas, batch: list[FileEntry]
) -> set[str]:
    """Paths with nothing to do (``plan.is_done``): not parsed, not written."""
    rows = {
        row.file_path: row for row in ledger_rows(conn, Tables(schemas), [e.path for e in batch])
    }
    return {e.path for e in batch if is_done(rows.get(e.path), e)}


#: Archive member bytes one batch holds at most. Two batches are in flight (``parse_pool``),
#: so this bounds what archives add to the run's memory whatever ``ingest_batch_size`` is.
MAX_BATCH_MEMBER_BYTES = 512 * 1024**2

T = TypeVar("T")


def _batches(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """``batch_size`` items at a time, cut early once the members among them hold
    ``MAX_BATCH_MEMBER_BYTES``."""
    batch: list[T] = []
    held = 0
    for item in items:
        batch.append(item)
        held += len(item.data) if isinstance(item, Member) else 0
        if len(batch) >= batch_size or held >= MAX_BATCH_MEMBER_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _is_member(item: WorkItem) -> bool:
    return isinstance(item, Member) or (
        isinstance(item, Failed) and split_member_path(item.entry.path) is not None
    )


class _Scan:
    """The work of a run in order: the files under the folder the ledger does not hold as
    done, with each such archive replaced by its members that are not done either."""

    def __init__(
        self,
        conn: psycopg.Connection,
        schemas: Schemas,
        batch_size: int,
        report: IngestReport,
        seconds: defaultdict[str, float],
    ) -> None:
        self.conn, self.schemas, self.batch_size = conn, schemas, batch_size
        self.report, self.seconds = report, seconds
        # Folder entries handed on so far, an archive counting once as in ``count_files``:
        # the progress figure, ahead of the written batches by the two parse_pool holds.
        self.entries_passed = 0

    def _done(self, entries: list[FileEntry]) -> set[str]:
        started = time.perf_counter()
        done = _unchanged_paths(self.conn, self.schemas, entries) if entries else set()
        self.report.files_seen += len(entries)
        self.seconds["scan and ledger lookup"] += time.perf_counter() - started
        return done

    def items(self, files: Iterable[FileEntry]) -> Iterator[WorkItem]:
        batches = _batches(files, self.batch_size)
        while True:
            started = time.perf_counter()  # the folder walk, lazily, a batch at a time
            batch = next(batches, None)
            self.seconds["scan and ledger lookup"] += time.perf_counter() - started
            if batch is None:
                return
            done = self._done(batch)
            for entry in batch:
                self.entries_passed += 1
                if entry.path in done and is_archive(entry.path):
                    self.report.archives_skipped += 1  # unchanged: not opened again
                elif entry.path in done:
                    self.report.files_already_done += 1
                elif is_archive(entry.path):
                    yield from self._members(entry)
                else:
                    yield entry

    def _members(self, archive: FileEntry) -> Iterator[WorkItem]:
        """The archive's members not done (an archive changed or failed before may hold
        members recorded already), then what ends the archive (``Opened`` or ``Failed``)."""
        for chunk in _batches(iter_members(archive), self.batch_size):
            done = self._done([item.entry for item in chunk if _is_member(item)])
            self.report.files_already_done += len(done)
            yield from (item for item in chunk if item.entry.path not in done)


def ingest_folder(
    conn: psycopg.Connection,
    state: RunState,
    root: Path,
    batch_size: int,
    workers: int,
    progress: Callable[[IngestReport], None] | None = None,
    changed_window: tuple[int | None, int | None] = (None, None),
    phi_policy: PhiPolicy = PhiPolicy.KEEP,
    log_progress: Callable[[str], None] | None = None,
) -> tuple[IngestReport, dict[str, float]]:
    """Ingest every regular file under ``root``; returns the report and seconds per stage.

    ``changed_window`` (after, until], in ns of inode change time, restricts the run to the
    files a sensor batch stands for; None ends are open. ``phi_policy`` decides which rows of
    each file the EAV table gets (``core/dicom/phi.py``). ``log_progress`` gets a progress
    line (``core.progress``) after a batch when the interval has passed.
    """
    if not root.is_dir():
        raise IngestSetupError(f"dicom_files_abs_path {root} is not a folder")
    report = IngestReport()
    seconds: defaultdict[str, float] = defaultdict(float)

    after, until = changed_window

    def in_window(e: FileEntry) -> bool:
        return (after is None or e.ctime_ns > after) and (until is None or e.ctime_ns <= until)

    files = filter(in_window, iter_files(root))
    scan = _Scan(conn, state.schemas, batch_size, report, seconds)
    reporter = None
    if log_progress is not None:
        # A walk without stat; a sensor's window needs the change times, so it stats.
        windowed = after is not None or until is not None
        total = sum(1 for _ in filter(in_window, iter_files(root))) if windowed else None
        reporter = ProgressReporter(
            "ingest", count_files(root) if total is None else total, log_progress
        )

    outcomes_per_batch = parse_batches(
        _batches(scan.items(files), batch_size),
        workers,
        state.analytics.enabled,
        phi_policy,
        known_entries=dict(state.data_elements),  # a copy: the run's entries at its start
    )
    while True:
        started = time.perf_counter()
        outcomes = next(outcomes_per_batch, None)
        seconds["parse (waiting on workers)"] += time.perf_counter() - started
        if outcomes is None:
            break
        started = time.perf_counter()
        report.merge(write_batch(conn, state, outcomes))
        seconds["database write"] += time.perf_counter() - started
        if progress:
            progress(report)
        if reporter:
            reporter.update(scan.entries_passed)
    # Scanning happens inside the wait for parsed batches; count it once.
    seconds["parse (waiting on workers)"] = max(
        0.0, seconds["parse (waiting on workers)"] - seconds["scan and ledger lookup"]
    )
    return report, seconds
