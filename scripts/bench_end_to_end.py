#!/usr/bin/env python3
"""The end-to-end and pydicom phases of ``benchmark.py --end-to-end``.

- pydicom parse: every file read with ``pydicom.dcmread(path, stop_before_pixels=True)`` and
  converted with ``Dataset.to_json_dict()`` (the least a pydicom-based ETL must do to store
  every element), in a process pool of the parse-only phase's worker count, started and
  warmed up before the clock starts. No database.
- end to end: the user's command, ``dagster job execute -m dicom_etl_dagster.definitions -j
  ingest_metadata -c config.json``, as a subprocess with a throwaway ``DAGSTER_HOME`` and
  ``DICOM_ETL_DATABASE_URL`` pointing at the benchmark's PostgreSQL, into fresh schemas
  ``dicom_etl_bench_e2e_*`` whose tables, DICOM2OMOP vocabulary and person mapping are
  prepared first (not timed; a user runs ``load_vocab`` once). Timed from process start to
  exit: Python and Dagster start-up, definitions, run storage, the ingest, the asset checks.
  files/s = corpus files / wall seconds. The run counts only when it exits 0 and its ledger
  (``dicom_ingest_log``) holds one row per corpus file.

The issue's targets: end to end >= 1.5x Orthanc's REST ingest and >= 1.2x the pydicom parse.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchmark
from psycopg import sql

from dicom_etl_dagster.core.cpu import available_cpus
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.ingest.writer import PersonMapping
from dicom_etl_dagster.core.vocabulary import loader as vocabulary_loader

SCHEMAS = Schemas(
    cdm="dicom_etl_bench_e2e_cdm",
    vocab="dicom_etl_bench_e2e_vocab",
    medical_imaging="dicom_etl_bench_e2e_mi",
)
MAPPING = PersonMapping(
    SCHEMAS.medical_imaging, "mappingtable", "source_person_id", "source_patient_id"
)
TARGETS = {"end_to_end_vs_orthanc": 1.5, "end_to_end_vs_pydicom": 1.2}
JOB_DEFAULT_BATCH_SIZE = 500  # EtlOptions.ingest_batch_size
LOG_TAIL_CHARS = 3000


# ---------------------------------------------------------------------------------------------
# pydicom parse
# ---------------------------------------------------------------------------------------------
def _count_elements(dataset_json: dict[str, Any]) -> int:
    """Elements of a ``to_json_dict()``, nested sequence items included (as the EAV counts)."""
    count = 0
    for element in dataset_json.values():
        count += 1
        if element.get("vr") == "SQ":
            count += sum(_count_elements(item) for item in element.get("Value") or ())
    return count


def _pydicom_chunk(paths: list[str]) -> tuple[int, int, dict[str, int]]:
    """Files read and converted, their elements, failures by exception type."""
    import pydicom

    ok = elements = 0
    failures: Counter[str] = Counter()
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            elements += _count_elements(dataset.to_json_dict())
            ok += 1
        except Exception as error:  # a file pydicom cannot read is a failure, not a crash
            failures[type(error).__name__] += 1
    return ok, elements, dict(failures)


def _warm_up(_: int) -> None:
    import pydicom  # noqa: F401  (imported once per worker, before the clock starts)

    time.sleep(0.2)  # long enough that every worker of the pool gets one of these


def run_pydicom_parse(paths: list[str], workers: int, batch_size: int) -> benchmark.PhaseResult:
    result = benchmark.PhaseResult(
        f"pydicom parse (dcmread stop_before_pixels + to_json_dict, {workers} workers)"
    )
    chunk = max(1, min(batch_size, math.ceil(len(paths) / (4 * workers))))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    failures: Counter[str] = Counter()
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(_warm_up, range(workers)))
        with benchmark.Watch([benchmark.etl_group()]) as watch:
            started = time.perf_counter()
            for ok, elements, failed in pool.map(_pydicom_chunk, chunks):
                result.files_ok += ok
                result.elements += elements
                failures.update(failed)
            result.seconds = time.perf_counter() - started
    result.files = len(paths)
    result.peak_rss = watch.peak("etl")
    result.cpu = {
        "main": watch.main_cpu_seconds,
        "workers": max(0.0, watch.cpu("etl") - watch.main_cpu_seconds),
        "other processes": watch.other_cpu_seconds,
    }
    if failures:
        result.note = f"{sum(failures.values())} files not readable by pydicom"
        result.extra["failures"] = dict(failures)
    return result


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def prepare_schemas(db: benchmark.Database, vocab_dir: Path | None, patients: int) -> float:
    """Fresh e2e schemas with tables, vocabulary and person mapping; returns the seconds."""
    started = time.perf_counter()
    with db.connect() as conn:
        for schema in (SCHEMAS.cdm, SCHEMAS.vocab, SCHEMAS.medical_imaging):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        ensure_tables(conn, SCHEMAS)
        for spec in vocabulary_loader.VOCABULARY_TABLES:
            vocabulary_loader.load_table(conn, SCHEMAS, spec, truncate=False, folder=vocab_dir)
        vocabulary_loader.load_data_elements(conn, SCHEMAS, truncate=False, folder=vocab_dir)
        table = sql.Identifier(MAPPING.schema, MAPPING.table)
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} integer NOT NULL, {} varchar(50) NOT NULL)").format(
                table, sql.Identifier(MAPPING.person_column), sql.Identifier(MAPPING.patient_column)
            )
        )
        with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
            for number in range(1, patients + 1):
                copy.write_row((number, benchmark.make_corpus.patient_id(number)))
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def job_options(root: Path, workers: int, batch_size: int) -> dict:
    """The run's options document: the folder, no upload, the e2e schemas and mapping; the
    worker count and batch size only where the benchmark's differ from the job's defaults."""
    options: dict[str, Any] = {
        "dicom_files_abs_path": str(root),
        "upload_files": False,
        "cdm_schema_name": SCHEMAS.cdm,
        "vocab_schema_name": SCHEMAS.vocab,
        "medical_imaging_schema_name": SCHEMAS.medical_imaging,
        "person_to_patient_mapping": {
            "schema_name": MAPPING.schema,
            "table_name": MAPPING.table,
            "person_id_column_name": MAPPING.person_column,
            "patient_id_column_name": MAPPING.patient_column,
        },
    }
    if workers != available_cpus():
        options["parse_workers"] = workers
    if batch_size != JOB_DEFAULT_BATCH_SIZE:
        options["ingest_batch_size"] = batch_size
    return {"options": options}


def dagster_command(config: Path) -> list[str]:
    """``dagster job execute``: the console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "dagster"
    binary = str(beside) if beside.exists() else shutil.which("dagster") or "dagster"
    return [binary, "job", "execute", "-m", "dicom_etl_dagster.definitions"] + [
        "-j",
        "ingest_metadata",
        "-c",
        str(config),
    ]


