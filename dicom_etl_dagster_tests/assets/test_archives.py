"""Zip and tar archives under the ingested folder, through the ingest_metadata job, into a real
PostgreSQL, and their members uploaded to a real Orthanc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_etl_dagster.core.ingest import archives, run
from dicom_etl_dagster.resources.dicom_server import DicomServerResource
from dicom_etl_dagster_tests.assets.test_imaging import file_metadata
from dicom_etl_dagster_tests.assets.test_upload import (
    FAST,
    failure_message,
    run_ingest,
    run_upload_alone,
    upload_metadata,
    upload_rows,
)
from dicom_etl_dagster_tests.conftest import fresh_database
from dicom_etl_dagster_tests.core.ingest.test_archives import sample, write_tar, write_zip
from dicom_etl_dagster_tests.helpers import ledger

MI = "cdmmedicalimaging"
IN_ZIP = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")
IN_TGZ = ("rtplan.dcm", "rtdose.dcm", "waveform_ecg.dcm")


def eav_counts(conn) -> dict[str, int]:
    """dicom_file_metadata rows per SOP instance."""
    return dict(
        conn.execute(
            f"SELECT sop_instance_id, count(*) FROM {MI}.dicom_file_metadata GROUP BY 1"
        ).fetchall()
    )


def ledger_rows(conn) -> list[tuple]:
    return conn.execute(
        f"SELECT file_path, file_size, file_mtime_ns, status, error_message, sop_instance_uid,"
        f" run_id, processed_at FROM {MI}.dicom_ingest_log ORDER BY file_path"
    ).fetchall()


def archive_folder(folder: Path) -> Path:
    """One zip (members in a sub-folder) and one tar.gz of pydicom's files, and a loose file."""
    (folder / "sub").mkdir(parents=True)
    write_zip(folder / "sub" / "study.zip", {f"a/{n}": sample(n) for n in IN_ZIP})
    write_tar(folder / "more.tar.gz", {f"b/{n}": sample(n) for n in IN_TGZ})
    (folder / "notes.txt").write_text("not a DICOM file\n")
    return folder


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The archives the ingest opens, in order."""
    paths: list[str] = []
    original = run.iter_members

    def recording(archive):
        paths.append(archive.path)
        return original(archive)

    monkeypatch.setattr(run, "iter_members", recording)
    return paths


def test_members_are_ingested_with_their_archive_paths_as_the_same_files_from_a_folder(
    postgres_server, database_url, db, tmp_path, opened
):
    folder = archive_folder(tmp_path / "dicom")
    # Two workers (members' bytes go through the pool) and batches of two: an archive's
    # members and its own row land in different transactions.
    result = run_ingest(database_url, None, folder, parse_workers=2, ingest_batch_size=2)
    assert result.success, failure_message(result)

    zip_path, tgz_path = str(folder / "sub" / "study.zip"), str(folder / "more.tar.gz")
    members = {f"{zip_path}!/a/{n}": n for n in IN_ZIP} | {f"{tgz_path}!/b/{n}": n for n in IN_TGZ}
    rows = ledger(db)
    assert set(rows) == set(members) | {zip_path, tgz_path, str(folder / "notes.txt")}
    for path in members:
        assert rows[path][0] == "ingested" and rows[path][2] is not None
    # An archive read to its end: ingested, no SOP instance of its own.
    assert rows[zip_path] == rows[tgz_path] == ("ingested", None, None, None)
    sizes = dict(db.execute(f"SELECT file_path, file_size FROM {MI}.dicom_ingest_log").fetchall())
    assert {p: sizes[p] for p in members} == {p: len(sample(n)) for p, n in members.items()}
    assert sizes[zip_path] == os.path.getsize(zip_path)
    assert opened == [tgz_path, zip_path]

    # The same files, loose in a folder, into another database: the same EAV rows per file.
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in IN_ZIP + IN_TGZ:
        (loose / name).write_bytes(sample(name))
    with fresh_database(postgres_server) as other_url:
        assert run_ingest(other_url, None, loose).success
        import psycopg

        with psycopg.connect(other_url) as other:
            from_folder = eav_counts(other)
    from_archives = eav_counts(db)
    assert len(from_folder) == 6 and all(count > 50 for count in from_folder.values())
    assert from_archives == from_folder

    # A re-run opens no archive and adds nothing.
    before, eav_rows = ledger_rows(db), sum(from_archives.values())
    opened.clear()
    again = run_ingest(database_url, None, folder)
    assert again.success
    assert opened == []
    # Every row as it was (run, time); only the failed loose file is tried and recorded again.
    assert [r for r in ledger_rows(db) if r[0] != str(folder / "notes.txt")] == [
        r for r in before if r[0] != str(folder / "notes.txt")
    ]
    assert sum(eav_counts(db).values()) == eav_rows
    metadata = file_metadata(again)
    assert (metadata["archives_skipped"], metadata["archives_read"]) == (2, 0)
    assert (metadata["files_seen"], metadata["files_already_done"]) == (3, 0)


def test_corrupt_archives_bombs_and_nested_archives_fail_with_reasons(
    database_url, db, tmp_path, opened, monkeypatch
):
    folder = tmp_path / "dicom"
    folder.mkdir()
    corrupt = folder / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    whole = write_tar(
        tmp_path / "whole.tgz",
        {"ct.dcm": sample("CT_small.dcm")}
        | {f"noise{i}.bin": os.urandom(100_000) for i in range(3)},
    )
    truncated = folder / "truncated.tgz"
    truncated.write_bytes(whole.read_bytes()[:200_000])
    bomb = write_zip(
        folder / "bomb.zip",
        {"zeros.dcm": bytes(64 * 1024**2), "mr.dcm": sample("MR_small.dcm")},
    )
    nested = write_zip(
        folder / "nested.zip",
        {"inner.tar.gz": whole.read_bytes(), "plan.dcm": sample("rtplan.dcm")},
    )
    big = write_tar(
        folder / "big.tar",
        {"dose.dcm": sample("rtdose.dcm"), "ecg.dcm": sample("waveform_ecg.dcm")},
        "w",
    )
    # A test-only member size limit, between rtdose's 7.6 kB and the ECG's 291 kB.
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 100_000)

    result = run_ingest(database_url, None, folder)
    assert result.success, failure_message(result)
    rows = ledger(db)
    status = {path: row[0] for path, row in rows.items()}
    assert status == {
        str(corrupt): "failed",
        str(truncated): "failed",
        f"{truncated}!/ct.dcm": "ingested",  # read before the damage
        f"{truncated}!/noise0.bin": "failed",  # not DICOM
        str(bomb): "ingested",
        f"{bomb}!/zeros.dcm": "failed",
        f"{bomb}!/mr.dcm": "ingested",
        str(nested): "ingested",
        f"{nested}!/inner.tar.gz": "failed",
        f"{nested}!/plan.dcm": "ingested",
        str(big): "ingested",
        f"{big}!/dose.dcm": "ingested",
        f"{big}!/ecg.dcm": "failed",
    }
    reasons = {path: row[1] for path, row in rows.items() if row[0] == "failed"}
    assert reasons[str(corrupt)].startswith("corrupt archive: cannot open zip: BadZipFile")
    assert (
        reasons[str(truncated)].startswith("corrupt archive: ")
        and "after 2 member(s)" in reasons[str(truncated)]
    )
    assert "(MAX_COMPRESSION_RATIO)" in reasons[f"{bomb}!/zeros.dcm"]
    assert reasons[f"{nested}!/inner.tar.gz"] == archives.NESTED_ARCHIVE_REASON
    assert reasons[f"{big}!/ecg.dcm"] == (
        "archive member of 291088 bytes exceeds the member size limit of 100000 bytes"
        " (MAX_MEMBER_BYTES)"
    )
    assert len(eav_counts(db)) == 4

    # Again: the archives read to their end stay closed; the corrupt ones are tried again,
    # and what they hold that was recorded is not recorded twice.
    before = {r[0]: r for r in ledger_rows(db)}
    opened.clear()
    assert run_ingest(database_url, None, folder).success
    assert sorted(opened) == sorted([str(corrupt), str(truncated)])
    after = {r[0]: r for r in ledger_rows(db)}
    assert set(after) == set(before)
    assert after[f"{truncated}!/ct.dcm"] == before[f"{truncated}!/ct.dcm"]
    assert after[f"{bomb}!/zeros.dcm"] == before[f"{bomb}!/zeros.dcm"]
    assert len(eav_counts(db)) == 4


def test_a_changed_archive_is_read_again_and_only_its_new_members_are_ingested(
    database_url, db, tmp_path, opened
):
    folder = tmp_path / "dicom"
    folder.mkdir()
    path = write_zip(folder / "a.zip", {"ct.dcm": sample("CT_small.dcm")})
    assert run_ingest(database_url, None, folder).success
    first = {r[0]: r for r in ledger_rows(db)}
    write_zip(path, {"ct.dcm": sample("CT_small.dcm"), "mr.dcm": sample("MR_small.dcm")})
    os.utime(path, ns=(first[str(path)][2] + 10**9, first[str(path)][2] + 10**9))
    opened.clear()
    assert run_ingest(database_url, None, folder).success
    assert opened == [str(path)]
    after = {r[0]: r for r in ledger_rows(db)}
    assert after[f"{path}!/ct.dcm"] == first[f"{path}!/ct.dcm"]  # unchanged entry: not again
    assert after[f"{path}!/mr.dcm"][3] == "ingested"
    assert after[str(path)][1:4] == (os.path.getsize(path), first[str(path)][2] + 10**9, "ingested")
    assert len(eav_counts(db)) == 2


def test_archive_members_are_uploaded_to_orthanc_streamed_from_their_archive(
    orthanc, database_url, db, tmp_path
):
    folder = archive_folder(tmp_path / "dicom")
    server = DicomServerResource(url=orthanc.url, max_concurrent_uploads=2, **FAST)
    result = run_ingest(database_url, server, folder, upload_files=True)
    assert result.success, failure_message(result)

    ingested = dict(
        db.execute(
            f"SELECT sop_instance_uid, file_path FROM {MI}.dicom_ingest_log"
            " WHERE status = 'ingested' AND sop_instance_uid IS NOT NULL"
        ).fetchall()
    )
    assert len(ingested) == 6 and all("!/" in p for p in ingested.values())
    assert sorted(orthanc.sop_instance_uids()) == sorted(ingested)
    rows = upload_rows(db)
    assert sorted(r["sop_instance_id"] for r in rows) == sorted(ingested)
    names = {f"{d}/{n}": n for d, files in (("a", IN_ZIP), ("b", IN_TGZ)) for n in files}
    for row in rows:
        path = ingested[row["sop_instance_id"]]
        assert row["original_file_path"] == path
        member = path.split("!/", 1)[1]
        size = len(sample(names[member]))
        assert row["file_size"] == size
        info = orthanc.get(f"/instances/{row['instance_id']}/attachments/dicom/info")
        assert info["UncompressedSize"] == size  # Orthanc holds the member's bytes
    metadata = upload_metadata(result)
    assert (metadata["files_uploaded"], metadata["files_failed"]) == (6, 0)
    assert metadata["bytes_sent"] == sum(len(sample(n)) for n in IN_ZIP + IN_TGZ)


def test_dicomweb_upload_of_members_refuses_a_changed_or_gone_archive(
    orthanc, database_url, db, tmp_path
):
    folder = archive_folder(tmp_path / "dicom")
    server = DicomServerResource(kind="dicomweb", dicomweb_url=orthanc.dicomweb_url, **FAST)
    assert run_ingest(database_url, server, folder).success
    zip_path, tgz_path = folder / "sub" / "study.zip", folder / "more.tar.gz"
    # The zip's CT entry now holds other bytes (another size): not the member that was ingested.
    write_zip(zip_path, {f"a/{n}": sample(n) for n in IN_ZIP} | {"a/CT_small.dcm": b"x" * 10})
    tgz_path.unlink()

    result = run_upload_alone(database_url, server)
    assert not result.success
    metadata = upload_metadata(result)
    assert (metadata["files_uploaded"], metadata["files_failed"]) == (2, 4)
    assert "4 file(s) could not be uploaded" in failure_message(result)
    message = str(metadata["first_failures"])
    assert f"{zip_path}!/a/CT_small.dcm: file changed since it was ingested" in message
    assert f"{tgz_path}!/b/rtplan.dcm: cannot read archive member: FileNotFoundError" in message
    uploaded = {row["original_file_path"] for row in upload_rows(db)}
    assert uploaded == {f"{zip_path}!/a/MR_small.dcm", f"{zip_path}!/a/JPEG2000.dcm"}
    assert len(orthanc.sop_instance_uids()) == 2
