"""The folder walk: every regular file once, the receiver's unfinished parts never."""

from __future__ import annotations

from dicom_etl_dagster.core.ingest.file_scan import count_files, iter_files
from dicom_etl_dagster.receiver.store import PART_SUFFIX, STAGING_FOLDER


def test_files_being_received_are_passed_over(tmp_path):
    (tmp_path / "1.2" / "1.2.3").mkdir(parents=True)
    (tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm").write_bytes(b"x")
    (tmp_path / "notes").write_bytes(b"y")
    staging = tmp_path / STAGING_FOLDER
    staging.mkdir()
    (staging / f"1.2.3.5{PART_SUFFIX}").write_bytes(b"half an instance")
    # A folder of that name deeper down is the receiver's too (its --folder may be a subfolder).
    (tmp_path / "1.2" / STAGING_FOLDER).mkdir()
    (tmp_path / "1.2" / STAGING_FOLDER / f"x{PART_SUFFIX}").write_bytes(b"z")

    found = sorted(entry.path for entry in iter_files(tmp_path))

    assert found == [str(tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm"), str(tmp_path / "notes")]
    assert count_files(tmp_path) == 2