def ledger_counts(db: benchmark.Database) -> tuple[dict[str, int], dict[str, int]]:
    """The ledger's rows by status, and the rows of the OMOP tables, in the e2e schemas."""
    mi, cdm = SCHEMAS.medical_imaging, SCHEMAS.cdm
    with db.connect() as conn:
        by_status = dict(
            conn.execute(
                sql.SQL("SELECT status, count(*) FROM {} GROUP BY status").format(
                    sql.Identifier(mi, "dicom_ingest_log")
                )
            ).fetchall()
        )
        tables = {
            table: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            ).fetchone()[0]
            for schema, table in (
                (cdm, "procedure_occurrence"),
                (mi, "image_occurrence"),
                (mi, "dicom_file_metadata"),
                (cdm, "measurement"),
            )
        }
    return by_status, tables


def run_end_to_end(
    db: benchmark.Database, root: Path, files: int, workers: int, batch_size: int, workdir: Path
) -> benchmark.PhaseResult:
    """``dagster job execute ... -j ingest_metadata`` once, timed from start to exit."""
    result = benchmark.PhaseResult("end to end (dagster job execute -j ingest_metadata)")
    folder = Path(tempfile.mkdtemp(prefix="end_to_end_", dir=workdir))
    home = folder / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").touch()  # Dagster's defaults: SQLite run storage in the folder
    config = folder / "config.json"
    options = job_options(root, workers, batch_size)
    config.write_text(json.dumps(options))
    command = dagster_command(config)
    env = {**os.environ, "DAGSTER_HOME": str(home), "DICOM_ETL_DATABASE_URL": db.url}
    holder: list[int] = []
    groups = [benchmark.ProcessGroup("dagster", lambda: holder[0] if holder else None)]
    groups += [db.group()] if db.group() else []
    with open(folder / "dagster.log", "wb") as output, benchmark.Watch(groups) as watch:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=benchmark.REPO_ROOT,
            env=env,
        )  # fmt: skip
        holder.append(process.pid)
        exit_code = process.wait()
        result.seconds = time.perf_counter() - started
    by_status, tables = ledger_counts(db)
    ledger_rows = sum(by_status.values())
    result.files = files
    result.files_ok = by_status.get("ingested", 0) + by_status.get("duplicate", 0)
    result.elements = tables["dicom_file_metadata"]
    result.rows = sum(tables.values()) + ledger_rows
    result.peak_rss = watch.peak("dagster")
    result.cpu = {"dagster (CLI, run, parse workers)": watch.cpu("dagster")}
    if db.group():
        result.cpu["postgres"] = watch.cpu("postgres")
    result.cpu["other processes"] = watch.other_cpu_seconds
    succeeded = exit_code == 0 and ledger_rows == files
    result.extra.update(
        command=command, options=options, exit_code=exit_code, ledger_rows=ledger_rows,
        ledger_by_status=by_status, rows_by_table=tables, succeeded=succeeded,
    )  # fmt: skip
    if not succeeded:
        tail = (folder / "dagster.log").read_text(errors="replace")[-LOG_TAIL_CHARS:]
        benchmark.log(f"  end to end FAILED (exit {exit_code}, {ledger_rows} ledger rows):\n{tail}")
        result.note = (
            f"**run failed**: exit {exit_code}, ledger {ledger_rows:,} rows of {files:,} files"
        )
        result.extra["log_tail"] = tail
    return result


