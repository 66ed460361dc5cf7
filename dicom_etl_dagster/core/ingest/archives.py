"""Archives as a source: the members of ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz`` files.

A site often receives studies as archives (a PACS export, a CD image zipped up). Each member
is ingested as a file would be, under the ledger path ``<archive path>!/<member path>``, with
the size and mtime of its archive entry.

Why in memory, one member at a time: nothing is extracted to disk (no scratch space to size,
nothing left behind by a crash, no member name ever becomes a path we write to). A member's
bytes are read into memory, bounded by ``MAX_MEMBER_BYTES``, and parsed from there
(``reader.read_instance`` takes a stream). Tar archives are read in tarfile's stream mode, so a
``.tar.gz`` is decompressed once, front to back, however many members it holds.

What is refused, as a failed ledger row with a reason, while the rest goes on:
- an archive that cannot be opened or read to its end (the archive's own row fails, so the
  next run opens it again; members recorded before the damage stay recorded);
- a member that cannot be read, or is not a regular file (tar links, devices);
- a nested archive (not opened: one level keeps the limits below meaningful);
- a member over ``MAX_MEMBER_BYTES`` uncompressed, or compressed more than
  ``MAX_COMPRESSION_RATIO`` times (a decompression bomb), checked on the entry's header before
  a byte is decompressed.

An archive read to its end gets a ledger row of its own (status ``ingested``, no SOP instance):
while the archive keeps its size and mtime, a re-run skips it without opening it.

The limits are read when an archive is opened, so a test (or a site) may change them here.
"""

from __future__ import annotations

import calendar
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO

from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Member, Opened

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
#: Between the archive's path and the member's path in a ledger path (as Java's jar: URLs).
MEMBER_SEPARATOR = "!/"
#: Largest member read into memory (uncompressed). Big enough for large multi-frame objects
#: (tomosynthesis, whole-slide tiles); a worker holds one member at a time.
MAX_MEMBER_BYTES = 2 * 1024**3
#: Largest uncompressed / compressed size of a member. DICOM with pixel data rarely exceeds
#: 10 (blank frames and SEG masks do compress far better, hence the floor below).
MAX_COMPRESSION_RATIO = 200
#: The ratio is only checked for members at least this large: a small member that compresses
#: well (a blank frame) costs nothing to inflate, a bomb is large by definition.
RATIO_CHECKED_FROM_BYTES = 16 * 1024**2
NESTED_ARCHIVE_REASON = "nested archive (archives inside archives are not opened)"

_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError)


class ArchiveMemberError(DicomEtlError):
    """A member path whose archive or member cannot be opened (upload); one line, why."""


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def member_path(archive_path: str, name: str) -> str:
    return f"{archive_path}{MEMBER_SEPARATOR}{name}"


def split_member_path(path: str) -> tuple[str, str] | None:
    """(archive path, member name) of a ledger path of an archive member; None for a file.

    The first separator before which the path names an archive file: a folder called
    ``x.zip!`` in the path does not confuse it. When no such file exists (any more), the first
    separator after an archive suffix. A path that names a file is a file.
    """
    if MEMBER_SEPARATOR not in path or os.path.isfile(path):
        return None
    splits: list[tuple[str, str]] = []
    start = 0
    while (at := path.find(MEMBER_SEPARATOR, start)) >= 0:
        if is_archive(path[:at]):
            splits.append((path[:at], path[at + len(MEMBER_SEPARATOR) :]))
        start = at + 1
    existing = [split for split in splits if os.path.isfile(split[0])]
    candidates = existing or splits
    return candidates[0] if candidates else None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def refusal(name: str, size: int, compressed_size: int | None) -> str | None:
    """Why a member is not read, from its header alone; None: read it.

    ``compressed_size`` is the member's (zip) or, for a compressed tar, the whole archive's,
    which makes the ratio a lower bound: never a false alarm, and the size limit still holds.
    """
    if is_archive(name):
        return NESTED_ARCHIVE_REASON
    if compressed_size is not None and size >= RATIO_CHECKED_FROM_BYTES:
        ratio = size / max(1, compressed_size)
        if ratio > MAX_COMPRESSION_RATIO:
            return (
                f"archive member compressed {ratio:.0f} times exceeds the compression ratio "
                f"limit of {MAX_COMPRESSION_RATIO} (MAX_COMPRESSION_RATIO): a decompression bomb?"
            )
    if size > MAX_MEMBER_BYTES:
        return (
            f"archive member of {size} bytes exceeds the member size limit of "
            f"{MAX_MEMBER_BYTES} bytes (MAX_MEMBER_BYTES)"
        )
    return None


def iter_members(archive: FileEntry) -> Iterator[Member | Failed | Opened]:
    """Every member of ``archive``, in archive order, as bytes or as a failure; then
    ``Opened`` if the archive was read to its end, else a ``Failed`` for the archive itself."""
    if archive.path.lower().endswith(".zip"):
        yield from _zip_members(archive)
    else:
        yield from _tar_members(archive)


def _entry(archive: FileEntry, name: str, size: int, mtime_ns: int) -> FileEntry:
    # Members share the archive's change time: the sensor's window selects the archive.
    return FileEntry(member_path(archive.path, name), size, mtime_ns, archive.ctime_ns)


