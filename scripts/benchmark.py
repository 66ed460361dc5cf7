#!/usr/bin/env python3
"""Benchmark the DICOM -> OMOP ingest on one corpus, on this machine, in one invocation.

Phases, all on the same files:

1. parse-only: every file's header read and every element serialised exactly as the ETL
   does (``parse_pool.parse_batches`` -> ``read_instance``), same worker count, no
   database. The practical upper limit for the ETL.
2. ETL: ``ingest.prepare_run`` + ``ingest.ingest_folder`` (the core of the
   ``ingest_metadata`` job) into a real PostgreSQL, after ``migrate.ensure_tables`` and the
   DICOM2OMOP vocabulary load (not timed). Then the same folder again (nothing to do).
   Then, unless ``--skip-measurements-comparison``, the ETL once more into fresh schemas
   with measurements off (``AnalyticsOptions(enabled=False)``: no measurement /
   image_feature rows, and the parse workers skip their extraction), right after the
   measurements-on run, for the cost of measurements in files/s and CPU per file.
   The ETL phases connect as the job does (``core.db.connection.connect``). After them the
   database is vacuumed, analysed and checkpointed (not timed), so that no later phase
   shares the two cores with autovacuum working through the ETL's rows.
3. row-at-a-time baseline: the original plugin's statement pattern
   (``baseline_row_at_a_time.py``) on an evenly spread subset, in its own schema.
4. Orthanc: ``POST /instances`` of every file to a throwaway Orthanc on a free loopback
   port, when the ``Orthanc`` binary is installed (``apt-get install orthanc``).
5. with ``--end-to-end`` (``bench_end_to_end.py``): a pydicom parse (``dcmread`` +
   ``to_json_dict``, same worker count) and the user's ``dagster job execute -j
   ingest_metadata`` as a subprocess, start to exit, into fresh schemas.

``--concurrent-runs 1,2,4`` runs none of these phases but, for each N, N concurrent ingest
processes over disjoint slices of the corpus against one PostgreSQL (``bench_concurrency.py``).

PostgreSQL is a throwaway ``pgserver`` instance unless ``--database-url`` is given; in a
given database the schemas ``dicom_etl_bench_*`` are dropped and re-created.

Prints files/s, elements/s, peak RSS, CPU seconds per process group, rows written, the
ratios against the targets, the ETL's throughput over the first and last 10% of the run
and measurements on vs off, as markdown tables with the exact command line.

    python scripts/benchmark.py --files 20000
    python scripts/benchmark.py --corpus /data/dicom --baseline-files 200 --skip-orthanc
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import baseline_row_at_a_time as baseline  # noqa: E402
import make_corpus  # noqa: E402

from dicom_etl_dagster.core.analytics.write import AnalyticsOptions  # noqa: E402
from dicom_etl_dagster.core.cpu import available_cpus  # noqa: E402
from dicom_etl_dagster.core.db.connection import connect as etl_connect  # noqa: E402
from dicom_etl_dagster.core.db.identifiers import Schemas  # noqa: E402
from dicom_etl_dagster.core.db.migrate import ensure_tables  # noqa: E402
from dicom_etl_dagster.core.ingest import run as ingest_module  # noqa: E402
from dicom_etl_dagster.core.ingest.file_scan import FileEntry, iter_files  # noqa: E402
from dicom_etl_dagster.core.ingest.parse_pool import Parsed, parse_batches  # noqa: E402
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run  # noqa: E402
from dicom_etl_dagster.core.ingest.writer import PersonMapping  # noqa: E402
from dicom_etl_dagster.core.vocabulary import loader as vocabulary_loader  # noqa: E402

SCHEMAS = Schemas(
    cdm="dicom_etl_bench_cdm", vocab="dicom_etl_bench_vocab", medical_imaging="dicom_etl_bench_mi"
)
BASELINE_SCHEMA = "dicom_etl_bench_baseline"
MAPPING = PersonMapping(
    SCHEMAS.medical_imaging, "mappingtable", "source_person_id", "source_patient_id"
)
GIB = 1024**3
MIB = 1024**2

TARGETS = {  # issue's targets (2-core machine)
    "etl_vs_parse": 0.8,
    "etl_vs_orthanc": 1.0,
    "etl_vs_row_at_a_time": 50.0,
    "last_vs_first_10pct": 0.9,
    "peak_rss_bytes": 1 * GIB,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Measuring processes: peak RSS (summed over a process tree) and CPU seconds, sampled
# ---------------------------------------------------------------------------------------------
class ProcessGroup:
    """A process and all its descendants, as seen by the sampler.

    Sampling must cost the measured run little: the process list (a scan of /proc) is
    refreshed once a second, and PSS (a read of every process's smaps) only every
    ``pss_every`` samples.
    """

    def __init__(
        self, name: str, root_pid: Callable[[], int | None], use_pss: bool = False
    ) -> None:
        self.name = name
        self.root_pid = root_pid
        self.use_pss = (
            use_pss  # PostgreSQL backends share shared_buffers: RSS would count it N times
        )
        self.pss_every = 5
        self.peak_bytes = 0
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._procs: list[psutil.Process] = []
        self._listed_at = -1.0
        self._samples = 0
        self._lock = threading.Lock()

    def processes(self) -> list[psutil.Process]:
        if time.monotonic() - self._listed_at < 1.0:
            return self._procs
        self._listed_at = time.monotonic()
        pid = self.root_pid()
        try:
            root = psutil.Process(pid) if pid else None
            self._procs = [root, *root.children(recursive=True)] if root else []
        except psutil.Error:
            self._procs = []
        return self._procs

    def sample(self, first: bool = False, memory: bool = True) -> None:
        with self._lock:
            if first:
                self._listed_at = -1.0  # a fresh list for the phase's start
            self._samples += 1
            want_memory = memory and (
                not self.use_pss or first or self._samples % self.pss_every == 0
            )
            total = 0
            for proc in self.processes():
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        if want_memory:
                            total += (
                                proc.memory_full_info().pss
                                if self.use_pss
                                else proc.memory_info().rss
                            )
                except psutil.Error:
                    continue
                seconds = cpu.user + cpu.system
                if first:
                    self.cpu_start[proc.pid] = seconds
                else:
                    self.cpu_start.setdefault(proc.pid, 0.0)  # born during the phase
                self.cpu_last[proc.pid] = seconds
            if want_memory:
                self.peak_bytes = max(self.peak_bytes, total)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_last[pid] - self.cpu_start.get(pid, 0.0) for pid in self.cpu_last)


class Watch:
    """Samples the given process groups every ``interval`` seconds while a phase runs."""

    def __init__(self, groups: list[ProcessGroup], interval: float = 0.2) -> None:
        self.groups = groups
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for group in self.groups:
                group.sample()

    def __enter__(self) -> Watch:
        for group in self.groups:
            group.sample(first=True)
        self._self_cpu = _own_cpu_seconds()
        self._machine_busy = _machine_busy_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for group in self.groups:
            group.sample()
        self.main_cpu_seconds = _own_cpu_seconds() - self._self_cpu
        # CPU that processes outside the measured groups used meanwhile (other jobs on the
        # machine): a benchmark on a busy machine says so instead of silently losing cores.
        ours = sum(group.cpu_seconds for group in self.groups)
        self.other_cpu_seconds = max(0.0, _machine_busy_seconds() - self._machine_busy - ours)

    def peak(self, name: str) -> int:
        return next(g.peak_bytes for g in self.groups if g.name == name)

    def cpu(self, name: str) -> float:
        return next(g.cpu_seconds for g in self.groups if g.name == name)


def _machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet_machine(limit_seconds: float, busy_share: float = 0.15) -> str:
    """Wait (up to ``limit_seconds``) until other processes use less than ``busy_share`` of the CPUs.

    On a shared machine a phase that runs beside someone's test suite measures the test suite.
    Returns a note for the report when the machine never got quiet.
    """
    if limit_seconds <= 0:
        return ""
    deadline = time.monotonic() + limit_seconds
    waited = False
    while True:
        mine = psutil.Process()
        before_ours = sum(
            p.cpu_times().user + p.cpu_times().system
            for p in [mine, *mine.children(recursive=True)]
            if p.is_running()
        )
        before = _machine_busy_seconds()
        time.sleep(2.0)
        after_ours = sum(
            p.cpu_times().user + p.cpu_times().system
            for p in [mine, *mine.children(recursive=True)]
            if p.is_running()
        )
        share = max(0.0, (_machine_busy_seconds() - before) - (after_ours - before_ours)) / (
            2.0 * (os.cpu_count() or 1)
        )
        if share < busy_share:
            if waited:
                log("  the machine is quiet now")
            return ""
        if time.monotonic() > deadline:
            return f"other processes used {share:.0%} of the CPUs when this phase started"
        if not waited:
            log(
                f"  other processes use {share:.0%} of the CPUs: waiting up to {limit_seconds:.0f} s for quiet"
            )
            waited = True


BUSY_SHARE = 0.05  # a phase during which other processes used more of the CPUs is flagged


def busy_share(result: PhaseResult, cpus: int) -> float:
    other = result.cpu.get("other processes", 0.0)
    return other / (result.seconds * cpus) if result.seconds > 0 else 0.0


def etl_group() -> ProcessGroup:
    """This process plus its descendants (the forkserver and the parse workers)."""
    return ProcessGroup("etl", os.getpid)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    name: str
    files: int = 0
    files_ok: int = 0
    elements: int = 0
    seconds: float = 0.0
    peak_rss: int | None = None  # bytes, main + workers
    cpu: dict[str, float] = field(default_factory=dict)  # group -> CPU seconds
    rows: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def files_per_second(self) -> float:
        return self.files_ok / self.seconds if self.seconds else 0.0

    @property
    def elements_per_second(self) -> float:
        return self.elements / self.seconds if self.seconds else 0.0


def batches_of(entries: Iterable[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    iterator = iter(entries)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------
# 1. parse-only
# ---------------------------------------------------------------------------------------------
def warm_up_workers(root: Path, workers: int) -> None:
    """Start the forkserver (shared by both phases) so neither phase pays for it alone."""
    first = next(iter_files(root), None)
    if first is not None:
        list(parse_batches([[first]], workers))


def run_parse_only(root: Path, workers: int, batch_size: int) -> PhaseResult:
    result = PhaseResult("parse-only (no database)")
    failures: dict[str, int] = {}
    with Watch([etl_group()]) as watch:
        started = time.perf_counter()
        for outcomes in parse_batches(batches_of(iter_files(root), batch_size), workers):
            for outcome in outcomes:
                result.files += 1
                if isinstance(outcome, Parsed):
                    result.files_ok += 1
                    result.elements += outcome.metadata.row_count
                else:
                    failures[outcome.reason] = failures.get(outcome.reason, 0) + 1
        result.seconds = time.perf_counter() - started
    result.peak_rss = watch.peak("etl")
    result.cpu = {
        "main": watch.main_cpu_seconds,
        "workers": watch.cpu("etl") - watch.main_cpu_seconds,
        "other processes": watch.other_cpu_seconds,
    }
    if failures:
        result.note = f"{sum(failures.values())} files not readable"
        result.extra["failures"] = failures
    return result


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
class Database:
    def __init__(self, url: str | None, workdir: Path, settings: Sequence[str] = ()) -> None:
        self.server = None
        if url:
            self.url = url
            self.postmaster_pid: int | None = None
            if settings:
                raise SystemExit("--postgres-setting applies to the throwaway PostgreSQL only")
        else:
            import pgserver

            log("starting a throwaway PostgreSQL (pgserver)")
            self.server = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
            self.url = self.server.get_uri()
            self.postmaster_pid = self.server.get_pid()
            try:
                self._apply(settings)
            except BaseException:
                self.close()
                raise

    def _apply(self, settings: Sequence[str]) -> None:
        """``NAME=VALUE`` settings (``--postgres-setting``), by ALTER SYSTEM and a reload; one
        that needs a restart (shared_buffers) fails here rather than being measured unset."""
        pairs = [tuple(part.strip() for part in s.partition("=")[::2]) for s in settings]
        with self.connect() as conn:
            for name, value in pairs:
                statement = sql.SQL("ALTER SYSTEM SET {} = {}")
                conn.execute(statement.format(sql.Identifier(name), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)  # the postmaster reads the file on its own time
        with self.connect() as conn:  # a new backend: the reloaded values
            for name, value in pairs:
                row = conn.execute(
                    "SELECT pending_restart, current_setting(name) FROM pg_settings"
                    " WHERE name = %s",
                    [name],
                ).fetchone()
                if row is None or row[0]:
                    raise SystemExit(
                        f"--postgres-setting {name}={value}: unknown or needs a restart"
                    )
                log(f"PostgreSQL {name} = {row[1]}")

    def group(self) -> ProcessGroup | None:
        if not self.postmaster_pid:
            return None
        return ProcessGroup("postgres", lambda: self.postmaster_pid, use_pss=True)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, application_name="dicom_etl_benchmark")

    def close(self) -> None:
        if self.server is not None:
            self.server.cleanup()


def default_vocab_dir() -> Path | None:
    configured = os.environ.get("DICOM_ETL_VOCAB_DIR")
    if configured:
        return Path(configured)
    shared = REPO_ROOT.parent / "shared" / "dicom2omop"
    return (
        shared if shared.is_dir() else None
    )  # None: the product's default (external/, downloaded)


def prepare_database(db: Database, vocab_dir: Path | None, patients: int) -> dict:
    """Fresh schemas, tables, vocabulary and person mapping; returns setup timings."""
    timings = {}
    with db.connect() as conn:
        for schema in (SCHEMAS.cdm, SCHEMAS.vocab, SCHEMAS.medical_imaging, BASELINE_SCHEMA):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        started = time.perf_counter()
        ensure_tables(conn, SCHEMAS)
        for spec in vocabulary_loader.VOCABULARY_TABLES:
            vocabulary_loader.load_table(conn, SCHEMAS, spec, truncate=False, folder=vocab_dir)
        vocabulary_loader.load_data_elements(conn, SCHEMAS, truncate=False, folder=vocab_dir)
        timings["tables and vocabulary"] = time.perf_counter() - started
        if patients:
            conn.execute(
                sql.SQL("CREATE TABLE {} ({} integer NOT NULL, {} varchar(50) NOT NULL)").format(
                    sql.Identifier(MAPPING.schema, MAPPING.table),
                    sql.Identifier(MAPPING.person_column),
                    sql.Identifier(MAPPING.patient_column),
                )
            )
            with conn.cursor().copy(
                sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(MAPPING.schema, MAPPING.table))
            ) as copy:
                for number in range(1, patients + 1):
                    copy.write_row((number, make_corpus.patient_id(number)))
        started = time.perf_counter()
        baseline.create_schema(conn, BASELINE_SCHEMA, SCHEMAS)
        timings["baseline schema"] = time.perf_counter() - started
        conn.execute("CHECKPOINT")  # start every phase from a clean WAL state
    return timings


# ---------------------------------------------------------------------------------------------
# 2. the ETL
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchMark:
    at: float  # perf_counter when the batch was committed
    files_done: int  # cumulative
    elements_done: int  # cumulative dicom_file_metadata rows
    write_seconds: float  # time inside write_batch for this batch
    main_cpu: float  # cumulative CPU seconds of this process
    backend_cpu: (
        float  # cumulative CPU seconds of the connection's PostgreSQL backend (0 if remote)
    )
    backend_kernel_cpu: float  # of which system (kernel) time: writes, fsyncs, writeback
    own_cpu: (
        float  # cumulative CPU seconds of this process, its workers and every PostgreSQL process
    )
    machine_busy: float  # cumulative busy CPU seconds of the whole machine


def run_etl(
    db: Database,
    root: Path,
    workers: int,
    batch_size: int,
    total_files: int,
    label: str = "ETL (prepare_run + ingest_folder)",
    analytics: AnalyticsOptions | None = None,
) -> PhaseResult:
    """One ingest of ``root``; ``analytics`` as the job's options give it (default: measurements on)."""
    result = PhaseResult(label)
    marks: list[BatchMark] = []
    write_seconds: list[float] = []
    original_write_batch = ingest_module.write_batch

    def timed_write_batch(conn, state, outcomes):  # instrumentation only: times each batch write
        started = time.perf_counter()
        try:
            return original_write_batch(conn, state, outcomes)
        finally:
            write_seconds.append(time.perf_counter() - started)

    next_report = [0.1]

    def progress(report) -> None:
        done = sum(report.status_counts.values()) + report.files_already_done
        for group in groups:
            group.sample(memory=False)
        marks.append(
            BatchMark(
                time.perf_counter(),
                done,
                report.rows["dicom_file_metadata"],
                write_seconds[-1] if write_seconds else 0.0,
                _own_cpu_seconds(),
                *backend_cpu(),
                sum(g.cpu_seconds for g in groups),
                _machine_busy_seconds(),
            )
        )
        if total_files and done / total_files >= next_report[0]:
            elapsed = marks[-1].at - started
            log(f"  {label}: {done:,}/{total_files:,} files, {done / elapsed:,.0f} files/s")
            next_report[0] += 0.1

    groups = [etl_group()] + ([db.group()] if db.group() else [])
    with etl_connect(db.url) as conn:  # as the job connects (its statements never prepared)
        backend = None
        if db.postmaster_pid:
            try:
                backend = psutil.Process(conn.info.backend_pid)
            except psutil.Error:
                backend = None

        def backend_cpu() -> tuple[float, float]:
            """The backend's CPU seconds so far, and of them its kernel (system) time."""
            try:
                times = backend.cpu_times()
                return times.user + times.system, times.system
            except (AttributeError, psutil.Error):
                return 0.0, 0.0

        ingest_module.write_batch = timed_write_batch
        wal_before, checkpoints_before = wal_and_checkpoints(conn)
        try:
            with Watch(groups) as watch:
                started = time.perf_counter()
                state = prepare_run(
                    conn,
                    SCHEMAS,
                    f"benchmark-{uuid.uuid4()}",
                    "use_id_zero",
                    MAPPING,
                    lambda message: log(f"  warning: {message}"),
                    analytics=analytics,
                )
                report, seconds = ingest_folder(
                    conn, state, root, batch_size, workers, progress=progress
                )
                result.seconds = time.perf_counter() - started
        finally:
            ingest_module.write_batch = original_write_batch
        wal_after, checkpoints_after = wal_and_checkpoints(conn)
        if wal_before and wal_after:
            result.extra["wal_bytes"] = conn.execute(
                "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint", [wal_after, wal_before]
            ).fetchone()[0]
        if checkpoints_before is not None and checkpoints_after is not None:
            result.extra["checkpoints"] = checkpoints_after - checkpoints_before
    counts = report.status_counts
    result.files = report.files_seen
    result.files_ok = counts["ingested"] + counts["duplicate"] + report.files_already_done
    result.elements = report.rows["dicom_file_metadata"]
    result.rows = sum(v for k, v in report.rows.items() if not k.endswith("_replaced"))
    result.peak_rss = watch.peak("etl")
    result.cpu = {
        "main": watch.main_cpu_seconds,
        "workers": max(0.0, watch.cpu("etl") - watch.main_cpu_seconds),
    }
    if db.group():
        result.cpu["postgres"] = watch.cpu("postgres")
        result.extra["postgres_peak_pss"] = watch.peak("postgres")
    result.cpu["other processes"] = watch.other_cpu_seconds
    result.extra.update(
        status=dict(counts),
        already_done=report.files_already_done,
        rows_by_table=dict(report.rows),
        stage_seconds=dict(seconds),
        batches=len(marks),
        started=started,
        marks=marks,
        write_seconds_total=sum(write_seconds),
    )
    if counts["failed"]:
        result.note = f"{counts['failed']} failed"
    return result


def flatness(result: PhaseResult, total_files: int) -> dict | None:
    """Throughput over the first and the last 10% of the files.

    The first batch is left out of the first window: it fills the pipeline (parsed with no
    write to overlap) and would make the start look slow and the ratio look good.
    """
    marks: list[BatchMark] = result.extra.get("marks") or []
    if len(marks) < 3 or not total_files:
        return None
    tenth = max(1, math.ceil(total_files * 0.1))
    start = marks[0]
    first_end = next((m for m in marks[1:] if m.files_done - start.files_done >= tenth), marks[-1])
    first_batches = [m for m in marks[1:] if m.at <= first_end.at]
    last_start = next(
        (m for m in reversed(marks[:-1]) if marks[-1].files_done - m.files_done >= tenth), marks[0]
    )
    last_batches = [m for m in marks if m.at > last_start.at]
    first_seconds = first_end.at - start.at
    last_seconds = marks[-1].at - last_start.at
    first_rate = (first_end.files_done - start.files_done) / first_seconds
    last_rate = (marks[-1].files_done - last_start.files_done) / last_seconds
    first_elements = (first_end.elements_done - start.elements_done) / first_seconds
    last_elements = (marks[-1].elements_done - last_start.elements_done) / last_seconds
    per_batch = [b.at - a.at for a, b in zip(marks, marks[1:])]

    def costs(a: BatchMark, b: BatchMark) -> dict:
        """Between two marks: CPU microseconds per metadata row (this process, its PostgreSQL
        backend, everything of ours) and the share of the machine other processes took.
        A busy machine stretches wall time but not the CPU per row."""
        rows = max(1, b.elements_done - a.elements_done)
        seconds = max(1e-9, b.at - a.at)
        cpus = available_cpus()
        return {
            "main_us_per_row": 1e6 * (b.main_cpu - a.main_cpu) / rows,
            "backend_us_per_row": 1e6 * (b.backend_cpu - a.backend_cpu) / rows,
            "backend_kernel_us_per_row": 1e6 * (b.backend_kernel_cpu - a.backend_kernel_cpu) / rows,
            "own_us_per_row": 1e6 * (b.own_cpu - a.own_cpu) / rows,
            "other_share": max(0.0, (b.machine_busy - a.machine_busy) - (b.own_cpu - a.own_cpu))
            / (seconds * cpus),
        }

    first_costs = costs(start, first_end)
    last_costs = costs(last_start, marks[-1])
    # Ten windows of (about) a tenth of the batches each, the first preceded by the start-up batch.
    windows = []
    step = max(1, math.ceil(len(marks) / 10))
    for i in range(1, len(marks), step):
        a, b = marks[i - 1], marks[min(len(marks) - 1, i + step - 1)]
        windows.append(
            {
                "files": (a.files_done, b.files_done),
                "files_per_second": (b.files_done - a.files_done) / (b.at - a.at),
                "elements_per_second": (b.elements_done - a.elements_done) / (b.at - a.at),
                **costs(a, b),
            }
        )
    return {
        "windows": windows,
        "first_costs": first_costs,
        "last_costs": last_costs,
        "batches": len(marks),
        "first_files": first_end.files_done - start.files_done,
        "first_rate": first_rate,
        "first_write_seconds_per_batch": statistics.mean(m.write_seconds for m in first_batches),
        "last_files": marks[-1].files_done - last_start.files_done,
        "last_rate": last_rate,
        "last_write_seconds_per_batch": statistics.mean(m.write_seconds for m in last_batches),
        "ratio": last_rate / first_rate if first_rate else 0.0,
        "first_elements_rate": first_elements,
        "last_elements_rate": last_elements,
        "elements_ratio": last_elements / first_elements if first_elements else 0.0,
        "startup_seconds": start.at - result.extra["started"],
        "batch_seconds_min": min(per_batch) if per_batch else 0.0,
        "batch_seconds_median": statistics.median(per_batch) if per_batch else 0.0,
        "batch_seconds_max": max(per_batch) if per_batch else 0.0,
    }


def own_cpu_per_1k_files(p: PhaseResult) -> float | None:
    """CPU seconds of every group of ours (not other processes) per 1,000 files."""
    own = sum(v for k, v in p.cpu.items() if k != "other processes")
    return 1000 * own / p.files_ok if p.files_ok and own else None


def measurements_comparison(on: PhaseResult, off: PhaseResult, cpus: int) -> dict:
    """The ETL with measurements on vs off, run back to back on the same files: files/s,
    their ratio and the throughput measurements cost, and the CPU per file (which a busy
    machine disturbs less than files/s), with the rows each run wrote."""
    ratio = on.files_per_second / off.files_per_second if off.files_per_second else None
    cpu_on, cpu_off = own_cpu_per_1k_files(on), own_cpu_per_1k_files(off)

    def rows(p: PhaseResult, table: str) -> int:
        return p.extra.get("rows_by_table", {}).get(table, 0)

    return {
        "files_per_second_on": on.files_per_second,
        "files_per_second_off": off.files_per_second,
        "ratio_on_off": ratio,
        # Throughput lost to measurements: 20 means 20% fewer files/s with them.
        "cost_percent": None if ratio is None else 100 * (1 - ratio),
        "own_cpu_s_per_1k_files_on": cpu_on,
        "own_cpu_s_per_1k_files_off": cpu_off,
        "cpu_cost_percent": 100 * (cpu_on / cpu_off - 1) if cpu_on and cpu_off else None,
        "measurement_rows_on": rows(on, "measurement"),
        "image_feature_rows_on": rows(on, "image_feature"),
        "measurement_rows_off": rows(off, "measurement"),
        "image_feature_rows_off": rows(off, "image_feature"),
        "other_processes_share_on": busy_share(on, cpus),
        "other_processes_share_off": busy_share(off, cpus),
    }


def measurements_lines(m: dict) -> list[str]:
    """The report's lines on measurements on vs off."""

    def number(value: float | None, form: str) -> str:
        return "–" if value is None else format(value, form)

    lines = [
        "Measurements on vs off (the same ETL, back to back, each into fresh schemas):\n",
        f"- files/s with measurements {m['files_per_second_on']:,.1f}, without "
        f"{m['files_per_second_off']:,.1f}: ratio on/off {number(m['ratio_on_off'], '.2f')}x, "
        f"cost {number(m['cost_percent'], '.1f')}% of the throughput",
        f"- own CPU s per 1k files with {number(m['own_cpu_s_per_1k_files_on'], ',.2f')}, without "
        f"{number(m['own_cpu_s_per_1k_files_off'], ',.2f')}: cost "
        f"{number(m['cpu_cost_percent'], '+.1f')}% CPU per file",
        f"- rows per run: measurement {m['measurement_rows_on']:,} / {m['measurement_rows_off']:,}, "
        f"image_feature {m['image_feature_rows_on']:,} / {m['image_feature_rows_off']:,} (on / off)",
    ]
    busy = max(m["other_processes_share_on"], m["other_processes_share_off"])
    if busy > BUSY_SHARE:
        lines.append(
            f"- **machine busy**: other processes used {m['other_processes_share_on']:.0%} (on) and "
            f"{m['other_processes_share_off']:.0%} (off) of the CPUs: trust the CPU per file more "
            "than files/s"
        )
    lines.append("")
    return lines


def settle_database(db: Database) -> None:
    """VACUUM (ANALYZE) and CHECKPOINT after the ETL phases, not timed: otherwise autovacuum
    and the checkpointer work through the ETL's millions of rows during a later phase (the
    Orthanc or the end-to-end one), on the same two cores."""
    started = time.perf_counter()
    with db.connect() as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")
    log(f"  database settled (VACUUM (ANALYZE), CHECKPOINT): {time.perf_counter() - started:.1f} s")


def wal_and_checkpoints(conn: psycopg.Connection) -> tuple[str | None, int | None]:
    """The current WAL position and the number of checkpoints so far (None where not visible)."""
    try:
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    except psycopg.Error:
        lsn = None
    checkpoints = None
    for query in (
        "SELECT num_timed + num_requested FROM pg_stat_checkpointer",  # PostgreSQL 17+
        "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
    ):
        try:
            checkpoints = conn.execute(query).fetchone()[0]
            break
        except psycopg.Error:
            continue
    return lsn, checkpoints


def database_rows(db: Database) -> dict[str, int]:
    tables = [
        (SCHEMAS.cdm, "procedure_occurrence"),
        (SCHEMAS.medical_imaging, "image_occurrence"),
        (SCHEMAS.medical_imaging, "dicom_file_metadata"),
        (SCHEMAS.medical_imaging, "dicom_ingest_log"),
    ]
    with db.connect() as conn:
        counts = {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(s, t))
            ).fetchone()[0]
            for s, t in tables
        }
        counts["database size (MB)"] = round(
            conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / MIB
        )
        counts.update(metadata_bytes_per_file(conn))
    return counts


