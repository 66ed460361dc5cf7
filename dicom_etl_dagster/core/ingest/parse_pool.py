"""Parse DICOM files in worker processes, a batch ahead of the writer.

The main process writes batch N while the workers parse batch N+1; at most two batches of
parsed rows exist at once, so memory stays bounded whatever the folder size.

A worker also renders the file's metadata rows as COPY text (``metadata_copy``) and sends
the instance without its element list: the main process, the only writer, then neither
unpickles nor serialises rows one by one.

Under ``phi_policy: drop`` the worker also omits the rows the policy names
(``core/dicom/phi.py``), after analytics have read them: only the EAV rows lose them.

A file's result is either ``Parsed`` or ``Failed``, two types rather than one with optional
fields, so the writer cannot reach for an instance a failed file does not have. They are
NamedTuples because a whole chunk of them is pickled back from every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple, TypeAlias

from dicom_etl_dagster.core.analytics.extract import instance_findings
from dicom_etl_dagster.core.analytics.findings import InstanceFindings
from dicom_etl_dagster.core.dicom.phi import drop_phi
from dicom_etl_dagster.core.dicom.reader import DicomInstance, DicomReadError, read_instance
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import (
    RenderedMetadata,
    render_metadata,
    use_known_entries,
)
from dicom_etl_dagster.core.ingest.status import PhiPolicy


class Parsed(NamedTuple):
    """A file read as a DICOM instance, its metadata rows rendered for COPY."""

    entry: FileEntry
    instance: DicomInstance  # without its elements: they are in ``metadata``
    metadata: RenderedMetadata
    findings: InstanceFindings = InstanceFindings()  # none when the run writes no measurements
    phi_dropped: int = 0  # element rows phi_policy left out of ``metadata``


class Failed(NamedTuple):
    """A file that could not be read as a DICOM instance, and why (for the ledger)."""

    entry: FileEntry
    reason: str


class Member(NamedTuple):
    """An archive member read into memory (``archives.py``), parsed from its bytes."""

    entry: FileEntry  # path ``<archive path>!/<member path>``, size and mtime of the entry
    data: bytes


class Opened(NamedTuple):
    """An archive whose members have all been handed on: its ledger row says so, so that a
    re-run skips the archive while it keeps its size and mtime (``plan.is_done``)."""

    entry: FileEntry
    members: int


ParseResult: TypeAlias = Parsed | Failed | Opened
#: What the workers are given: a file to read, an archive member's bytes, or a result the
#: main process already knows (a member it refused to read, an archive it finished).
WorkItem: TypeAlias = FileEntry | Member | Failed | Opened


def parse_file(
    item: WorkItem,
    measurements: bool = True,
    profiled_series: set[str] | None = None,
    phi_policy: PhiPolicy = PhiPolicy.KEEP,
) -> ParseResult:
    """Read one file and what analytics need of it (``core/analytics``); the measurement
    findings only with ``measurements``, and the acquisition profile only for a series not in
    ``profiled_series`` (which the file's series then joins; None: always). The metadata rows
    are those ``phi_policy`` leaves; the findings are made from all of them. An archive
    member is read from its bytes; a result known already is passed on as it is."""
    if isinstance(item, (Failed, Opened)):
        return item
    entry = item.entry if isinstance(item, Member) else item
    try:
        instance = read_instance(io.BytesIO(item.data) if isinstance(item, Member) else entry.path)
    except DicomReadError as exc:
        return Failed(entry, str(exc))
    except OSError as exc:  # unreadable, vanished: a reason, not a crash
        return Failed(entry, f"cannot read file: {exc.strerror or exc}")
    return parsed_instance(entry, instance, measurements, profiled_series, phi_policy)


def parsed_instance(
    entry: FileEntry,
    instance: DicomInstance,
    measurements: bool = True,
    profiled_series: set[str] | None = None,
    phi_policy: PhiPolicy = PhiPolicy.KEEP,
) -> Parsed:
    """An instance read from wherever (a file, DICOM JSON) as the writer takes it; the
    arguments as ``parse_file``'s."""
    series = instance.series_instance_uid
    profile = measurements and (profiled_series is None or series not in profiled_series)
    if profile and profiled_series is not None:
        profiled_series.add(series)
    findings = instance_findings(instance, measurements, acquisition=profile)
    rows, dropped = (instance.elements, 0)
    if phi_policy is PhiPolicy.DROP:
        rows, dropped = drop_phi(instance.elements)
    return Parsed(
        entry,
        dataclasses.replace(instance, elements=[], number_texts={}),  # both are in what follows
        render_metadata(dataclasses.replace(instance, elements=rows)),
        findings,
        dropped,
    )


def parse_chunk(
    entries: list[WorkItem], measurements: bool = True, phi_policy: PhiPolicy = PhiPolicy.KEEP
) -> list[ParseResult]:
    """Parse consecutive files of a batch, the acquisition profile once per series.

    Only a new series' first file needs its profile (``plan.plan_batch``), and a chunk is a
    contiguous slice of a batch, so the first file read of each series in each chunk
    carries it: the batch's first file of every series always does. The others do not pay
    for extracting and pickling it (measured: most of what measurements cost the workers).
    """
    profiled: set[str] = set()
    return [parse_file(entry, measurements, profiled, phi_policy) for entry in entries]


def start_forkserver() -> multiprocessing.context.ForkServerContext:
    """The context the workers start from, its server started (once per process).

    forkserver: workers start from a clean interpreter, not a fork of a threaded Dagster
    step. The server imports this module (pydicom, the readers) before its first fork, a
    quarter of a second; a caller that starts it early has that overlap its own set-up.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dicom_etl_dagster.core.ingest.parse_pool"])
    multiprocessing.forkserver.ensure_running()
    return context


def parse_batches(
    batches: Iterable[list[WorkItem]],
    workers: int,
    measurements: bool = True,
    phi_policy: PhiPolicy = PhiPolicy.KEEP,
    known_entries: Mapping[str, int] | None = None,
) -> Iterator[list[ParseResult]]:
    """Yield the parse results of each batch, in order, keeping one batch in flight.

    ``known_entries``: the run's dictionary entries at its start (entry key -> id), which
    the workers write into the rows themselves (``metadata_copy.use_known_entries``); the
    main process, which renders for any run, does not use them.
    """
    parse = functools.partial(parse_chunk, measurements=measurements, phi_policy=phi_policy)
    if workers <= 1:
        for batch in batches:
            yield parse(batch)
        return
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=start_forkserver(),
        initializer=_start_worker,
        initargs=(dict(known_entries or {}),),
    ) as pool:
        with _main_script_hidden():
            # A submit starts a worker while none is idle: these start every one, here.
            for _ in range(workers):
                pool.submit(int)
        in_flight: deque = deque()
        for batch in batches:
            size = max(1, len(batch) // (workers * 4))
            chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
            in_flight.append(pool.map(parse, chunks))
            if len(in_flight) > 1:
                yield [result for chunk in in_flight.popleft() for result in chunk]
        while in_flight:
            yield [result for chunk in in_flight.popleft() for result in chunk]


#: How much lower than the run's own the workers' CPU priority is (``os.nice``).
WORKER_NICENESS = 10


def _start_worker(known_entries: Mapping[str, int]) -> None:
    """A worker's set-up: a lower CPU priority, then the run's dictionary entries.

    The writer (the main process and its PostgreSQL backend, one COPY after another) is the
    run's critical path, and while it waits on its COPY the workers are a batch ahead: given
    the CPU first when both want it, the writer no longer waits on parsing that can wait
    (measured on 2 CPUs: 20,000 files end to end ~4% faster). Workers still get every CPU
    the writer leaves, and a worker may always lower its own priority.
    """
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    use_known_entries(known_entries)


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Start workers that do not run the parent's ``__main__`` script.

    A forkserver (or spawn) worker runs the parent's main script again, as ``__mp_main__``,
    when the parent was started as a script (not ``-m``): under ``dagster job execute`` that
    is the Dagster CLI, whose imports cost each worker about 0.8 s of CPU before its first
    file. The workers call only this module's functions, so they need none of it; the
    script is hidden only while they start.
    """
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if script is not None:
            main.__file__ = script
