"""The parse workers' chunks: every file parsed, the acquisition profile once per series."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Parsed, parse_batches, parse_chunk
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