def _zip_mtime_ns(info: zipfile.ZipInfo) -> int:
    # Zip times are local times without a zone; read as UTC so the value never depends on
    # the machine's zone (it only has to stay the same from run to run).
    return calendar.timegm((*info.date_time, 0, 0, 0)) * 1_000_000_000


def _zip_members(archive: FileEntry) -> Iterator[Member | Failed | Opened]:
    try:
        zf = zipfile.ZipFile(archive.path)
    except (*_READ_ERRORS, ValueError) as exc:
        yield Failed(archive, f"corrupt archive: cannot open zip: {_reason(exc)}")
        return
    members = 0
    with zf:
        seen: set[str] = set()
        for info in zf.infolist():
            if info.is_dir() or info.filename in seen:
                continue  # a repeated name keeps its first entry: one ledger row per path
            seen.add(info.filename)
            members += 1
            entry = _entry(archive, info.filename, info.file_size, _zip_mtime_ns(info))
            why = refusal(info.filename, info.file_size, info.compress_size)
            if why is not None:
                yield Failed(entry, why)
                continue
            try:
                data = zf.read(info)  # bounded: zipfile stops at the header's file_size
            except (*_READ_ERRORS, RuntimeError, NotImplementedError) as exc:  # encrypted...
                yield Failed(entry, f"cannot read archive member: {_reason(exc)}")
                continue
            yield Member(entry, data)
    yield Opened(archive, members)


def _tar_members(archive: FileEntry) -> Iterator[Member | Failed | Opened]:
    try:
        tf = tarfile.open(archive.path, mode="r|*")  # noqa: SIM115 - stream mode: read once
    except _READ_ERRORS as exc:
        yield Failed(archive, f"corrupt archive: cannot open tar: {_reason(exc)}")
        return
    members = 0  # handed on, whole
    with tf:
        seen: set[str] = set()
        try:
            for info in tf:
                if info.isdir() or info.name in seen:
                    continue
                seen.add(info.name)
                yield _tar_member(archive, tf, info)
                members += 1
        except _READ_ERRORS as exc:
            # Members read so far stay recorded; the archive fails, so the next run reads it again.
            yield Failed(archive, f"corrupt archive: {_reason(exc)} after {members} member(s)")
            return
    yield Opened(archive, members)


def _tar_member(archive: FileEntry, tf: tarfile.TarFile, info: tarfile.TarInfo) -> Member | Failed:
    """One member, read whole (tarfile stops at the header's size); read errors propagate:
    in a stream, the archive cannot be read past them."""
    entry = _entry(archive, info.name, info.size, int(info.mtime * 1_000_000_000))
    compressed = archive.path.lower().endswith((".gz", ".tgz"))
    why = refusal(info.name, info.size, archive.size if compressed else None)
    if why is None and not info.isreg():
        why = "archive member is not a regular file (a link or a device)"
    if why is not None:
        return Failed(entry, why)
    stream = tf.extractfile(info)
    return Member(entry, stream.read() if stream is not None else b"")


# --------------------------------------------------------------------------
# Upload: one member, streamed from its archive
# --------------------------------------------------------------------------
class _MemberStream:
    """A member's bytes as a read-only stream that also closes its archive.

    It has ``__len__`` and ``read`` but no ``fileno``/``tell``, so requests sends it with a
    Content-Length and reads it in blocks, without seeking (tar streams cannot seek back).
    """

    def __init__(self, handle: IO[bytes], archive: zipfile.ZipFile | tarfile.TarFile, size: int):
        self._handle, self._archive, self._size = handle, archive, size

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def close(self) -> None:
        try:
            self._handle.close()
        finally:
            self._archive.close()


def open_member(path: str) -> tuple[_MemberStream, int, int]:
    """(a stream of the member's bytes, its size, its mtime in ns) for a member ledger path.

    A tar is scanned from its start to the member (the cost of a format without an index);
    a zip member is found in the central directory. ArchiveMemberError when either fails.
    """
    parts = split_member_path(path)
    if parts is None:
        raise ArchiveMemberError(f"{path}: not an archive member path")
    archive_path, name = parts
    try:
        if archive_path.lower().endswith(".zip"):
            return _open_zip_member(archive_path, name)
        return _open_tar_member(archive_path, name)
    except ArchiveMemberError:
        raise
    except (*_READ_ERRORS, RuntimeError, NotImplementedError, ValueError) as exc:
        raise ArchiveMemberError(f"cannot read archive member: {_reason(exc)}") from None


def _open_zip_member(archive_path: str, name: str) -> tuple[_MemberStream, int, int]:
    zf = zipfile.ZipFile(archive_path)
    for info in zf.infolist():
        if info.filename == name and not info.is_dir():  # the first entry, as ingested
            stream = _MemberStream(zf.open(info), zf, info.file_size)
            return stream, info.file_size, _zip_mtime_ns(info)
    zf.close()
    raise ArchiveMemberError("archive member no longer exists")


def _open_tar_member(archive_path: str, name: str) -> tuple[_MemberStream, int, int]:
    tf = tarfile.open(archive_path, mode="r|*")  # noqa: SIM115 - closed with the stream
    for info in tf:
        if info.name == name and info.isreg():
            stream = tf.extractfile(info)
            if stream is not None:
                mtime_ns = int(info.mtime * 1_000_000_000)
                return _MemberStream(stream, tf, info.size), info.size, mtime_ns
    tf.close()
    raise ArchiveMemberError("archive member no longer exists")
