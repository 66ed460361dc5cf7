"""Filing a received instance as ``DIR/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``: atomically, and
never over a different instance.

Atomic: the instance is written whole under a hidden staging folder, ``DIR/.receiving/``,
flushed to disk, then renamed into place (``os.replace``), so a reader never sees a
half-written ``.dcm``. The staging folder is inside DIR because a rename is atomic only
within one file system, and DIR is often a mounted volume of its own. The folder scan of the
ingest lists every file, hidden ones too; a part lives for the milliseconds of one write,
and the new-file sensor only hands on files that have not changed for its settle time, so
it never takes one. Parts a killed receiver left behind are removed when it starts again
(a manual ingest run over DIR at that moment would record such a part as failed).

Never over a different instance: a name is taken only when it is free. When it is not, the
file there is compared byte for byte with the new one. The same bytes (a sender repeating
itself) are acknowledged and nothing is written. Different bytes under the same SOP
Instance UID (most often a corrected header re-sent by a PACS) are stored beside the first
as ``<SOPUID>.<sha8>.dcm``, the first 8 hex digits of the new file's SHA-256: both are kept,
the sender gets success (a refusal would be retried forever and lose the correction), the
receiver logs a warning, and the ingest records the second as a ``duplicate`` of the
first's SOP Instance UID, so the ledger shows it.

UIDs become path parts, so they are checked first: digits separated by single dots, at most
64 characters (PS3.5 9.1). That admits no ``/``, no ``..`` and no empty part; a symlink
placed under DIR cannot lead a write elsewhere either (the series folder must resolve
inside DIR). Anything else is refused with a PHI-free reason the SCP returns to the sender.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

STAGING_FOLDER = ".receiving"  # the ingest passes it over (file_scan.UNFINISHED_FOLDERS)
PART_SUFFIX = ".part"
MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Suffix lengths tried in turn for a differing instance: 8 hex digits, more only on a clash.
_DIGEST_LENGTHS = (8, 16, 64)


class Outcome(enum.Enum):
    STORED = "stored"
    ALREADY_PRESENT = "already present"
    STORED_BESIDE = "stored beside"


@dataclass(frozen=True)
class InstanceUids:
    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Filed:
    outcome: Outcome
    path: Path
    uids: InstanceUids

    @property
    def suffix(self) -> str:
        """What follows the SOP Instance UID in the file name: ``.dcm`` or ``.<sha8>.dcm``."""
        return self.path.name[len(self.uids.sop) :]


class RefusedInstance(Exception):
    """An instance the receiver will not file. The message names the attribute, never its
    value (no PHI), and fits the 64 characters of a DIMSE Error Comment."""


class ReceiverClosing(Exception):
    """The receiver is shutting down and takes no more instances."""


def is_safe_uid(value: object) -> bool:
    """A UID that can be a file or folder name: digits and single dots, 1 to 64 characters."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.fullmatch(value))


def instance_uids(encoded: bytes) -> InstanceUids:
    """The Study, Series and SOP Instance UIDs of a PS3.10 file in memory, each one checked.

    Only these three elements are decoded (pixel data is not even read). Raises
    RefusedInstance if one is missing or unsafe. They come from the data set, not from the
    C-STORE request (the file meta): the ingest keys instances on the data set's UIDs, and
    senders exist whose request disagrees with the data set they send.
    """
    try:
        ds = pydicom.dcmread(
            BytesIO(encoded),
            stop_before_pixels=True,
            specific_tags=list(_UID_KEYWORDS),
        )
        values = [ds.get(keyword) for keyword in _UID_KEYWORDS]
    except Exception as exc:  # any malformed stream a peer can send: refuse it, stay up
        raise RefusedInstance("the data set cannot be decoded") from exc
    for keyword, value in zip(_UID_KEYWORDS, values):
        if value is None or value == "":
            raise RefusedInstance(f"{keyword} is missing")
        if not is_safe_uid(value):
            raise RefusedInstance(f"{keyword} is not a valid UID")
    study, series, sop = (str(v) for v in values)
    return InstanceUids(study, series, sop)


class InstanceStore:
    """The receiving folder. ``store`` may be called from many association threads at once."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.staging = self.root / STAGING_FOLDER
        # Taking a name and renaming into it is one step for all threads, so two
        # associations delivering the same SOP Instance UID at once cannot both take it.
        self._naming = threading.Lock()
        self._state = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self.removed_parts = 0

    @classmethod
    def open(cls, root: Path) -> InstanceStore:
        """The store over ``root`` (created if missing), with left-over parts removed."""
        store = cls(root)
        store.staging.mkdir(parents=True, exist_ok=True)
        store.removed_parts = store.remove_parts()
        return store

    def remove_parts(self) -> int:
        """Delete the parts a receiver killed mid-write left behind; returns how many.

        Called at start. Should a second receiver be writing into the same folder (one per
        folder is the rule), its rename then fails and its sender gets a failure status and
        sends again: nothing half-written is ever filed.
        """
        removed = 0
        with os.scandir(self.staging) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        continue
        return removed

    def store(self, encoded: bytes) -> Filed:
        """File one PS3.10 file (preamble, file meta, data set as received).

        Raises RefusedInstance for an instance that cannot be filed, ReceiverClosing after
        ``close``, OSError when the disk fails (full, read-only).
        """
        with self._writing():
            uids = instance_uids(encoded)
            folder = self._series_folder(uids)
            part = self._write_part(encoded)
            try:
                with self._naming:
                    return self._take_name(part, folder, uids, encoded)
            finally:
                part.unlink(missing_ok=True)  # gone already unless it was not needed

    def close(self, timeout: float) -> bool:
        """Take no more instances and wait up to ``timeout`` s for the writes in progress.
        True when none is left."""
        with self._state:
            self._closed = True
            return self._state.wait_for(lambda: self._in_flight == 0, timeout)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._state:
            if self._closed:
                raise ReceiverClosing()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._state:
                self._in_flight -= 1
                self._state.notify_all()

    def _series_folder(self, uids: InstanceUids) -> Path:
        folder = self.root / uids.study / uids.series
        # Checked before mkdir, so a planted symlink never gets folders created through it.
        if not folder.resolve().is_relative_to(self.root):
            raise RefusedInstance("the series folder leads outside the receiving folder")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _write_part(self, encoded: bytes) -> Path:
        part = self.staging / f".{secrets.token_hex(8)}{PART_SUFFIX}"
        # 0o666 less the umask, as any new file: the ingest may run as another user.
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(encoded)
                out.flush()
                os.fsync(out.fileno())  # on disk before the sender is told it is stored
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return part

    def _take_name(self, part: Path, folder: Path, uids: InstanceUids, encoded: bytes) -> Filed:
        digest = hashlib.sha256(encoded).hexdigest()
        sop = uids.sop
        names = [f"{sop}.dcm"] + [f"{sop}.{digest[:n]}.dcm" for n in _DIGEST_LENGTHS]
        for index, name in enumerate(names):
            target = folder / name
            if not os.path.lexists(target):
                os.replace(part, target)
                _fsync_folder(folder)  # the rename itself survives a crash
                outcome = Outcome.STORED if index == 0 else Outcome.STORED_BESIDE
                return Filed(outcome, target, uids)
            if _same_bytes(target, encoded):
                return Filed(Outcome.ALREADY_PRESENT, target, uids)
        raise RefusedInstance("every name for this instance is taken")


def _same_bytes(path: Path, encoded: bytes) -> bool:
    try:
        if path.stat().st_size != len(encoded):
            return False
        return path.read_bytes() == encoded
    except OSError:  # unreadable or a dangling link: not the same, try the next name
        return False


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
