#!/usr/bin/env python3
"""Concurrent ingest runs against one PostgreSQL (``benchmark.py --concurrent-runs 1,2,4``).

For each N: fresh schemas, the corpus split into N disjoint folders (hard links), N child
processes (each ``benchmark.run_etl`` = ``prepare_run`` + ``ingest_folder``, each with its own
parse pool) released together, and a sampler polling ``pg_stat_activity`` / ``pg_locks``
every ~50 ms for the children's backends. Reports files/s (together and per run), the share
of active-backend samples that wait for a lock, the share of COPY samples with two or more
``COPY ... dicom_file_metadata`` at once, dicom_file_metadata bytes per file (table and
indexes, summed over ``pg_partition_tree``) and CPU per row over the first/last 10%.

Run as a child: ``bench_concurrency.py --child SPEC.json`` (the parent writes SPEC.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import benchmark  # noqa: E402

from dicom_etl_dagster.core.db.connection import APPLICATION_NAME  # noqa: E402
from dicom_etl_dagster.core.ingest.file_scan import iter_files  # noqa: E402

SAMPLE_SECONDS = 0.05
SAMPLER_APPLICATION = "dicom_etl_bench_sampler"
ETL_APPLICATION = APPLICATION_NAME  # benchmark.run_etl connects as the job does
READY_TIMEOUT_SECONDS = 600

# One row per ETL backend of this database: active?, waiting for a lock?, in a metadata COPY?,
# and for a waiting backend what it waits for: the ungranted lock (an advisory lock's
# objsubid tells the one-key locks, 1, from the keyed item locks, 2) and the statement.
ACTIVITY_QUERY = r"""
SELECT a.state = 'active',
       a.state = 'active' AND (a.wait_event_type = 'Lock'
           OR EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)),
       a.state = 'active' AND a.query ILIKE 'copy%%dicom_file_metadata%%',
       CASE WHEN a.state = 'active' AND a.wait_event_type = 'Lock' THEN concat_ws(' | ',
           (SELECT string_agg(DISTINCT concat_ws(' ', l.locktype, l.mode,
                       CASE WHEN l.locktype = 'advisory' THEN 'keys=' || l.objsubid END,
                       l.relation::regclass::text), ', ')
              FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted),
           left(regexp_replace(a.query, '\s+', ' ', 'g'), 60)) END
FROM pg_stat_activity a
WHERE a.application_name = %s AND a.datname = current_database() AND a.pid <> pg_backend_pid()
"""

# dicom_file_metadata and, when partitioned, its partitions: pg_partition_tree lists no rows
# for a plain table, so the table itself is added (a partitioned parent has no storage).
SIZE_QUERY = """
WITH metadata AS (SELECT format('%%I.%%I', %s::text, 'dicom_file_metadata')::regclass AS relid),
tree AS (SELECT relid FROM metadata
         UNION SELECT t.relid FROM metadata, pg_partition_tree(metadata.relid) t)
SELECT coalesce(sum(pg_table_size(relid)), 0)::bigint,
       coalesce(sum(pg_indexes_size(relid)), 0)::bigint,
       coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
FROM tree
"""


def split_corpus(root: Path, runs: int, into: Path) -> list[Path]:
    """``runs`` disjoint folders holding the corpus between them (contiguous slices of the
    sorted paths, so a series stays in one run, as separate folders of separate runs would).
    Hard links: no copy of the bytes; a copy where the file system refuses links."""
    paths = sorted(Path(e.path) for e in iter_files(root))
    folders = [into / f"run-{i}" for i in range(runs)]
    for i, folder in enumerate(folders):
        for path in paths[i * len(paths) // runs : (i + 1) * len(paths) // runs]:
            target = folder / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        folder.mkdir(parents=True, exist_ok=True)  # an empty slice is still a folder
    return folders


@dataclass
class Samples:
    """What the sampler saw, summed over its ticks."""

    ticks: int = 0
    active: int = 0  # backend-samples in state 'active'
    waiting: int = 0  # of which waiting for a lock
    copy_ticks: int = 0  # ticks with at least one metadata COPY running
    overlap_ticks: int = 0  # ticks with two or more
    max_copies: int = 0
    max_waiting: int = 0
    waits_for: Counter[str] = field(default_factory=Counter)  # lock and statement → samples

    def add(self, rows: list[tuple]) -> None:
        self.ticks += 1
        active = sum(1 for r in rows if r[0])
        waiting = sum(1 for r in rows if r[1])
        copies = sum(1 for r in rows if r[2])
        self.waits_for.update(r[3] for r in rows if r[3])
        self.active += active
        self.waiting += waiting
        self.copy_ticks += copies >= 1
        self.overlap_ticks += copies >= 2
        self.max_copies = max(self.max_copies, copies)
        self.max_waiting = max(self.max_waiting, waiting)

    def summary(self) -> dict:
        return {
            "ticks": self.ticks,
            "active_backend_samples": self.active,
            "lock_waiting_samples": self.waiting,
            "lock_wait_share": self.waiting / self.active if self.active else 0.0,
            "copy_ticks": self.copy_ticks,
            "overlapping_copy_ticks": self.overlap_ticks,
            "overlapping_copy_share": self.overlap_ticks / self.copy_ticks
            if self.copy_ticks
            else 0.0,
            "max_concurrent_copies": self.max_copies,
            "max_waiting_backends": self.max_waiting,
            "waits_for": dict(self.waits_for.most_common(8)),
        }


@dataclass
class Sampler:
    """Polls the ETL's backends every ``SAMPLE_SECONDS`` in a thread, on its own session."""

    url: str
    samples: Samples = field(default_factory=Samples)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._conn = psycopg.connect(
            self.url, autocommit=True, application_name=SAMPLER_APPLICATION
        )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            rows = self._conn.execute(ACTIVITY_QUERY, [ETL_APPLICATION]).fetchall()
            self.samples.add(rows)
            self._stop.wait(SAMPLE_SECONDS)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._conn.close()