# ---------------------------------------------------------------------------------------------
# Both phases, their ratios and the report
# ---------------------------------------------------------------------------------------------
def _ratio(a: benchmark.PhaseResult | None, b: benchmark.PhaseResult | None) -> float | None:
    if a is None or b is None or not b.files_per_second or not a.files_per_second:
        return None
    return a.files_per_second / b.files_per_second


@dataclass
class EndToEnd:
    """The two phases' results and what the report and the JSON say about them."""

    phases: list[benchmark.PhaseResult]
    summary: dict

    def markdown(self) -> str:
        s = self.summary
        out = ["### End to end (`--end-to-end`)\n"]
        out.append(
            f"Command (timed from start to exit): `{shlex.join(s['command'])}`, with "
            "`DAGSTER_HOME` a fresh temporary folder (empty `dagster.yaml`) and "
            "`DICOM_ETL_DATABASE_URL` the benchmark's PostgreSQL\n"
        )
        out.append(f"config.json: `{json.dumps(s['options'])}`\n")
        out.append(
            f"Run: exit code {s['exit_code']}, ledger rows {s['ledger_rows']:,} of "
            f"{s['corpus_files']:,} corpus files {s['ledger_by_status']} "
            f"({'succeeded' if s['succeeded'] else '**FAILED**'})\n"
        )
        out.append("| comparison | measured | target | |")
        out.append("|---|---:|---:|---|")
        for key, name in (
            ("end_to_end_vs_orthanc", "end to end / Orthanc REST (files/s)"),
            ("end_to_end_vs_pydicom", "end to end / pydicom parse (files/s)"),
        ):
            value, target = s["ratios"][key], TARGETS[key]
            if value is None:
                out.append(f"| {name} | – | >= {target:g}x | not measured |")
            else:
                met = "met" if value >= target else "**NOT met**"
                out.append(f"| {name} | {value:,.2f}x | >= {target:g}x | {met} |")
        for key, name in (
            ("end_to_end_vs_etl", "end to end / ETL core (files/s)"),
            ("parse_only_vs_pydicom", "parse-only / pydicom parse (files/s)"),
        ):
            value = s["ratios"][key]
            out.append(f"| {name} | {'–' if value is None else f'{value:,.2f}x'} | | |")
        if s["fixed_seconds"] is not None:
            out.append(
                f"| end to end seconds - ETL core seconds (start-up, Dagster, asset checks) "
                f"| {s['fixed_seconds']:,.1f} s | | |"
            )
        out.append("")
        return "\n".join(out)


def summarise(
    e2e: benchmark.PhaseResult,
    pydicom: benchmark.PhaseResult,
    parse: benchmark.PhaseResult | None,
    etl: benchmark.PhaseResult | None,
    orthanc: benchmark.PhaseResult | None,
) -> dict:
    ok = e2e.extra["succeeded"]
    return {
        **{k: e2e.extra[k] for k in ("command", "options", "exit_code", "ledger_rows")},
        "ledger_by_status": e2e.extra["ledger_by_status"],
        "succeeded": ok,
        "corpus_files": e2e.files,
        "end_to_end_files_per_second": e2e.files / e2e.seconds if e2e.seconds else None,
        "pydicom_files_per_second": pydicom.files_per_second,
        "orthanc_files_per_second": orthanc.files_per_second if orthanc else None,
        "ratios": {
            "end_to_end_vs_orthanc": _ratio(e2e, orthanc) if ok else None,
            "end_to_end_vs_pydicom": _ratio(e2e, pydicom) if ok else None,
            "end_to_end_vs_etl": _ratio(e2e, etl) if ok else None,
            "parse_only_vs_pydicom": _ratio(parse, pydicom),
        },
        "targets": TARGETS,
        "fixed_seconds": e2e.seconds - etl.seconds if etl and ok else None,
    }


def run(
    args,
    db: benchmark.Database,
    root: Path,
    corpus: dict,
    paths: list[str],
    measured: Callable[..., benchmark.PhaseResult],
    workdir: Path,
    earlier: dict[str, benchmark.PhaseResult | None],
) -> EndToEnd:
    """The pydicom parse, then end to end (into fresh e2e schemas, again on a busy repeat);
    ``earlier``: the parse-only, ETL and Orthanc results of this invocation, or None."""
    pydicom = measured(
        "phase 5: pydicom parse (dcmread + to_json_dict)",
        lambda: run_pydicom_parse(paths, args.workers, args.batch_size),
    )

    def fresh() -> None:
        seconds = prepare_schemas(db, args.vocab_dir, corpus["patients"])
        benchmark.log(f"  fresh e2e schemas, tables, vocabulary, mapping: {seconds:.1f} s")

    fresh()
    e2e = measured(
        "phase 6: end to end (dagster job execute -j ingest_metadata)",
        lambda: run_end_to_end(db, root, len(paths), args.workers, args.batch_size, workdir),
        reset=fresh,
    )
    summary = summarise(
        e2e, pydicom, earlier.get("parse"), earlier.get("etl"), earlier.get("orthanc")
    )
    return EndToEnd([pydicom, e2e], summary)
