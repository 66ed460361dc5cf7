"""Four ingest processes at once over overlapping and disjoint folders of one database.

Two runs read the same folder (every file of it is met by both), two read folders of their
own, and one of those holds copies of another folder's files (the same SOP instances at other
paths: duplicates across runs). The tables then hold exactly what one run over the union
writes into another database, and while the runs went on, ``pg_stat_activity`` showed at
least two ``COPY ... dicom_file_metadata`` statements active at the same moment: batches COPY
their EAV rows before they take any lock (with the lock around the COPY, as before, no two
ever did, and this test fails). The run over a folder of its own never has a batch written
again under the schema's lock: batches lock only the studies, series and SOP instances they
decide about.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import psycopg
import pytest

from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster_tests.conftest import fresh_database, scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.reliability import hostile
from dicom_etl_dagster_tests.reliability.test_faults import MI, SCHEMAS, core_ingest
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

BATCH = 20
FILES_PER_FOLDER = 120  # 12 series of 10 files, 4 studies
APP = "parallel-writer"
TIMEOUT = 300  # seconds per process; generous: the machine may be busy

WRITER_SCRIPT = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    import psycopg
    from dicom_etl_dagster.core.db.identifiers import Schemas
    from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
    from dicom_etl_dagster.core.ingest.writer import PersonMapping

    if __name__ == "__main__":
        url, root, run_id = sys.argv[1], sys.argv[2], sys.argv[3]
        conn = psycopg.connect(url, autocommit=True, application_name={APP!r})
        state = prepare_run(conn, Schemas(), run_id, "use_id_zero",
                            PersonMapping("{MI}", "mappingtable", "source_person_id",
                                          "source_patient_id"),
                            lambda message: None)
        report = ingest_folder(conn, state, Path(root), {BATCH}, 1)[0]
        print("REWRITTEN", report.batches_rewritten_under_lock, flush=True)
""")


@pytest.fixture
def clean_database_url(postgres_server):
    with fresh_database(postgres_server, "t_union") as url:
        yield url


def _corpus(root: Path) -> list[Path]:
    """Folders a, b, c of fresh instances; b/zz_copies holds a's first series again (walked last in b: a's runs ingest them first, as the run over the union does)."""
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in "abc":
            files += hostile.clean_folder(root / name, FILES_PER_FOLDER)
    shutil.copytree(root / "a" / "s0000", root / "b" / "zz_copies")
    return files


class CopySampler(threading.Thread):
    """Polls pg_stat_activity: the most EAV COPYs of the writers active at one moment."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.most, self.samples = url, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                active = scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND state = 'active' AND query ILIKE 'COPY %%dicom_file_metadata%%'",
                    [APP],
                )
                self.most = max(self.most, active)
                self.samples += 1
                self.stop.wait(0.002)


def test_parallel_writers_write_what_one_run_over_the_union_writes(
    database_url, clean_database_url, tmp_path
):
    root = tmp_path / "dicom"
    files = _corpus(root)
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_tables(conn, SCHEMAS)
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    folders = ["a", "a", "b", "c"]  # a twice: overlapping; b and c: disjoint
    sampler = CopySampler(database_url)
    sampler.start()
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), database_url, str(root / name), f"run{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, name in enumerate(folders)
    ]
    outputs = [w.communicate(timeout=TIMEOUT)[0] for w in writers]
    sampler.stop.set()
    sampler.join()
    for w, out in zip(writers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
        assert "REWRITTEN" in out
    # c shares no file, series or study with the others: its keyed locks never met theirs, no
    # unique index refused it, so none of its batches was written again under the schema lock.
    assert "REWRITTEN 0\n" in outputs[3], outputs[3][-3000:]

    core_ingest(clean_database_url, root, "union")
    with (
        psycopg.connect(database_url, autocommit=True) as got_conn,
        psycopg.connect(clean_database_url, autocommit=True) as want_conn,
    ):
        assert_ids_consistent(got_conn, SCHEMAS)
        got, want = table_content(got_conn, SCHEMAS), table_content(want_conn, SCHEMAS)
        for table in want:
            assert got[table] == want[table], f"{table} differs from one run over the union"
        ingested = [
            r[0]
            for r in got_conn.execute(
                f"SELECT sop_instance_uid FROM {MI}.dicom_ingest_log WHERE status = 'ingested'"
            ).fetchall()
        ]
        assert len(ingested) == len(set(ingested)) == len(files)
        copies = len(list((root / "b" / "zz_copies").iterdir()))
        assert (
            scalar(got_conn, f"SELECT count(*) FROM {MI}.dicom_ingest_log") == len(files) + copies
        )
        assert (
            scalar(
                got_conn, f"SELECT count(*) FROM {MI}.dicom_ingest_log WHERE status = 'duplicate'"
            )
            == copies
        )
        assert scalar(got_conn, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == sum(
            expected_metadata_rows(p) for p in files
        )
        assert scalar(
            got_conn, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.dicom_file_metadata"
        ) == len(files)
        assert scalar(got_conn, f"SELECT count(*) FROM {MI}.image_occurrence") == len(files) // 10
        assert (
            scalar(got_conn, "SELECT count(*) FROM cdmdefault.procedure_occurrence")
            == len(files) // 30
        )
        # The writers of b and c, and of a at least one (the other may find all done).
        run_ids = {
            r[0] for r in got_conn.execute(f"SELECT DISTINCT run_id FROM {MI}.dicom_ingest_log")
        }
        assert {"run2", "run3"} <= run_ids and run_ids & {"run0", "run1"}
    assert sampler.samples > 10
    assert sampler.most >= 2, f"at most {sampler.most} EAV COPY active at once"
