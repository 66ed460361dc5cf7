"""Archive members read without a database: paths, limits, corrupt archives, bytes for upload."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster.core.ingest import archives
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Member, Opened, Parsed, parse_file
from dicom_etl_dagster_tests.orthanc import pydicom_test_file

CT, MR, PLAN = "CT_small.dcm", "MR_small.dcm", "rtplan.dcm"


def entry_of(path: Path) -> FileEntry:
    stat = path.stat()
    return FileEntry(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, (2024, 5, 6, 7, 8, 10)), data, zipfile.ZIP_DEFLATED)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def sample(name: str) -> bytes:
    return pydicom_test_file(name).read_bytes()


@pytest.mark.parametrize("fast_path", [True, False])
def test_reader_gives_the_same_rows_from_bytes_as_from_the_file(fast_path):
    for name in (CT, MR, PLAN):
        from_file = read_instance(pydicom_test_file(name), fast_path=fast_path)
        from_bytes = read_instance(io.BytesIO(sample(name)), fast_path=fast_path)
        assert from_bytes == from_file


def test_zip_members_with_paths_sizes_and_entry_times(tmp_path):
    path = write_zip(
        tmp_path / "a.zip", {"study/": b"", "study/ct.dcm": sample(CT), "mr.dcm": sample(MR)}
    )
    items = list(archives.iter_members(entry_of(path)))
    assert [type(i) for i in items] == [Member, Member, Opened]  # the folder entry is no member
    ct, mr, opened = items
    assert ct.entry.path == f"{path}!/study/ct.dcm" and ct.data == sample(CT)
    assert (ct.entry.size, mr.entry.size) == (len(sample(CT)), len(sample(MR)))
    assert ct.entry.mtime_ns == 1714979290 * 10**9  # 2024-05-06 07:08:10, read as UTC
    assert ct.entry.ctime_ns == path.stat().st_ctime_ns  # the sensor's window is the archive's
    assert opened == Opened(entry_of(path), 2)
    parsed = parse_file(ct)
    assert isinstance(parsed, Parsed) and parsed.entry == ct.entry
    assert parsed.instance.sop_instance_uid == read_instance(pydicom_test_file(CT)).sop_instance_uid


def test_tar_gz_members_stream_and_links_fail(tmp_path):
    path = write_tar(tmp_path / "a.tgz", {"x/plan.dcm": sample(PLAN), "x/mr.dcm": sample(MR)})
    items = list(archives.iter_members(entry_of(path)))
    assert [(type(i), i.entry.path) for i in items] == [
        (Member, f"{path}!/x/plan.dcm"),
        (Member, f"{path}!/x/mr.dcm"),
        (Opened, str(path)),
    ]
    assert items[0].entry.mtime_ns == 1_700_000_000 * 10**9

    linked = tmp_path / "links.tar"
    with tarfile.open(linked, "w") as tf:
        link = tarfile.TarInfo("link.dcm")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (failed, opened) = archives.iter_members(entry_of(linked))
    assert failed == Failed(
        failed.entry, "archive member is not a regular file (a link or a device)"
    )
    assert isinstance(opened, Opened) and opened.members == 1


def test_corrupt_and_truncated_archives_fail_themselves(tmp_path):
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is no zip file" * 10)
    (failed,) = archives.iter_members(entry_of(corrupt))
    assert failed.entry == entry_of(corrupt)
    assert failed.reason.startswith("corrupt archive: cannot open zip: BadZipFile")

    whole = write_tar(
        tmp_path / "whole.tar.gz", {"a.dcm": sample(CT), "b.dcm": os.urandom(300_000)}
    )
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    items = list(archives.iter_members(entry_of(cut)))
    assert isinstance(items[-1], Failed) and items[-1].entry == entry_of(cut)
    assert items[-1].reason.startswith("corrupt archive: ")
    assert not any(isinstance(i, Opened) for i in items)


def test_limits_nested_archives_and_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    path = write_zip(
        tmp_path / "a.zip",
        {
            "inner.ZIP": b"PK",
            "inner.tar.gz": b"",
            "zeros.dcm": bytes(32 * 1024**2),
            "ct.dcm": sample(CT),
        },
    )
    inner_zip, inner_tgz, zeros, ct, opened = archives.iter_members(entry_of(path))
    assert inner_zip.reason == inner_tgz.reason == archives.NESTED_ARCHIVE_REASON
    assert isinstance(zeros, Failed) and "(MAX_COMPRESSION_RATIO)" in zeros.reason
    assert zeros.entry.size == 32 * 1024**2
    assert isinstance(ct, Member) and opened.members == 4

    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 20_000)
    _, _, zeros, ct, _ = archives.iter_members(entry_of(path))
    assert ct.reason == (
        f"archive member of {len(sample(CT))} bytes exceeds the member size limit of 20000 bytes"
        " (MAX_MEMBER_BYTES)"
    )


def test_split_member_path_and_open_member_for_upload(tmp_path):
    folder = tmp_path / "odd.zip!" / "x"
    folder.mkdir(parents=True)
    path = write_zip(folder / "b.zip", {"d/ct.dcm": sample(CT)})
    member = f"{path}!/d/ct.dcm"
    assert archives.split_member_path(member) == (str(path), "d/ct.dcm")
    assert archives.split_member_path(str(path)) is None
    stream, size, mtime_ns = archives.open_member(member)
    assert (len(stream), size, stream.read()) == (len(sample(CT)), len(sample(CT)), sample(CT))
    stream.close()
    tgz = write_tar(tmp_path / "c.tar.gz", {"one": sample(MR), "two": sample(PLAN)})
    stream, size, mtime_ns = archives.open_member(f"{tgz}!/two")
    assert (size, mtime_ns, stream.read()) == (
        len(sample(PLAN)),
        1_700_000_000 * 10**9,
        sample(PLAN),
    )
    stream.close()
    with pytest.raises(archives.ArchiveMemberError, match="no longer exists"):
        archives.open_member(f"{tgz}!/three")


def test_batches_of_members_are_cut_by_the_bytes_they_hold(monkeypatch):
    from dicom_etl_dagster.core.ingest import run

    monkeypatch.setattr(run, "MAX_BATCH_MEMBER_BYTES", 250)
    entry = FileEntry("/a.zip!/m", 100, 0)
    items = [Member(entry, bytes(100))] * 5 + [entry, Member(entry, bytes(300)), entry]
    sizes = [len(b) for b in run._batches(items, batch_size=4)]
    # Cut once 250 bytes are held (after three members, then at the 300-byte one), else at 4.
    assert sizes == [3, 4, 1]