def metadata_bytes_per_file(conn: psycopg.Connection) -> dict[str, int]:
    """dicom_file_metadata's bytes (over its partitions, if any) per file ingested: table
    (with TOAST) and indexes apart. The EAV table is most of the database."""
    table = sql.Identifier(SCHEMAS.medical_imaging, "dicom_file_metadata").as_string(conn)
    table_bytes, index_bytes = conn.execute(
        "SELECT coalesce(sum(pg_table_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0)"
        " FROM (SELECT relid FROM pg_partition_tree(%s::regclass) UNION SELECT %s::regclass) r",
        [table, table],  # a plain table is no partition tree: itself
    ).fetchone()
    files = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE status = 'ingested'").format(
            sql.Identifier(SCHEMAS.medical_imaging, "dicom_ingest_log")
        )
    ).fetchone()[0]
    if not files:
        return {}
    return {
        "dicom_file_metadata table bytes per file": round(table_bytes / files),
        "dicom_file_metadata index bytes per file": round(index_bytes / files),
        "dicom_file_metadata bytes per file": round((table_bytes + index_bytes) / files),
    }


# ---------------------------------------------------------------------------------------------
# 3. row-at-a-time baseline
# ---------------------------------------------------------------------------------------------
def spread_subset(paths: list[str], count: int) -> list[str]:
    if count >= len(paths):
        return list(paths)
    return [paths[i * len(paths) // count] for i in range(count)]


def recreate_baseline_schema(db: Database) -> None:
    with db.connect() as conn:
        baseline.create_schema(conn, BASELINE_SCHEMA, SCHEMAS)


def run_baseline(db: Database, paths: list[str], with_mapping: bool) -> PhaseResult:
    result = PhaseResult(f"row-at-a-time baseline ({len(paths):,} files)")
    groups = [etl_group()] + ([db.group()] if db.group() else [])
    mapping = (
        (MAPPING.schema, MAPPING.table, MAPPING.person_column, MAPPING.patient_column)
        if with_mapping
        else None
    )
    with db.connect() as conn, Watch(groups) as watch:
        started = time.perf_counter()
        outcome = baseline.run(conn, BASELINE_SCHEMA, SCHEMAS.vocab, paths, mapping)
        result.seconds = time.perf_counter() - started
    result.files = outcome.files
    result.files_ok = outcome.files_ingested
    result.elements = outcome.elements
    result.rows = sum(outcome.rows.values())
    result.peak_rss = watch.peak("etl")
    result.cpu = {"main": watch.main_cpu_seconds}
    if db.group():
        result.cpu["postgres"] = watch.cpu("postgres")
    result.cpu["other processes"] = watch.other_cpu_seconds
    result.extra.update(
        statements=outcome.statements,
        seconds_parse=outcome.seconds_parse,
        seconds_database=outcome.seconds_database,
    )
    result.note = (
        f"{outcome.statements:,} statements, {outcome.statements / outcome.seconds_database:,.0f}/s; "
        f"parse {outcome.seconds_parse:.1f} s, database {outcome.seconds_database:.1f} s"
    )
    return result


# ---------------------------------------------------------------------------------------------
# 4. Orthanc
# ---------------------------------------------------------------------------------------------
def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (
            p
            for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def run_orthanc(paths: list[str], elements: int, clients: int, workdir: Path) -> PhaseResult:
    binary = orthanc_binary()
    result = PhaseResult(f"Orthanc REST (POST /instances, {clients} client threads)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    folder = Path(tempfile.mkdtemp(prefix="orthanc_", dir=workdir))
    (folder / "storage").mkdir()
    port = free_port()
    config = {
        "Name": "dicom_etl_benchmark",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "SaveJobs": False,
        "HttpThreadsCount": 50,
        "StableAge": 3600,
        "LuaScripts": [],
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as orthanc_log:
        process = subprocess.Popen(
            [binary, str(folder / "orthanc.json")],
            stdout=orthanc_log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _http(port, "GET", "/system", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")
            time.sleep(0.2)

        local = threading.local()
        failures: list[str] = []

        def upload(path: str) -> bool:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with open(path, "rb") as handle:
                body = handle.read()
            local.conn.request(
                "POST", "/instances", body=body, headers={"Content-Type": "application/dicom"}
            )
            response = local.conn.getresponse()
            text = response.read()
            if response.status != 200:
                failures.append(f"HTTP {response.status}: {text[:200]!r}")
                return False
            return True

        group = ProcessGroup("orthanc", lambda: process.pid)
        with Watch([etl_group(), group]) as watch:
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                ok = sum(pool.map(upload, paths, chunksize=16))
            result.seconds = time.perf_counter() - started
        status, body = _http(port, "GET", "/statistics")
        stats = json.loads(body) if status == 200 else {}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    result.files = len(paths)
    result.files_ok = ok
    result.elements = elements if ok == len(paths) else 0
    result.rows = stats.get("CountInstances")
    result.peak_rss = watch.peak("etl")
    result.cpu = {
        "client": watch.main_cpu_seconds,
        "orthanc": watch.cpu("orthanc"),
        "other processes": watch.other_cpu_seconds,
    }
    result.extra.update(
        orthanc_peak_rss=watch.peak("orthanc"),
        version=version,
        statistics=stats,
        failures=failures[:5],
    )
    result.note = (
        f"{version}; Orthanc peak RSS {watch.peak('orthanc') / MIB:,.0f} MiB; "
        f"stores whole files + its main-tag index, not every element"
    )
    if failures:
        result.note += f"; {len(failures)} uploads failed: {failures[0]}"
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:,.0f}"


def _per_1k(p: PhaseResult) -> str:
    own = sum(v for k, v in p.cpu.items() if k != "other processes")
    return f"{1000 * own / p.files_ok:,.2f}" if p.files_ok and own else "–"


def _cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.1f}" for k, v in cpu.items()) or "–"


def markdown(
    args,
    corpus: dict,
    phases: list[PhaseResult],
    etl: PhaseResult | None,
    parse: PhaseResult | None,
    row: PhaseResult | None,
    orthanc: PhaseResult | None,
    orthanc_note: str,
    flat: dict | None,
    rerun: PhaseResult | None,
    db_rows: dict | None,
    setup: dict,
    environment: dict,
    measurements: dict | None = None,
) -> str:
    out: list[str] = []
    out.append("## dicom_etl_dagster benchmark\n")
    out.append("Command: `" + shlex.join(args.command) + "`\n")
    out.append("Machine: " + "; ".join(f"{k} {v}" for k, v in environment.items()) + "\n")
    out.append(f"Corpus: {corpus['description']}\n")
    out.append(
        "| phase | files | seconds | files/s | elements/s | peak RSS main+workers (MiB) | CPU s | "
        "own CPU s per 1k files | rows written | notes |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    cpus = environment.get("cpus (usable)") or 1
    for p in phases:
        if p.seconds > 1 and busy_share(p, cpus) > BUSY_SHARE:
            p.note = "; ".join(
                filter(
                    None,
                    [
                        p.note,
                        f"**machine busy**: other processes used "
                        f"{busy_share(p, cpus):.0%} of the CPUs",
                    ],
                )
            )
        out.append(
            f"| {p.name} | {p.files_ok:,}/{p.files:,} | {p.seconds:,.1f} | {p.files_per_second:,.1f} | "
            f"{p.elements_per_second:,.0f} | {_mib(p.peak_rss)} | {_cpu(p.cpu)} | {_per_1k(p)} | "
            f"{'–' if p.rows is None else f'{p.rows:,}'} | {p.note} |"
        )
    out.append("")

    out.append("| comparison | measured | target | |")
    out.append("|---|---:|---:|---|")

    def line(
        name: str,
        value: float | None,
        target: float,
        unit: str = "x",
        lower_is_better: bool = False,
    ) -> None:
        if value is None:
            out.append(
                f"| {name} | – | {'<' if lower_is_better else '>='} {target:g}{unit} | not measured |"
            )
            return
        met = value < target if lower_is_better else value >= target
        out.append(
            f"| {name} | {value:,.2f}{unit} | {'<' if lower_is_better else '>='} {target:g}{unit} | "
            f"{'met' if met else '**NOT met**'} |"
        )

    if etl and parse:
        line(
            "ETL / parse-only (files/s)",
            etl.files_per_second / parse.files_per_second,
            TARGETS["etl_vs_parse"],
        )
    if etl:
        line(
            "ETL / Orthanc (files/s)",
            etl.files_per_second / orthanc.files_per_second
            if orthanc and orthanc.files_per_second
            else None,
            TARGETS["etl_vs_orthanc"],
        )
        line(
            "ETL / row-at-a-time (elements/s)",
            etl.elements_per_second / row.elements_per_second
            if row and row.elements_per_second
            else None,
            TARGETS["etl_vs_row_at_a_time"],
        )
        if row and row.files_per_second:
            out.append(
                f"| ETL / row-at-a-time (files/s) | {etl.files_per_second / row.files_per_second:,.1f}x | | |"
            )
        line(
            "ETL last 10% / first 10% (files/s)",
            flat["ratio"] if flat else None,
            TARGETS["last_vs_first_10pct"],
        )
        line(
            "ETL last 10% / first 10% (elements/s)",
            flat["elements_ratio"] if flat else None,
            TARGETS["last_vs_first_10pct"],
        )
        if flat:  # what could slow down as tables grow is the write path, not parsing
            first = (
                flat["first_costs"]["main_us_per_row"] + flat["first_costs"]["backend_us_per_row"]
            )
            last = flat["last_costs"]["main_us_per_row"] + flat["last_costs"]["backend_us_per_row"]
            line(
                "ETL write-path CPU per row (main + its PostgreSQL backend), first 10% / last 10% "
                "(a busy machine does not disturb it)",
                first / last if last else None,
                TARGETS["last_vs_first_10pct"],
            )
            # The kernel's share of the backend's time is the operating system's work on
            # PostgreSQL's files (buffer writes, WAL fsyncs and the writeback they trigger),
            # which varies from run to run; without it, what PostgreSQL itself does per row.
            kernel_first = flat["first_costs"]["backend_kernel_us_per_row"]
            kernel_last = flat["last_costs"]["backend_kernel_us_per_row"]
            user_last = last - kernel_last
            out.append(
                "| the same without the backend's kernel time (µs/row "
                f"{first - kernel_first:.2f} -> {user_last:.2f}; kernel {kernel_first:.2f} -> "
                f"{kernel_last:.2f}) | {(first - kernel_first) / user_last if user_last else 0:.2f}x | | |"
            )
        if (
            flat
            and abs(flat["first_costs"]["other_share"] - flat["last_costs"]["other_share"]) > 0.1
        ):
            out.append(
                f"| (wall-clock first/last comparison disturbed: other processes took "
                f"{flat['first_costs']['other_share']:.0%} vs {flat['last_costs']['other_share']:.0%} of the CPUs; "
                "see the per-window table) | | | |"
            )
        if measurements and measurements["ratio_on_off"] is not None:
            out.append(
                f"| ETL measurements on / off (files/s) | {measurements['ratio_on_off']:,.2f}x | | "
                f"cost {measurements['cost_percent']:.1f}% |"
            )
        line(
            "ETL peak RSS, main + workers",
            etl.peak_rss / GIB if etl.peak_rss else None,
            1.0,
            " GiB",
            lower_is_better=True,
        )
    out.append("")
    if orthanc_note:
        out.append(f"Orthanc: {orthanc_note}\n")
    if measurements:
        out.extend(measurements_lines(measurements))

    if etl:
        extra = etl.extra
        out.append("ETL details:\n")
        out.append(
            f"- files: {extra['status']} (already done: {extra['already_done']}); "
            f"{extra['batches']} batches of up to {args.batch_size}, {args.workers} parse workers"
        )
        out.append(
            "- rows written: " + ", ".join(f"{k} {v:,}" for k, v in extra["rows_by_table"].items())
        )
        stages = extra["stage_seconds"]
        out.append(
            "- ingest_folder's own stage timer (s): "
            + ", ".join(f"{k} {v:,.1f}" for k, v in stages.items())
            + f"; time inside write_batch {extra['write_seconds_total']:,.1f} s"
        )
        if "wal_bytes" in extra:
            out.append(
                f"- WAL written {extra['wal_bytes'] / MIB:,.0f} MiB, checkpoints during the phase: "
                f"{extra.get('checkpoints', '?')}"
            )
        if "postgres_peak_pss" in extra:
            out.append(
                f"- PostgreSQL server peak PSS (all its processes) {extra['postgres_peak_pss'] / MIB:,.0f} MiB"
            )
        if db_rows:
            out.append(
                "- in the database afterwards: "
                + ", ".join(f"{k} {v:,}" for k, v in db_rows.items())
            )
        if parse and parse.elements != etl.elements:
            out.append(
                f"- **element count differs**: parse-only {parse.elements:,}, ETL {etl.elements:,}"
            )
        if flat:
            out.append(
                f"- first 10% (after the start-up batch, {flat['first_files']:,} files): "
                f"{flat['first_rate']:,.1f} files/s, {flat['first_elements_rate']:,.0f} elements/s, write_batch "
                f"{flat['first_write_seconds_per_batch']:.2f} s/batch; last 10% ({flat['last_files']:,} files): "
                f"{flat['last_rate']:,.1f} files/s, {flat['last_elements_rate']:,.0f} elements/s, write_batch "
                f"{flat['last_write_seconds_per_batch']:.2f} s/batch; start-up batch {flat['startup_seconds']:.1f} s; "
                f"seconds per batch min/median/max {flat['batch_seconds_min']:.2f}/"
                f"{flat['batch_seconds_median']:.2f}/{flat['batch_seconds_max']:.2f}"
            )
            a, b = flat["first_costs"], flat["last_costs"]
            out.append(
                f"- CPU µs per metadata row, first vs last 10% (a busy machine does not stretch these): "
                f"main process {a['main_us_per_row']:.2f} vs {b['main_us_per_row']:.2f}; its PostgreSQL "
                f"backend {a['backend_us_per_row']:.2f} vs {b['backend_us_per_row']:.2f}; everything of ours "
                f"(main, workers, all PostgreSQL processes) {a['own_us_per_row']:.2f} vs {b['own_us_per_row']:.2f}; "
                f"other processes took {a['other_share']:.0%} vs {b['other_share']:.0%} of the CPUs"
            )
            out.append("")
            out.append(
                "| ETL window (files) | files/s | elements/s | own CPU µs/row | main µs/row | "
                "PostgreSQL backend µs/row (of it kernel) | other processes' share of the CPUs |"
            )
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for w in flat["windows"]:
                out.append(
                    f"| {w['files'][0]:,}–{w['files'][1]:,} | {w['files_per_second']:,.1f} | "
                    f"{w['elements_per_second']:,.0f} | {w['own_us_per_row']:.2f} | {w['main_us_per_row']:.2f} | "
                    f"{w['backend_us_per_row']:.2f} ({w['backend_kernel_us_per_row']:.2f}) | "
                    f"{w['other_share']:.0%} |"
                )
            if flat["batches"] < 10:
                out.append(
                    f"  (only {flat['batches']} batches: too few for a meaningful first/last comparison)"
                )
        out.append("")
    if setup:
        out.append(
            "Setup (not timed above): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items())
            + "\n"
        )
    out.append(
        "CPU s: CPU seconds per process group during the phase (main = this process; workers = the "
        "parse pool and forkserver; postgres = every PostgreSQL process; other processes = whatever "
        "else ran on the machine meanwhile, CPU the phase could not use; own CPU s per 1k files counts every group "
        "but that one, a measure of cost that a busy machine disturbs less than files/s). Peak RSS is the largest "
        "sum of RSS over this process and all its descendants, sampled every 0.2 s (PostgreSQL: PSS, every second). File reads hit "
        "the page cache in every phase."
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
def resolve_corpus(args, workdir: Path) -> tuple[Path, dict]:
    """The folder to ingest and a description; generates the corpus when needed."""
    if (
        args.corpus is not None
        and args.corpus.is_dir()
        and make_corpus.read_manifest(args.corpus) is None
        and any(args.corpus.iterdir())  # someone's own DICOM folder: use it as it is
    ):
        return args.corpus, {"description": f"{args.corpus} (not generated)", "patients": 0}
    out = (
        args.corpus
        or Path(tempfile.gettempdir()) / "dicom_etl_bench" / f"corpus-n{args.files}-s{args.seed}"
    )
    manifest = make_corpus.read_manifest(out)
    if manifest is None:
        log(f"generating {args.files:,} files into {out}")
        manifest = make_corpus.generate(out, make_corpus.CorpusSpec(args.files, args.seed))
    elif args.files_given and manifest["files"] != args.files:
        raise SystemExit(
            f"{out} holds a corpus of {manifest['files']:,} files, not {args.files:,}: "
            "pass another --corpus folder"
        )
    description = (
        f"{out} (make_corpus seed {manifest['seed']}: {manifest['files']:,} files, "
        f"{manifest['bytes'] / 1e6:,.0f} MB, {manifest['series']:,} series, {manifest['studies']:,} studies, "
        f"{manifest['patients']:,} patients; by template "
        + ", ".join(f"{k} {v:,}" for k, v in manifest["files_by_template"].items())
        + ")"
    )
    return out / manifest["dicom_folder"], {
        "description": description,
        "patients": manifest["patients"],
    }


def _run_counts(text: str) -> list[int]:
    """``--concurrent-runs 1,2,4`` -> ``[1, 2, 4]``."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"positive integers separated by commas, not {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--files", type=int, default=2000, help="corpus size to generate (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument(
        "--corpus",
        type=Path,
        help="corpus folder: reused if it holds one (a make_corpus "
        "output or any DICOM folder), generated there otherwise; default: a folder per "
        "size and seed under the temp directory, reused across runs",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="parse worker processes (default: the CPUs this container may use)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=500, help="files per batch/transaction (default 500)"
    )
    parser.add_argument(
        "--baseline-files",
        type=int,
        default=200,
        help="files for the row-at-a-time baseline, spread over the corpus (0: skip)",
    )
    parser.add_argument(
        "--skip-orthanc", action="store_true", help="do not run the Orthanc comparison"
    )
    parser.add_argument(
        "--orthanc-clients",
        type=int,
        default=0,
        help="concurrent upload threads for Orthanc (default: 2 x workers)",
    )
    parser.add_argument("--skip-parse-only", action="store_true")
    parser.add_argument("--skip-etl", action="store_true")
    parser.add_argument(
        "--skip-measurements-comparison",
        action="store_true",
        help="do not run the ETL a second time with measurements off (into fresh schemas) "
        "to compare files/s and CPU per file with measurements on",
    )
    parser.add_argument(
        "--database-url",
        help="use this PostgreSQL (schemas dicom_etl_bench_* are dropped "
        "and re-created) instead of a throwaway pgserver",
    )
    parser.add_argument(
        "--postgres-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the throwaway PostgreSQL, e.g. max_wal_size=16GB (repeatable; "
        "settings that need a restart are refused)",
    )
    parser.add_argument(
        "--vocab-dir",
        type=Path,
        default=default_vocab_dir(),
        help="DICOM2OMOP CSV folder (default: $DICOM_ETL_VOCAB_DIR, else ../shared/dicom2omop)",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each phase, wait up to SECONDS until other processes use under 15%% of "
        "the CPUs (for shared machines; default 0: do not wait)",
    )
    parser.add_argument(
        "--repeat-if-busy",
        type=int,
        default=0,
        metavar="N",
        help="repeat a phase (up to N times) when other processes used over 5%% of the CPUs "
        "during it, and report the quietest run (default 0)",
    )
    parser.add_argument(
        "--concurrent-runs",
        type=_run_counts,
        metavar="N,N,...",
        help="instead of the phases: for each N, N concurrent ingest runs (processes) over "
        "disjoint slices of the corpus against one PostgreSQL, fresh schemas per N; files/s, "
        "lock-wait and overlapping-COPY shares, dicom_file_metadata bytes per file "
        "(scripts/bench_concurrency.py)",
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also run a pydicom parse of every file and the ingest_metadata job end to end "
        "(dagster job execute, start to exit), with ratios to Orthanc and pydicom "
        "(scripts/bench_end_to_end.py)",
    )
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    args.files_given = any(
        a == "--files" or a.startswith("--files=") for a in (argv or sys.argv[1:])
    )
    args.orthanc_clients = args.orthanc_clients or 2 * args.workers
    args.command = (
        list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
        if argv is None
        else [sys.executable, str(Path(__file__)), *argv]
    )

    workdir = Path(tempfile.mkdtemp(prefix="dicom_etl_bench_"))
    os.chmod(workdir, 0o755)  # pgserver runs PostgreSQL as its own user when we are root
    phases: list[PhaseResult] = []
    parse = etl = rerun = row = orthanc = end_to_end = None
    flat = db_rows = measurements = None
    setup: dict = {}
    orthanc_note = ""
    db: Database | None = None
    environment = {
        "cpus (usable)": available_cpus(),
        "cpus (host)": os.cpu_count(),
        "memory": f"{psutil.virtual_memory().total / GIB:.0f} GiB",
        "python": platform.python_version(),
        "workers": args.workers,
        "batch size": args.batch_size,
    }
    if args.postgres_setting:
        environment["postgresql settings"] = ", ".join(args.postgres_setting)
    try:
        root, corpus = resolve_corpus(args, workdir)
        entries = list(iter_files(root))
        paths = [e.path for e in entries]
        log(f"corpus: {len(paths):,} files under {root}")
        if not paths:
            raise SystemExit(f"no files under {root}")
        if args.concurrent_runs:
            import bench_concurrency  # here: it imports this module

            return bench_concurrency.run(args, root, corpus, environment, workdir)
        warm_up_workers(root, args.workers)

        def measured(
            title: str, run: Callable[[], PhaseResult], reset: Callable[[], None] | None = None
        ) -> PhaseResult:
            """Run a phase; on a busy machine, again (up to --repeat-if-busy times), keeping the quietest run."""
            best: PhaseResult | None = None
            for attempt in range(1 + args.repeat_if_busy):
                log(
                    title
                    if attempt == 0
                    else f"{title}: again, the machine was busy (attempt {attempt + 1})"
                )
                waited = wait_for_quiet_machine(args.wait_for_quiet)
                if reset is not None and attempt > 0:
                    reset()
                result = run()
                result.note = "; ".join(filter(None, [result.note, waited]))
                share = busy_share(result, environment["cpus (usable)"])
                log(
                    f"  {result.files_per_second:,.1f} files/s, {result.elements_per_second:,.0f} elements/s"
                    + (f" (other processes used {share:.0%} of the CPUs)" if share > 0.01 else "")
                )
                if best is None or share < busy_share(best, environment["cpus (usable)"]):
                    best = result
                if share <= BUSY_SHARE:
                    break
            return best

        if not args.skip_parse_only:
            parse = measured(
                "phase 1: parse-only", lambda: run_parse_only(root, args.workers, args.batch_size)
            )
            phases.append(parse)

        if not args.skip_etl or args.baseline_files or args.end_to_end:
            db = Database(args.database_url, workdir, args.postgres_setting)
            with db.connect() as conn:
                environment["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
            setup = prepare_database(db, args.vocab_dir, corpus["patients"])

        if not args.skip_etl:
            etl = measured(
                "phase 2: ETL",
                lambda: run_etl(db, root, args.workers, args.batch_size, len(paths)),
                reset=lambda: prepare_database(db, args.vocab_dir, corpus["patients"]),
            )
            phases.append(etl)
            flat = flatness(etl, len(paths))
            db_rows = database_rows(db)
            log("phase 2b: ETL again on the same folder (nothing to do)")
            rerun = run_etl(
                db,
                root,
                args.workers,
                args.batch_size,
                len(paths),
                label="ETL re-run (every file already done)",
            )
            rerun.elements = 0
            phases.append(rerun)

            if not args.skip_measurements_comparison:
                # Fresh schemas (not timed), then the same ETL with measurements off, right
                # after the run with them: the machine's speed drifts less in between.
                def fresh() -> None:
                    prepare_database(db, args.vocab_dir, corpus["patients"])

                fresh()
                off = measured(
                    "phase 2c: ETL with measurements off",
                    lambda: run_etl(
                        db,
                        root,
                        args.workers,
                        args.batch_size,
                        len(paths),
                        label="ETL, measurements off",
                        analytics=AnalyticsOptions(enabled=False),
                    ),
                    reset=fresh,
                )
                phases.append(off)
                measurements = measurements_comparison(etl, off, environment["cpus (usable)"])
                log(
                    f"  measurements on {measurements['files_per_second_on']:,.1f} files/s, off "
                    f"{measurements['files_per_second_off']:,.1f} files/s: on/off "
                    f"{measurements['ratio_on_off'] or 0:.2f}x, cost {measurements['cost_percent'] or 0:.1f}%; "
                    f"measurement rows {measurements['measurement_rows_on']:,} / "
                    f"{measurements['measurement_rows_off']:,}, image_feature rows "
                    f"{measurements['image_feature_rows_on']:,} / {measurements['image_feature_rows_off']:,}"
                )

        if not args.skip_etl:
            settle_database(db)

        if args.baseline_files:
            subset = spread_subset(paths, args.baseline_files)
            row = measured(
                f"phase 3: row-at-a-time baseline on {len(subset):,} files",
                lambda: run_baseline(db, subset, with_mapping=bool(corpus["patients"])),
                reset=lambda: recreate_baseline_schema(db),
            )
            phases.append(row)

        if args.skip_orthanc:
            orthanc_note = "skipped (--skip-orthanc)"
        elif orthanc_binary() is None:
            orthanc_note = "skipped: no Orthanc binary on PATH (Debian: apt-get install orthanc)"
        else:
            orthanc = measured(
                f"phase 4: Orthanc REST ingest of {len(paths):,} files",
                lambda: run_orthanc(
                    paths, parse.elements if parse else 0, args.orthanc_clients, workdir
                ),
            )
            phases.append(orthanc)
        if args.end_to_end:
            import bench_end_to_end  # here: it imports this module

            earlier = {"parse": parse, "etl": etl, "orthanc": orthanc}
            end_to_end = bench_end_to_end.run(
                args, db, root, corpus, paths, measured, workdir, earlier
            )
            phases.extend(end_to_end.phases)
    finally:
        if db is not None:
            db.close()
        shutil.rmtree(workdir, ignore_errors=True)

    report = markdown(
        args,
        corpus,
        phases,
        etl,
        parse,
        row,
        orthanc,
        orthanc_note,
        flat,
        rerun,
        db_rows,
        setup,
        environment,
        measurements,
    ) + ("\n\n" + end_to_end.markdown() if end_to_end else "")
    print(report)
    if args.output:
        args.output.write_text(report + "\n")
    if args.json:

        def plain(p: PhaseResult) -> dict:
            extra = {k: v for k, v in p.extra.items() if k not in ("marks", "started")}
            if "marks" in p.extra:  # per batch, relative to the phase start
                extra["batches_detail"] = [
                    {**m.__dict__, "at": round(m.at - p.extra["started"], 3)}
                    for m in p.extra["marks"]
                ]
            return {
                **{
                    k: getattr(p, k)
                    for k in (
                        "name",
                        "files",
                        "files_ok",
                        "elements",
                        "seconds",
                        "peak_rss",
                        "cpu",
                        "rows",
                        "note",
                    )
                },
                "files_per_second": p.files_per_second,
                "elements_per_second": p.elements_per_second,
                "extra": extra,
            }

        args.json.write_text(
            json.dumps(
                {
                    "command": args.command,
                    "environment": environment,
                    "corpus": corpus,
                    "phases": [plain(p) for p in phases],
                    "flatness": flat,
                    "database_rows": db_rows,
                    "measurements_comparison": measurements,
                    "end_to_end": end_to_end.summary if end_to_end else None,
                    "setup_seconds": setup,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
