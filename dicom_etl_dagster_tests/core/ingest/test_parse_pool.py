"""The parse workers' chunks: every file parsed, the acquisition profile once per series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pydicom
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import DataElementIds, fill
from dicom_etl_dagster.core.ingest.parse_pool import (
    WORKER_NICENESS,
    Failed,
    Parsed,
    parse_batches,
    parse_chunk,
)
from dicom_etl_dagster_tests.dicom_samples import clone_instance

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def _files(tmp_path: Path) -> list[FileEntry]:
    """Two series of two files each, interleaved, and a file that is not DICOM first."""
    (tmp_path / "0_not_dicom.dcm").write_bytes(b"not DICOM")
    entries = [FileEntry(str(tmp_path / "0_not_dicom.dcm"), 9, 0)]
    series = [generate_uid(), generate_uid()]
    for i in range(4):
        path = tmp_path / f"{i + 1}.dcm"
        clone_instance(CT_SMALL, path, SeriesInstanceUID=series[i % 2], StudyInstanceUID="1.2.3")
        entries.append(FileEntry(str(path), path.stat().st_size, 0))
    return entries


def test_a_chunk_profiles_the_first_file_of_each_series(tmp_path):
    results = parse_chunk(_files(tmp_path))
    assert isinstance(results[0], Failed)
    parsed = [r for r in results if isinstance(r, Parsed)]
    assert [bool(r.findings.acquisition) for r in parsed] == [True, True, False, False]
    assert all(r.findings.procedure_codes == () for r in parsed)
    without = [r for r in parse_chunk(_files(tmp_path), False) if isinstance(r, Parsed)]
    assert len(without) == 4 and not any(r.findings.acquisition for r in without)


def test_worker_chunks_give_every_file_in_order(tmp_path):
    entries = _files(tmp_path)
    (results,) = list(parse_batches([entries], workers=2))
    assert [r.entry for r in results] == entries
    # Each chunk profiles its own first file of a series: at least the batch's first ones.
    first_of_series = {}
    for r in results:
        if isinstance(r, Parsed):
            first_of_series.setdefault(r.instance.series_instance_uid, r)
    assert all(r.findings.acquisition for r in first_of_series.values())


MAIN_SCRIPT = """\
import os, sys
with open(sys.argv[1], "a") as imported_by:  # every process that runs this script says so
    imported_by.write(f"{os.getpid()}\\n")
if __name__ == "__main__":
    from dicom_etl_dagster.core.ingest.file_scan import FileEntry
    from dicom_etl_dagster.core.ingest.parse_pool import Parsed, parse_batches
    entries = [FileEntry(path, os.path.getsize(path), 0) for path in sys.argv[2:]]
    (results,) = parse_batches([entries], workers=2)
    assert all(isinstance(r, Parsed) for r in results), results
    print(os.getpid())
"""


def test_workers_do_not_run_the_parent_script_again(tmp_path):
    """Under ``dagster job execute`` the parent's script is the Dagster CLI: a worker that ran
    it again as ``__mp_main__`` paid for all of Dagster's imports before its first file."""
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    imported_by = tmp_path / "imported_by.txt"
    files = [str(e.path) for e in _files(tmp_path)[1:]]
    done = subprocess.run(
        [sys.executable, str(script), str(imported_by), *files],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert imported_by.read_text().split() == [done.stdout.strip()]  # the parent only


def test_workers_write_the_ids_of_the_entries_the_run_started_with(tmp_path):
    """Given the run's dictionary entries, the workers put their ids in the rows; the writer
    fills the rest. Filled, the rows are those of a render that left every id to the writer."""
    entries = _files(tmp_path)[1:]
    (plain,) = parse_batches([entries], workers=1)  # the main process: every id a field
    keys = [c[0] for c in plain[0].metadata.new_tag_candidates]
    known = {key: 1000 + n for n, key in enumerate(keys) if n % 2 == 0}  # half of them
    all_ids = DataElementIds({key: 1000 + n for n, key in enumerate(keys)})
    (given,) = parse_batches([entries], workers=2, known_entries=known)
    for with_ids, without in zip(given, plain, strict=True):
        assert "{d[" in with_ids.metadata.template  # the entries not given stay fields
        assert not any(f"{{d[{key}]}}" in with_ids.metadata.template for key in known)
        filled = [fill(r.metadata, 1, 1, 7, all_ids) for r in (with_ids, without)]
        assert filled[0] == filled[1]


def test_workers_give_the_writer_the_cpu_first(tmp_path):
    """The writer (this process, and its PostgreSQL backend) is the run's critical path: the
    workers run at a lower CPU priority than the process that started them."""
    entries = _files(tmp_path)
    batches = parse_batches([entries, entries, entries], workers=2)
    next(batches)  # the pool is up, a batch in flight
    me = psutil.Process()
    # The workers are forked by the forkserver, a child of this process like the resource tracker.
    workers = [worker for child in me.children() for worker in child.children()]
    assert len(workers) == 2
    assert {p.nice() for p in workers} == {me.nice() + WORKER_NICENESS}
    assert len(list(batches)) == 2
