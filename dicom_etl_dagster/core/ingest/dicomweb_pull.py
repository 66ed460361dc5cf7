"""Ingest what a DICOMweb server holds: list, skip what the ledger has, fetch, write batches.

The same guarantees as a folder because the same writer does the work: every instance is
a ``FileEntry`` whose path is its WADO-RS URL (``<root>/studies/<s>/series/<se>/instances/
<sop>``), read from the series' DICOM JSON instead of a file, and ``writer.write_batch``
records it with its ledger row, whole batches per transaction. Size and mtime, which tell
a changed file, are 0: a server's instance is immutable by its UID.

Incremental by construction: before any WADO-RS request, a series' instances are listed
(QIDO-RS, a small answer) and looked up in the ledger (``plan.is_done``); a series with
nothing left to do is never fetched, one with new instances is fetched once and only those
are written.

Fetching runs in a few threads (``max_concurrent_requests``), a bounded window ahead of
the writer, so memory holds at most that many series' JSON beside the batch being written;
DICOM JSON -> rows happens in the main thread (a few ms per instance: the network is
what a pull waits on).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.dicom.json_instance import instance_from_json
from dicom_etl_dagster.core.dicom.reader import DicomReadError
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.lookups import ledger_rows
from dicom_etl_dagster.core.ingest.parse_pool import Failed, ParseResult, parsed_instance
from dicom_etl_dagster.core.ingest.plan import is_done
from dicom_etl_dagster.core.ingest.status import PhiPolicy
from dicom_etl_dagster.core.ingest.writer import IngestReport, RunState, write_batch
from dicom_etl_dagster.core.sources.dicomweb import DicomWebSource, first_value

_SOP_UID = "00080018"


@dataclass(frozen=True)
class SeriesRef:
    study: str
    series: str

    @classmethod
    def parse(cls, text: str) -> SeriesRef:
        """``<StudyInstanceUID>/<SeriesInstanceUID>``, the options' spelling of a series."""
        study, _, series = text.strip().partition("/")
        if not study or not series or "/" in series:
            raise ValueError(text)
        return cls(study, series)

    def __str__(self) -> str:
        return f"{self.study}/{self.series}"


@dataclass(frozen=True)
class PullScope:
    """What to read: every study (in the StudyDate range, QIDO syntax), or only ``series``."""

    study_date: str | None = None
    series: tuple[SeriesRef, ...] | None = None  # a sensor's batch


@dataclass
class _Pending:
    ref: SeriesRef
    todo: set[str]  # instance URLs the ledger does not hold as done


def _listed_series(source: DicomWebSource, scope: PullScope) -> Iterator[SeriesRef]:
    if scope.series is not None:
        yield from scope.series
        return
    for study in source.studies(scope.study_date):
        for series in source.series(study):
            yield SeriesRef(study, series)


def pending_series(
    conn: psycopg.Connection,
    state: RunState,
    source: DicomWebSource,
    scope: PullScope,
    report: IngestReport,
) -> Iterator[_Pending]:
    """Series with instances still to ingest, each with those instances' URLs (QIDO + ledger)."""
    for ref in _listed_series(source, scope):
        urls = [
            source.instance_url(ref.study, ref.series, sop)
            for sop in source.instances(ref.study, ref.series)
        ]
        rows = {row.file_path: row for row in ledger_rows(conn, Tables(state.schemas), urls)}
        todo = {url for url in urls if not is_done(rows.get(url), FileEntry(url, 0, 0))}
        report.files_seen += len(urls)
        report.files_already_done += len(urls) - len(todo)
        if todo:
            yield _Pending(ref, todo)


def _fetch(source: DicomWebSource, pending: _Pending) -> list[tuple[FileEntry, dict[str, Any]]]:
    """The series' DICOM JSON, one (entry, dataset) per instance still to do (runs in a thread)."""
    found = []
    for dataset in source.series_metadata(pending.ref.study, pending.ref.series):
        sop = first_value(dataset, _SOP_UID)
        url = source.instance_url(pending.ref.study, pending.ref.series, str(sop)) if sop else None
        if url in pending.todo:
            found.append((FileEntry(url, 0, 0), dataset))
    return found


def fetched(
    source: DicomWebSource, series: Iterable[_Pending], concurrency: int
) -> Iterator[list[tuple[FileEntry, dict[str, Any]]]]:
    """Each pending series' instances, in order, with up to ``concurrency`` requests in flight.

    The window is bounded (twice the threads), so listing and fetching never run ahead of
    the writer by more than a few series. An error of a fetch (the server went away) is
    raised here, in order, after the series before it were handed on.
    """
    workers = max(1, concurrency)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicomweb") as pool:
        window: deque[Future] = deque()
        try:
            for pending in series:
                window.append(pool.submit(_fetch, source, pending))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def converted(
    pairs: Sequence[tuple[FileEntry, dict[str, Any]]],
    measurements: bool,
    phi_policy: PhiPolicy,
) -> list[ParseResult]:
    """A batch's DICOM JSON as parse results, the acquisition profile once per series and
    batch (``parse_pool.parse_chunk``'s rule: the batch's first instance of a series has it)."""
    profiled: set[str] = set()
    results: list[ParseResult] = []
    for entry, dataset in pairs:
        try:
            instance = instance_from_json(dataset)
        except DicomReadError as exc:
            results.append(Failed(entry, str(exc)))
            continue
        results.append(parsed_instance(entry, instance, measurements, profiled, phi_policy))
    return results


def ingest_dicomweb(
    conn: psycopg.Connection,
    state: RunState,
    source: DicomWebSource,
    scope: PullScope,
    batch_size: int,
    concurrency: int,
    phi_policy: PhiPolicy = PhiPolicy.KEEP,
    log_progress: Callable[[str], None] | None = None,
) -> tuple[IngestReport, dict[str, float]]:
    """Ingest every instance of the source (within ``scope``) not yet in the ledger; returns the
    report and seconds per stage, as ``run.ingest_folder``."""
    report = IngestReport()
    seconds: defaultdict[str, float] = defaultdict(float)
    todo: list[tuple[FileEntry, dict[str, Any]]] = []

    def write(pairs: list[tuple[FileEntry, dict[str, Any]]]) -> None:
        started = time.perf_counter()
        results = converted(pairs, state.analytics.enabled, phi_policy)
        seconds["DICOM JSON to rows"] += time.perf_counter() - started
        started = time.perf_counter()
        report.merge(write_batch(conn, state, results))
        seconds["database write"] += time.perf_counter() - started
        if log_progress:
            done = sum(report.status_counts.values())
            log_progress(
                f"ingest from DICOMweb: {done} instances written, {report.files_already_done} already done"
            )

    series = pending_series(conn, state, source, scope, report)
    started = time.perf_counter()
    for pairs in fetched(source, series, concurrency):
        seconds["QIDO-RS and WADO-RS (waiting on the server)"] += time.perf_counter() - started
        todo.extend(pairs)
        while len(todo) >= batch_size:
            write(todo[:batch_size])
            del todo[:batch_size]
        started = time.perf_counter()
    seconds["QIDO-RS and WADO-RS (waiting on the server)"] += time.perf_counter() - started
    if todo:
        write(todo)
    return report, dict(seconds)