def metadata_size(db: benchmark.Database) -> dict[str, int]:
    with db.connect() as conn:
        table, indexes, total = conn.execute(
            SIZE_QUERY, [benchmark.SCHEMAS.medical_imaging]
        ).fetchone()
    return {"table_bytes": table, "index_bytes": indexes, "total_bytes": total}


# ---------------------------------------------------------------------------------------------
# The child: one ingest run, released by the parent's go file
# ---------------------------------------------------------------------------------------------
class _RunDatabase(benchmark.Database):
    """The parent's PostgreSQL: the backend's CPU is this run's (``postmaster_pid`` lets
    run_etl find it), but no process group over all of PostgreSQL, which the other runs'
    backends share."""

    def __init__(self, url: str, postmaster_pid: int | None) -> None:
        super().__init__(url, Path("."))
        self.postmaster_pid = postmaster_pid

    def group(self) -> None:  # type: ignore[override]
        return None


def _cost_fields(costs: dict | None) -> dict | None:
    if not costs:
        return None
    keys = ("main_us_per_row", "backend_us_per_row", "own_us_per_row", "other_share")
    return {k: costs[k] for k in keys}


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    root = Path(spec["root"])
    db = _RunDatabase(spec["url"], spec["postmaster_pid"])
    total = sum(1 for _ in iter_files(root))
    benchmark.warm_up_workers(root, spec["workers"])  # the parse pool starts before the go
    Path(spec["ready"]).touch()
    go = Path(spec["go"])
    while not go.exists():
        time.sleep(0.01)
    started = time.time()
    result = benchmark.run_etl(
        db, root, spec["workers"], spec["batch_size"], total, label=spec["label"]
    )
    ended = time.time()
    flat = benchmark.flatness(result, total)
    out = {
        "label": spec["label"],
        "files": result.files,
        "files_ok": result.files_ok,
        "elements": result.elements,
        "seconds": result.seconds,
        "wall_start": started,
        "wall_end": ended,
        "files_per_second": result.files_per_second,
        "status": result.extra.get("status"),
        "cpu": result.cpu,
        "note": result.note,
        "first_costs": _cost_fields(flat and flat["first_costs"]),
        "last_costs": _cost_fields(flat and flat["last_costs"]),
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: N children per count, sampled, then sized
# ---------------------------------------------------------------------------------------------
def _start_children(db: benchmark.Database, args, folders: list[Path], work: Path) -> list:
    """One child per folder, each started and waiting for the go file; returns (process, result path)."""
    children = []
    for i, folder in enumerate(folders):
        spec = {
            "url": db.url,
            "postmaster_pid": db.postmaster_pid,
            "root": str(folder),
            "workers": args.workers,
            "batch_size": args.batch_size,
            "label": f"run {i + 1}/{len(folders)}",
            "ready": str(work / f"ready-{i}"),
            "go": str(work / "go"),
            "result": str(work / f"result-{i}.json"),
        }
        spec_path = work / f"spec-{i}.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__)), "--child", str(spec_path)]
        children.append((subprocess.Popen(command), Path(spec["result"]), Path(spec["ready"])))
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not all(ready.exists() for _, _, ready in children):
        if any(p.poll() is not None for p, _, _ in children) or time.monotonic() > deadline:
            for p, _, _ in children:
                p.kill()
            raise RuntimeError("a concurrent run did not get ready")
        time.sleep(0.05)
    return children


def run_count(
    db: benchmark.Database, args, root: Path, patients: int, runs: int, workdir: Path
) -> dict:
    """Fresh schemas, ``runs`` children over disjoint folders, released together."""
    benchmark.log(f"concurrent runs: N={runs}")
    benchmark.prepare_database(db, args.vocab_dir, patients)
    work = workdir / f"concurrent-{runs}"
    folders = split_corpus(root, runs, work / "corpus")
    children = _start_children(db, args, folders, work)
    with Sampler(db.url) as sampler:
        (work / "go").touch()
        codes = [p.wait() for p, _, _ in children]
    if any(codes):
        raise RuntimeError(f"concurrent runs exited with {codes}")
    results = [json.loads(path.read_text()) for _, path, _ in children]
    shutil.rmtree(work / "corpus", ignore_errors=True)
    wall = max(r["wall_end"] for r in results) - min(r["wall_start"] for r in results)
    files_ok = sum(r["files_ok"] for r in results)
    rows = benchmark.database_rows(db)
    size = metadata_size(db)
    files_logged = rows["dicom_ingest_log"]
    return {
        "runs": runs,
        "files": sum(r["files"] for r in results),
        "files_ok": files_ok,
        "wall_seconds": wall,
        "files_per_second": files_ok / wall if wall > 0 else 0.0,
        "per_run": results,
        "locks": sampler.samples.summary(),
        "database_rows": rows,
        "dicom_file_metadata": {
            **size,
            "rows": rows["dicom_file_metadata"],
            "bytes_per_file": size["total_bytes"] / files_logged if files_logged else 0.0,
            "table_bytes_per_file": size["table_bytes"] / files_logged if files_logged else 0.0,
            "index_bytes_per_file": size["index_bytes"] / files_logged if files_logged else 0.0,
        },
    }


def _us(costs: dict | None, key: str) -> str:
    return f"{costs[key]:,.1f}" if costs else "n/a"


def markdown(report: dict) -> str:
    out = [
        "## Concurrent ingest runs (one PostgreSQL, disjoint folders)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Corpus: {report['corpus']}",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()),
        "",
        "| N | files | wall s | files/s (all) | files/s per run | lock-wait share | "
        "overlapping COPY share | max COPYs at once | metadata B/file (table + indexes) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["counts"]:
        locks, meta = c["locks"], c["dicom_file_metadata"]
        per_run = ", ".join(f"{r['files_per_second']:,.1f}" for r in c["per_run"])
        out.append(
            f"| {c['runs']} | {c['files_ok']:,} | {c['wall_seconds']:,.1f} | "
            f"{c['files_per_second']:,.1f} | {per_run} | {locks['lock_wait_share']:.1%} | "
            f"{locks['overlapping_copy_share']:.1%} ({locks['copy_ticks']:,} COPY samples) | "
            f"{locks['max_concurrent_copies']} | {meta['bytes_per_file']:,.0f} "
            f"({meta['table_bytes_per_file']:,.0f} + {meta['index_bytes_per_file']:,.0f}) |"
        )
    out += [
        "",
        "CPU µs per dicom_file_metadata row, first → last 10% of each run "
        "(main process / its PostgreSQL backend / main + parse workers):",
        "",
        "| N | run | files | main | backend | main + workers |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["counts"]:
        for r in c["per_run"]:
            first, last = r["first_costs"], r["last_costs"]
            cells = [
                f"{_us(first, k)} → {_us(last, k)}"
                for k in ("main_us_per_row", "backend_us_per_row", "own_us_per_row")
            ]
            out.append(
                f"| {c['runs']} | {r['label']} | {r['files_ok']:,} | " + " | ".join(cells) + " |"
            )
    out += ["", "What the waiting backends waited for (lock, statement: samples):", ""]
    for c in report["counts"]:
        waits = c["locks"]["waits_for"]
        out += [f"- N={c['runs']}: " + ("; ".join(f"{k}: {v}" for k, v in waits.items()) or "—")]
    out += [
        "",
        f"Lock-wait share: ETL backend samples (every {SAMPLE_SECONDS * 1000:.0f} ms) in state "
        "active that wait for a lock (wait_event_type Lock or an ungranted pg_locks row) ÷ "
        "active backend samples. Overlapping COPY share: samples with ≥2 backends in "
        "`COPY … dicom_file_metadata` ÷ samples with ≥1. Bytes per file: pg_table_size / "
        "pg_indexes_size summed over pg_partition_tree(dicom_file_metadata) ÷ files in the "
        "ingest log. Fresh schemas per N. CPU n/a: a run of fewer than 3 batches. main and "
        "backend are read at every batch; main + workers is the sampler's coarser figure "
        "(the process list is refreshed once a second).",
    ]
    return "\n".join(out)


def run(args, root: Path, corpus: dict, environment: dict, workdir: Path) -> int:
    """The --concurrent-runs benchmark: every count in turn, then the report (markdown, JSON)."""
    db = benchmark.Database(args.database_url, workdir, args.postgres_setting)
    try:
        with db.connect() as conn:
            environment["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
        counts = [
            run_count(db, args, root, corpus["patients"], n, workdir) for n in args.concurrent_runs
        ]
    finally:
        db.close()
    report = {
        "command": " ".join(map(str, args.command)),
        "environment": environment,
        "corpus": corpus["description"],
        "counts": counts,
    }
    text = markdown(report)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(child_main(Path(sys.argv[2])))
