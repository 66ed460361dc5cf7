"""Read one DICOM file into an instance record plus its flattened metadata rows.

This module is deliberately pure: no Dagster, no database.  It runs inside
worker processes over millions of files, so it

* first offers the file to ``fast_path``, which reads the common encodings
  straight from the bytes; what follows describes the pydicom path, which
  reads everything else and is the reference the fast path must match;
* opens each file exactly once and parses it in one pass with pydicom, using
  ``defer_size`` so that large values (above all pixel data) are skipped
  rather than loaded; pixel data is never read into Python objects, let alone
  decoded;
* walks sequences itself (instead of ``to_json_dict`` on SQ elements, which
  would serialise whole subtrees again for every level);
* verifies declared lengths against the real file size, because pydicom
  happily returns a dataset from a truncated file (short reads are not
  errors for it);
* turns every failure into :class:`DicomReadError` carrying a one-line reason
  that never quotes patient data, so the caller can log/store it.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileutil import read_undefined_length_value
from pydicom.hooks import raw_element_vr
from pydicom.multival import MultiValue
from pydicom.tag import SequenceDelimiterTag

from dicom_etl_dagster.core.dicom.corrections import (
    AMBIGUOUS_VRS,
    WORD_VRS,
    code_strings,
    little_endian_binary,
    real_vr,
)
from dicom_etl_dagster.core.dicom.elements import (
    NUMBER_TEXT_VRS,
    PIXEL_DATA_TAGS,
    BulkDataReference,
    ElementRow,
    number_text,
)
from dicom_etl_dagster.core.dicom.elements import fmt_tag as _fmt_tag
from dicom_etl_dagster.core.dicom.elements import private_name as _private_name
from dicom_etl_dagster.core.dicom.elements import public_info as _public_info
from dicom_etl_dagster.core.dicom.fast_path import NeedsPydicom, read_fast
from dicom_etl_dagster.core.dicom.odd_values import odd_value_tags, verbatim_value
from dicom_etl_dagster.core.dicom.recovery import dcmread_as_dcmtk

__all__ = [
    "PIXEL_DATA_TAGS",
    "DicomInstance",
    "DicomReadError",
    "ElementRow",
    "read_dataset",
    "read_instance",
]


# Values longer than this are not read while parsing; pydicom only records
# their offset.  Pixel data above it is therefore never loaded at all; other
# deferred values are read afterwards with one seek on the already-open file.
_DEFER_SIZE = 64 * 1024

# "Huge" bulk data threshold: with no bulk data handler pydicom always inlines
# binary values as base64, the threshold is only passed for completeness.
_NO_BULK_THRESHOLD = sys.maxsize

_UNDEFINED_LENGTH = 0xFFFFFFFF

_TAG_SOP_INSTANCE_UID = 0x00080018
_TAG_STUDY_INSTANCE_UID = 0x0020000D
_TAG_SERIES_INSTANCE_UID = 0x0020000E
_TAG_PATIENT_ID = 0x00100020
_TAG_STUDY_DATE = 0x00080020
_TAG_SERIES_DATE = 0x00080021
_TAG_ACQUISITION_DATE = 0x00080022
_TAG_CONTENT_DATE = 0x00080023
_TAG_INSTANCE_CREATION_DATE = 0x00080012
_TAG_ACQUISITION_DATETIME = 0x0008002A
_TAG_STUDY_TIME = 0x00080030
_TAG_SERIES_TIME = 0x00080031
_TAG_ACQUISITION_TIME = 0x00080032
_TAG_CONTENT_TIME = 0x00080033
_TAG_INSTANCE_CREATION_TIME = 0x00080013
_TAG_STUDY_DESCRIPTION = 0x00081030
_TAG_MODALITY = 0x00080060
_TAG_BODY_PART_EXAMINED = 0x00180015
_TAG_INSTANCE_NUMBER = 0x00200013

# Top-level elements whose values feed DicomInstance.
_INSTANCE_TAGS = frozenset(
    {
        _TAG_SOP_INSTANCE_UID,
        _TAG_STUDY_INSTANCE_UID,
        _TAG_SERIES_INSTANCE_UID,
        _TAG_PATIENT_ID,
        _TAG_STUDY_DATE,
        _TAG_SERIES_DATE,
        _TAG_ACQUISITION_DATE,
        _TAG_CONTENT_DATE,
        _TAG_INSTANCE_CREATION_DATE,
        _TAG_ACQUISITION_DATETIME,
        _TAG_STUDY_TIME,
        _TAG_SERIES_TIME,
        _TAG_ACQUISITION_TIME,
        _TAG_CONTENT_TIME,
        _TAG_INSTANCE_CREATION_TIME,
        _TAG_STUDY_DESCRIPTION,
        _TAG_MODALITY,
        _TAG_BODY_PART_EXAMINED,
        _TAG_INSTANCE_NUMBER,
    }
)

_REQUIRED_UIDS = (
    ("SOPInstanceUID", _TAG_SOP_INSTANCE_UID),
    ("StudyInstanceUID", _TAG_STUDY_INSTANCE_UID),
    ("SeriesInstanceUID", _TAG_SERIES_INSTANCE_UID),
)
# Each date attribute with the time attribute that goes with it (AcquisitionDateTime is both).
_TIME_OF = {
    _TAG_STUDY_DATE: _TAG_STUDY_TIME,
    _TAG_SERIES_DATE: _TAG_SERIES_TIME,
    _TAG_ACQUISITION_DATE: _TAG_ACQUISITION_TIME,
    _TAG_CONTENT_DATE: _TAG_CONTENT_TIME,
    _TAG_ACQUISITION_DATETIME: None,
    _TAG_INSTANCE_CREATION_DATE: _TAG_INSTANCE_CREATION_TIME,
}
#: The top-level attributes the OMOP rows are keyed and dated by: the three UIDs and every
#: date and time attribute of the date fallbacks below (``phi_policy: drop`` keeps these).
OMOP_SOURCE_TAGS = frozenset(
    {tag for _, tag in _REQUIRED_UIDS}
    | {tag for pair in _TIME_OF.items() for tag in pair if tag is not None}
)
# Real files exist whose only date is InstanceCreationDate (or AcquisitionDateTime): they are
# the last fallbacks, so such a file is ingested instead of failing for "no usable date".
_PROCEDURE_DATE_ORDER = (
    _TAG_STUDY_DATE,
    _TAG_SERIES_DATE,
    _TAG_ACQUISITION_DATE,
    _TAG_CONTENT_DATE,
    _TAG_ACQUISITION_DATETIME,
    _TAG_INSTANCE_CREATION_DATE,
)
_IMAGE_DATE_ORDER = (
    _TAG_SERIES_DATE,
    _TAG_ACQUISITION_DATE,
    _TAG_CONTENT_DATE,
    _TAG_STUDY_DATE,
    _TAG_ACQUISITION_DATETIME,
    _TAG_INSTANCE_CREATION_DATE,
)
_NO_DATE_REASON = (
    "no usable date: SeriesDate, AcquisitionDate, ContentDate, StudyDate, "
    "AcquisitionDateTime and InstanceCreationDate are all missing or invalid"
)

_STRIP_CHARS = " \x00"
_DA_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_DA_ACR_NEMA_RE = re.compile(r"([0-9]{4})\.([0-9]{2})\.([0-9]{2})")
# A DT value's date part; what follows (time, fraction, UTC offset) is read by _parse_time.
_DT_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{0,6}(?:\.[0-9]{1,6})?)(?:[+-][0-9]{4})?")
_TM_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_TM_ACR_NEMA_RE = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,6}))?)?")

# VRs that may start an explicit-VR data element, used only to sniff files
# that lack the 128-byte preamble and "DICM" prefix.
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST "
    b"SV TM UC UI UL UN UR US UT UV".split()
)
_EXPLICIT_VRS_32BIT_LENGTH = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# A dataset without preamble must start with command (0000), file meta
# (0002), directory (0004) or identifying (0008) elements: every instance we
# accept has SOPInstanceUID (0008,0018), and elements are sorted by tag.
_PLAUSIBLE_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0004, 0x0008})

_MAX_REASON_LENGTH = 400
_MAX_UID_LENGTH = 64
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1


class DicomReadError(Exception):
    """The file cannot be ingested; str(exc) is a plain one-line human-readable reason."""


@dataclass(frozen=True)
class DicomInstance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    procedure_date: datetime.date
    image_date: datetime.date
    study_description: str | None
    modality: str | None
    body_part_examined: str | None
    instance_number: int | None
    elements: list[ElementRow]
    # The dates with the time of the same attribute pair (StudyDate + StudyTime, ...); the
    # date's midnight when that time is absent or invalid.
    procedure_datetime: datetime.datetime | None = None
    image_datetime: datetime.datetime | None = None
    # Row index -> the text of a top-level single-valued DS / IS element as the file holds it
    # (DICOM JSON holds these as numbers: "5.000" and "5" both read 5): measurements keep it.
    number_texts: dict[int, str] = field(default_factory=dict)
    # The tag of every element whose value violates its VR (kept verbatim: see odd_values).
    odd_value_tags: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Quietening pydicom
# --------------------------------------------------------------------------
# Broken files make pydicom emit warnings (warnings module) and log records
# on the "pydicom" logger; across millions of files that is noise, and the
# outcome is reported through DicomReadError anyway.  Warnings are ignored
# inside read_instance only (catch_warnings restores the filters; it is
# process-global, which is fine in worker processes).  For logging a filter
# drops records only while the *current thread* is inside read_instance, so
# pydicom logging from other code is untouched.
_quiet = threading.local()


class _DropWhileReading(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "active", False)


_PYDICOM_LOGGER = logging.getLogger("pydicom")
if not any(isinstance(f, _DropWhileReading) for f in _PYDICOM_LOGGER.filters):
    _PYDICOM_LOGGER.addFilter(_DropWhileReading())


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    previous = getattr(_quiet, "active", False)
    _quiet.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet.active = previous


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------
def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > _MAX_REASON_LENGTH:
        text = text[: _MAX_REASON_LENGTH - 3] + "..."
    return text


# pydicom quotes raw bytes in some messages (BytesLengthException shows the
# whole value, which with a corrupt length can span neighbouring elements such
# as the patient's name); such byte dumps never make it into a reason.
_BYTES_REPR_RE = re.compile(r"""\bb(['"]).*?(?<!\\)\1""")


def _exc_text(exc: BaseException) -> str:
    msg = _BYTES_REPR_RE.sub("<bytes>", " ".join(str(exc).split()))
    msg = _one_line(msg)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _text(value: Any) -> str | None:
    """A value as a stripped string; multi-valued text is re-joined with '\\'."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    elif isinstance(value, list | tuple | MultiValue):
        value = "\\".join("" if v is None else str(v) for v in value)
    else:
        value = str(value)
    value = value.strip(_STRIP_CHARS)
    return value or None


def _first(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return value
    try:
        items = list(value)
    except TypeError:
        return value
    return items[0] if items else None


def parse_date(value: Any) -> datetime.date | None:
    value = _first(value)
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):  # config.datetime_conversion = True
        return value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip(_STRIP_CHARS)
    match = _DA_RE.fullmatch(text) or _DA_ACR_NEMA_RE.fullmatch(text)
    if match is None:
        return None
    try:
        return datetime.date(*(int(part) for part in match.groups()))
    except ValueError:  # e.g. 20231399
        return None


def parse_time(value: Any) -> datetime.time | None:
    """A TM value (or a DT value's time part); None when absent or invalid."""
    value = _first(value)
    if value is None:
        return None
    if isinstance(value, datetime.time):
        return value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip(_STRIP_CHARS)
    match = _TM_RE.fullmatch(text) or _TM_ACR_NEMA_RE.fullmatch(text)
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        return datetime.time(
            int(hour),
            int(minute or 0),
            min(int(second or 0), 59),  # a leap second (60) is valid DICOM, not a datetime
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        return None


def _parse_datetime(value: Any) -> datetime.datetime | None:
    """A DT value (its UTC offset, if any, dropped: OMOP datetimes are local times)."""
    value = _first(value)
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None)
    match = _DT_RE.fullmatch(_text(value) or "")
    if match is None:
        return None
    year, month, day, time_text = match.groups()
    date = parse_date(year + month + day)
    if date is None:
        return None
    return datetime.datetime.combine(
        date, (parse_time(time_text) if time_text else None) or datetime.time()
    )


def _date_and_time(values: dict[int, Any], order: tuple[int, ...]) -> datetime.datetime | None:
    """The first valid date of ``order`` with the time of the same attribute pair (midnight
    when that time is absent or invalid)."""
    for tag in order:
        time_tag = _TIME_OF[tag]
        if time_tag is None:
            found = _parse_datetime(values.get(tag))
            if found is not None:
                return found
            continue
        date = parse_date(values.get(tag))
        if date is not None:
            time = parse_time(values.get(time_tag))
            return datetime.datetime.combine(date, time or datetime.time())
    return None


def _parse_int(value: Any) -> int | None:
    """An integer that fits the OMOP integer columns, else None (the raw value stays in the EAV row)."""
    value = _first(value)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        try:
            as_float = float(str(value).strip(_STRIP_CHARS))
        except ValueError:
            return None
        if not as_float.is_integer():
            return None
        number = int(as_float)
    return number if _INT4_MIN <= number <= _INT4_MAX else None


def _stream_size(stream: BinaryIO) -> int:
    position = stream.tell()
    size = stream.seek(0, os.SEEK_END)
    stream.seek(position)
    return size


def _starts_like_dataset(head: bytes, file_size: int) -> bool:
    """Does a file without "DICM" prefix start with a plausible data element?

    pydicom with force=True parses *anything* (a text file becomes a few
    garbage elements), so before forcing we require the first element to
    have a plausible group and a length that fits into the file.
    """
    if len(head) < 8:
        return False
    for endian in "<>":
        group, _elem = struct.unpack(endian + "HH", head[:4])
        if group not in _PLAUSIBLE_FIRST_GROUPS:
            continue
        vr = head[4:6]
        if vr in _EXPLICIT_VRS:
            if vr in _EXPLICIT_VRS_32BIT_LENGTH:
                if len(head) < 12 or head[6:8] != b"\x00\x00":
                    continue
                header, length = 12, struct.unpack(endian + "L", head[8:12])[0]
            else:
                header, length = 8, struct.unpack(endian + "H", head[6:8])[0]
        elif endian == "<":  # implicit VR is little endian only
            header, length = 8, struct.unpack("<L", head[4:8])[0]
        else:
            continue
        if _elem == 0x0000 and length != 4:
            continue  # a group length is always a 4-byte UL (rejects zero-filled files)
        if length == _UNDEFINED_LENGTH or header + length <= file_size:
            return True
    return False


# --------------------------------------------------------------------------
# Structural checks (truncation)
# --------------------------------------------------------------------------
def _value_tell(elem: RawDataElement | DataElement | None) -> int | None:
    if isinstance(elem, RawDataElement):
        return elem.value_tell
    return getattr(elem, "file_tell", None)  # DataElement spelling


def _declared_length_from_header(
    source: BinaryIO, elem: DataElement, value_tell: int, implicit: bool, little: bool
) -> int | None:
    """Re-read the length field of an element pydicom has already converted.

    pydicom converts a few elements while reading (e.g. Specific Character
    Set), which loses the declared length; the header sits right before the
    value.  Returns None when the header does not look as expected.
    """
    endian = "<" if little else ">"
    vr = str(elem.VR).encode("ascii", "replace")
    if implicit:
        source.seek(value_tell - 4)
        field = source.read(4)
        return struct.unpack(endian + "L", field)[0] if len(field) == 4 else None
    if vr in _EXPLICIT_VRS_32BIT_LENGTH:
        source.seek(value_tell - 8)
        field = source.read(8)
        if len(field) == 8 and field[:2] == vr and field[2:4] == b"\x00\x00":
            return struct.unpack(endian + "L", field[4:])[0]
        return None
    source.seek(value_tell - 4)
    field = source.read(4)
    if len(field) == 4 and field[:2] == vr:
        return struct.unpack(endian + "H", field[2:])[0]
    return None


def _check_top_level_end(ds: Dataset, source: BinaryIO, stream_size: int, deflated: bool) -> None:
    """The last top-level element must end exactly at the end of the stream.

    pydicom stops silently when fewer than 8 bytes are left for an element
    header, skips (seeks) past deferred values even beyond EOF and drops an
    undefined-length value whose delimiter never comes.  All of these leave
    the last parsed element ending before or after the real end of the data.

    Limitation: a file cut exactly at an element boundary is a valid, shorter
    DICOM file and cannot be recognised as truncated in general.
    """
    last: RawDataElement | DataElement | None = None
    last_tell = -1
    for tag in ds.keys():
        if deflated and tag >> 16 == 0x0000:
            continue  # command set elements were read before inflating
        elem = ds.get_item(tag, keep_deferred=True)
        tell = _value_tell(elem)
        if tell is not None and tell > last_tell:
            last, last_tell = elem, tell
    if last is None:
        return
    implicit, little = ds.original_encoding
    little = True if little is None else little

    if isinstance(last, RawDataElement):
        length = last.length
    elif last.is_undefined_length:
        length = _UNDEFINED_LENGTH
    else:
        declared = _declared_length_from_header(source, last, last_tell, bool(implicit), little)
        if declared is None:
            return  # cannot tell; the walk still checks every value it reads
        length = declared

    if length == _UNDEFINED_LENGTH:
        # pydicom parsed it up to its delimiter, but a few bytes of a further
        # element header after it would have been dropped silently: a
        # complete file ends exactly with the Sequence Delimitation Item.
        delimiter = struct.pack("<HHL" if little else ">HHL", 0xFFFE, 0xE0DD, 0)
        source.seek(max(stream_size - 8, 0))
        if source.read(8) != delimiter:
            raise DicomReadError(
                "truncated: the data does not end with the delimiter of the last "
                f"undefined-length element {_fmt_tag(last.tag)} (it ends inside a "
                "further data element header)"
            )
        return

    end = last_tell + length
    if end > stream_size:
        raise DicomReadError(
            f"truncated: element {_fmt_tag(last.tag)} at offset {last_tell} declares "
            f"{length} bytes but the data ends at offset {stream_size}"
        )
    if end < stream_size:
        left = stream_size - end
        if left < 8:
            raise DicomReadError(
                f"truncated: the data ends inside a data element header at offset {end} "
                f"({left} byte(s) left)"
            )
        raise DicomReadError(
            f"truncated: {left} bytes from offset {end} could not be parsed "
            "(an undefined-length value without its delimiter, or corrupt data)"
        )


def _check_file_meta_bytes(fp: BinaryIO, start: int, file_size: int) -> None:
    """Walk the element headers of a file whose dataset pydicom found empty.

    Either the file ends in or right after the meta group (then this finds
    a cut element), or pydicom dropped the dataset (see below).  File meta is explicit VR little
    endian by definition; implicit VR is tolerated as pydicom does.
    """
    pos = start
    while pos < file_size:
        fp.seek(pos)
        head = fp.read(12)
        if len(head) < 8:
            raise DicomReadError(
                f"truncated: the data ends inside a data element header at offset {pos}"
            )
        group = struct.unpack("<H", head[:2])[0]
        if group != 0x0002:
            # There is data after the meta, yet pydicom returned no dataset:
            # it discards the whole dataset when an undefined-length value
            # (typically encapsulated pixel data) has no delimiter before EOF.
            raise DicomReadError(
                f"truncated: the dataset starting at offset {pos} could not be read "
                "(end of file reached before the delimiter of an undefined-length value)"
            )
        vr = head[4:6]
        if vr in _EXPLICIT_VRS_32BIT_LENGTH:
            if len(head) < 12:
                raise DicomReadError(
                    f"truncated: the data ends inside a data element header at offset {pos}"
                )
            header, length = 12, struct.unpack("<L", head[8:12])[0]
        elif vr in _EXPLICIT_VRS:
            header, length = 8, struct.unpack("<H", head[6:8])[0]
        else:
            header, length = 8, struct.unpack("<L", head[4:8])[0]
        if length == _UNDEFINED_LENGTH:
            return
        if pos + header + length > file_size:
            raise DicomReadError(
                f"truncated: element {_fmt_tag(struct.unpack('<L', head[2:4] + head[:2])[0])} "
                f"at offset {pos + header} declares {length} bytes but the data ends at "
                f"offset {file_size}"
            )
        pos += header + length


# --------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------
class _Walker:
    __slots__ = ("rows", "next_item", "source", "source_size", "instance_values", "number_texts")

    def __init__(self, source: BinaryIO, source_size: int) -> None:
        self.rows: list[ElementRow] = []
        self.next_item = 0
        self.source = source
        self.source_size = source_size
        self.instance_values: dict[int, Any] = {}
        self.number_texts: dict[int, str] = {}

    def _load_deferred(self, raw: RawDataElement) -> RawDataElement:
        """Read a deferred value from the open file (pydicom would re-open it)."""
        tell = raw.value_tell
        if raw.length == _UNDEFINED_LENGTH:
            self.source.seek(tell)
            value = read_undefined_length_value(
                self.source, raw.is_little_endian, SequenceDelimiterTag, None
            )
        else:
            if tell + raw.length > self.source_size:
                raise DicomReadError(
                    f"truncated: element {_fmt_tag(raw.tag)} at offset {tell} declares "
                    f"{raw.length} bytes but the data ends at offset {self.source_size}"
                )
            self.source.seek(tell)
            value = self.source.read(raw.length)
            if len(value) != raw.length:
                raise DicomReadError(
                    f"truncated: element {_fmt_tag(raw.tag)} at offset {tell}: "
                    f"only {len(value)} of {raw.length} bytes could be read"
                )
        return raw._replace(value=value)

    def walk(
        self,
        ds: Dataset,
        parent_sequence_index: int | None,
        parent_item_index: int | None,
        collect_instance_values: bool = False,
    ) -> None:
        rows = self.rows
        creators: dict[int, str | None] = {}  # creator tag -> creator, this dataset only
        # Sorted tag order is DICOM's mandatory element order (and pydicom's
        # iteration order); for any valid file it is the order in the file.
        for tag in sorted(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            loaded = self._checked_raw(tag, raw)
            if tag in PIXEL_DATA_TAGS:
                continue
            elem, vr, vm, value_json = self._converted(ds, tag, raw, loaded)
            group = tag >> 16
            is_private = bool(group & 1)
            if is_private:
                dictionary_tag, keyword, name, creator = self._private_info(ds, tag, elem, creators)
            else:
                (dictionary_tag, keyword, name), creator = _public_info(tag), None

            index = len(rows)
            items = elem.value if vr == "SQ" else None
            rows.append(
                ElementRow(
                    index,
                    parent_sequence_index,
                    parent_item_index,
                    _fmt_tag(tag),
                    f"{group:04X}",
                    dictionary_tag,
                    keyword,
                    name,
                    vr,
                    vm,
                    value_json,  # None for sequences: their items follow as rows of their own
                    items is not None,
                    None if items is None else len(items),
                    is_private,
                    creator,
                )
            )
            if items is not None:
                for item in items:
                    item_index = self.next_item
                    self.next_item += 1
                    self.walk(item, index, item_index)
                continue
            if collect_instance_values and tag in _INSTANCE_TAGS:
                self.instance_values[tag] = elem.value
            if collect_instance_values and vr in NUMBER_TEXT_VRS and vm == "1" and not is_private:
                text = getattr(elem.value, "original_string", None)
                if text is not None:
                    self.number_texts[index] = number_text(str(text))

    def _checked_raw(self, tag: int, raw: Any) -> RawDataElement | None:
        """The element's value loaded if pydicom deferred it; raises if it is truncated.

        Pixel data is never loaded, only checked to be all there.
        """
        if not isinstance(raw, RawDataElement):
            return None
        if raw.value is None:
            if raw.length == 0:
                return None
            if tag not in PIXEL_DATA_TAGS:
                return self._load_deferred(raw)
            if raw.length != _UNDEFINED_LENGTH and raw.value_tell + raw.length > self.source_size:
                raise DicomReadError(
                    f"truncated: pixel data {_fmt_tag(tag)} at offset "
                    f"{raw.value_tell} declares {raw.length} bytes but the "
                    f"data ends at offset {self.source_size}"
                )
            return None
        if raw.length != _UNDEFINED_LENGTH and len(raw.value) != raw.length:
            # pydicom does not treat a short read as an error.
            raise DicomReadError(
                f"truncated: element {_fmt_tag(tag)} at offset {raw.value_tell} "
                f"declares {raw.length} bytes but only {len(raw.value)} are present"
            )
        return None

    @staticmethod
    def _converted(
        ds: Dataset, tag: int, raw: Any, loaded: RawDataElement | None
    ) -> tuple[DataElement | _Verbatim, str, str, str | None]:
        """(element, VR, VM, DICOM JSON value) as pydicom converts the element; a value it
        cannot convert is kept verbatim (``_verbatim``)."""
        value_json: str | None = None
        try:
            loaded = _with_group_length_vr(loaded if loaded is not None else raw) or loaded
            if loaded is not None:
                ds[tag] = loaded  # so pydicom converts it without re-opening the file
            elem = ds[tag]  # converts the raw value (and fixes ambiguous VRs)
            if elem.VR == "SQ":
                vr = "SQ"
            elif isinstance(elem.value, BulkDataReference):  # DICOM JSON read from a server
                return elem, str(elem.VR), "1", json.dumps(elem.value.uri, ensure_ascii=False)
            elif elem.VR in AMBIGUOUS_VRS:  # what pydicom cannot resolve (its JSON model fails)
                vr, value_json = real_vr(elem.VR), _inline_binary(elem.value)
            else:
                json_model = elem.to_json_dict(None, _NO_BULK_THRESHOLD)
                vr = json_model["vr"]
                if "Value" in json_model:
                    value_json = json.dumps(json_model["Value"], ensure_ascii=False)
                elif "InlineBinary" in json_model:
                    value_json = json.dumps(json_model["InlineBinary"], ensure_ascii=False)
                value_json = _corrected_value(raw, vr, value_json)
            return elem, vr, str(elem.VM), value_json
        except DicomReadError:
            raise
        except Exception as exc:
            kept = _verbatim(ds, loaded if loaded is not None else raw)
            if kept is None:
                raise DicomReadError(_decode_reason(tag, raw, exc)) from exc
            return kept

    @staticmethod
    def _private_info(
        ds: Dataset, tag: int, elem: DataElement | _Verbatim, creators: dict[int, str | None]
    ) -> tuple[str, None, str | None, str | None]:
        """(dictionary tag, keyword, name, private creator) of a private element."""
        group, element = tag >> 16, tag & 0xFFFF
        block = element >> 8
        name: str | None = None
        creator: str | None = None
        if 0x0010 <= element <= 0x00FF:
            creator = _text(elem.value)
            creators[tag] = creator
            name = "Private Creator"
        elif block >= 0x10:
            creator_tag = (group << 16) | block
            if creator_tag in creators:
                creator = creators[creator_tag]
            else:
                if creator_tag in ds:
                    try:
                        creator = _text(ds[creator_tag].value)
                    except Exception:
                        creator = None
                creators[creator_tag] = creator
            if creator:
                name = _private_name(tag, creator)
        return _fmt_tag(tag), None, name, creator


def _with_group_length_vr(raw: Any) -> RawDataElement | None:
    """A private group length (gggg,0000) of an implicit VR file with its VR, UL, as every
    group length has (pydicom: UN bytes; corrections.py); None for any other element."""
    if (
        isinstance(raw, RawDataElement)
        and raw.VR is None
        and raw.tag >> 16 & 1
        and raw.tag & 0xFFFF == 0
        and raw.length % 4 == 0
    ):
        return raw._replace(VR="UL")
    return None


def _inline_binary(value: Any) -> str | None:
    """An element's bytes as DICOM JSON InlineBinary (None when empty)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected the value's bytes, not {type(value).__name__}")
    return json.dumps(base64.b64encode(value).decode("ascii")) if value else None


def _corrected_value(raw: Any, vr: str, value_json: str | None) -> str | None:
    """pydicom's DICOM JSON value with the corrections of corrections.py: CS values without
    their spaces, binary values of big-endian files in little-endian byte order."""
    if value_json is None:
        return None
    if vr == "CS":
        values = json.loads(value_json)
        return json.dumps(
            [code_strings([v])[0] if isinstance(v, str) else v for v in values],
            ensure_ascii=False,
        )
    if vr in WORD_VRS and isinstance(raw, RawDataElement) and raw.is_little_endian is False:
        swapped = little_endian_binary(base64.b64decode(json.loads(value_json)), vr)
        return json.dumps(base64.b64encode(swapped).decode("ascii"))
    return value_json


class _VerbatimText(str):
    """A text value kept verbatim; like pydicom's DS / IS it has ``original_string``, so that
    the walk keeps a single DS / IS value's text for measurements as it does for numbers."""

    @property
    def original_string(self) -> str:
        return str(self)


class _Verbatim(NamedTuple):
    """Stands in for the DataElement of a value pydicom cannot convert (the walk reads .value)."""

    value: Any


def _verbatim(ds: Dataset, raw: Any) -> tuple[_Verbatim, str, str, str | None] | None:
    """An element pydicom cannot convert (an IS ``1A``, a private DS ``1.9.10.0``, a US of
    odd length), kept as the file holds it: an odd value, not a reason to fail the file.

    The VR is the one pydicom converts with (its own lookup, private dictionary included);
    an ambiguous one ("US or SS") is UN. None when there is nothing to keep (then the
    conversion error is the file's reason).
    """
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return None
    found: dict[str, Any] = {}
    try:
        raw_element_vr(raw, found, ds=ds)
    except Exception:
        return None
    vr = str(found["VR"])
    if vr == "SQ":
        return None  # items that do not parse are structure, not a value
    if " or " in vr:
        vr = "UN"
    vm, value_json, value = verbatim_value(vr, raw.value)
    if isinstance(value, str):
        value = _VerbatimText(value)
    return _Verbatim(value), vr, vm, value_json


# Values can appear inside pydicom/ValueError messages (e.g. "could not
# convert string to float: '...'").  For elements that may identify the
# patient (patient/visit/procedure groups, person names, private elements)
# the message is withheld and only the exception type is reported.
_SENSITIVE_GROUPS = frozenset({0x0010, 0x0032, 0x0038, 0x0040})


def _decode_reason(tag: int, raw: Any, exc: Exception) -> str:
    group = tag >> 16
    if group & 1:
        label = "private"
    else:
        label = _public_info(tag)[1] or "unknown"
    vr = getattr(raw, "VR", None)
    if vr is None:  # implicit VR file: fall back to the dictionary
        entry = DicomDictionary.get(tag)
        vr = entry[0] if entry else None
    if group & 1 or group in _SENSITIVE_GROUPS or vr == "PN":
        detail = f"{type(exc).__name__} (details withheld: the value may contain patient data)"
    else:
        detail = _exc_text(exc)
    return f"cannot decode element {_fmt_tag(tag)} {label}: {detail}"


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------
def read_instance(path: str | os.PathLike | BinaryIO, fast_path: bool = True) -> DicomInstance:
    """Read one DICOM file; raise DicomReadError (and only that) if it cannot be ingested.

    Files in the common encodings are read by ``fast_path`` straight from their
    bytes; every other file, and every file the fast path declines, goes through pydicom.
    Both give the same instance and rows (``fast_path=False`` forces pydicom, for tests).
    ``path`` may also be a seekable binary stream (an archive member read into memory,
    ``core/ingest/archives.py``): both paths only read and seek, so it parses the same.
    """
    try:
        with _quiet_pydicom():
            return _read_instance(path, fast_path)
    except DicomReadError:
        raise
    except RecursionError as exc:
        raise DicomReadError("cannot parse DICOM data: sequences nested too deeply") from exc
    except Exception as exc:  # the boundary: nothing else may escape
        raise DicomReadError(f"cannot read DICOM file: {_exc_text(exc)}") from exc


def read_dataset(ds: Dataset) -> DicomInstance:
    """An instance from a dataset already in memory (DICOM JSON from a DICOMweb server:
    ``core/dicom/json_instance.py``), walked exactly as a file's dataset is; it has no file
    meta group. Raises DicomReadError (and only that) if it cannot be ingested."""
    try:
        with _quiet_pydicom():
            walker = _Walker(io.BytesIO(), 0)  # nothing is deferred: no source to read from
            walker.walk(ds, None, None, collect_instance_values=True)
            return _instance_from(walker.rows, walker.instance_values, walker.number_texts)
    except DicomReadError:
        raise
    except RecursionError as exc:
        raise DicomReadError("cannot parse DICOM data: sequences nested too deeply") from exc
    except Exception as exc:  # the boundary: nothing else may escape
        raise DicomReadError(f"cannot read DICOM dataset: {_exc_text(exc)}") from exc


def _open(path: str | os.PathLike | BinaryIO) -> tuple[BinaryIO, int]:
    """The stream to read and its size: a file opened here, or the caller's stream."""
    if hasattr(path, "read"):
        stream: BinaryIO = path  # type: ignore[assignment]
        return stream, _stream_size(stream)
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed by the caller, must stay open for the walk
    except OSError as exc:
        # strerror only: the path itself may contain a patient name
        raise DicomReadError(f"cannot open file: {exc.strerror or type(exc).__name__}") from exc
    return fp, os.fstat(fp.fileno()).st_size


def _read_instance(path: str | os.PathLike | BinaryIO, fast_path: bool) -> DicomInstance:
    fp, file_size = _open(path)
    with fp:
        if file_size == 0:
            raise DicomReadError("empty file (0 bytes)")

        head = fp.read(132)
        fp.seek(0)
        has_prefix = head[128:132] == b"DICM"
        if has_prefix and fast_path:
            try:
                return _instance_from(*read_fast(fp, file_size, _INSTANCE_TAGS))
            except NeedsPydicom:
                fp.seek(0)
        if not has_prefix and not _starts_like_dataset(head, file_size):
            raise DicomReadError(
                "not a DICOM file: no 'DICM' prefix at offset 128 and it does not "
                "start with a DICOM data element"
            )

        try:
            # force only for files without preamble: they are DICOM too.
            ds, meta = dcmread_as_dcmtk(fp, file_size, _DEFER_SIZE, force=not has_prefix)
        except InvalidDicomError as exc:
            raise DicomReadError(f"not a DICOM file: {_exc_text(exc)}") from exc
        except zlib.error as exc:
            raise DicomReadError(
                f"truncated or corrupt deflate-compressed dataset: {_exc_text(exc)}"
            ) from exc
        except Exception as exc:
            try:
                at_eof = fp.tell() >= file_size
            except Exception:
                at_eof = False
            if at_eof:
                raise DicomReadError(
                    f"truncated: end of file reached while parsing ({_exc_text(exc)})"
                ) from exc
            raise DicomReadError(f"cannot parse DICOM data: {_exc_text(exc)}") from exc

        # Deflated datasets are inflated by pydicom into an in-memory buffer;
        # element offsets of the dataset then refer to that buffer.
        deflated = ds.buffer is not None
        source: BinaryIO = ds.buffer if deflated else fp  # type: ignore[assignment]
        source_size = _stream_size(source) if deflated else file_size

        if len(ds) == 0 and not deflated:
            # Nothing after the file meta: pydicom has already converted some
            # meta elements (lengths lost), so check the meta bytes directly.
            _check_file_meta_bytes(fp, 132 if has_prefix else 0, file_size)
        if len(ds) == 0 and len(meta) == 0:
            raise DicomReadError("not a DICOM file: no data elements could be read")
        _check_top_level_end(ds, source, source_size, deflated)

        walker = _Walker(source, source_size)
        # File meta elements are never deferred and are checked/converted the
        # same way; they come first, as in the file.
        walker.walk(meta, None, None)
        walker.walk(ds, None, None, collect_instance_values=True)

    return _instance_from(walker.rows, walker.instance_values, walker.number_texts)


def _instance_from(
    rows: list[ElementRow], values: dict[int, Any], number_texts: dict[int, str]
) -> DicomInstance:
    """The instance record from the walk's rows and its top-level instance attributes."""
    uids: dict[int, str | None] = {tag: _text(values.get(tag)) for _, tag in _REQUIRED_UIDS}
    missing = [kw for kw, tag in _REQUIRED_UIDS if not uids[tag]]
    if missing:
        raise DicomReadError(f"missing required attribute(s): {', '.join(missing)}")
    # DICOM caps UIDs at 64 characters; a longer one is corrupt and would not fit the
    # OMOP columns (varchar(250)), failing the whole batch instead of this file.
    too_long = [kw for kw, tag in _REQUIRED_UIDS if len(uids[tag] or "") > _MAX_UID_LENGTH]
    if too_long:
        raise DicomReadError(
            f"invalid UID(s) longer than {_MAX_UID_LENGTH} characters: {', '.join(too_long)}"
        )

    procedure_datetime = _date_and_time(values, _PROCEDURE_DATE_ORDER)
    image_datetime = _date_and_time(values, _IMAGE_DATE_ORDER)
    if procedure_datetime is None or image_datetime is None:
        raise DicomReadError(_NO_DATE_REASON)

    return DicomInstance(
        sop_instance_uid=uids[_TAG_SOP_INSTANCE_UID],  # type: ignore[arg-type]
        study_instance_uid=uids[_TAG_STUDY_INSTANCE_UID],  # type: ignore[arg-type]
        series_instance_uid=uids[_TAG_SERIES_INSTANCE_UID],  # type: ignore[arg-type]
        patient_id=_text(values.get(_TAG_PATIENT_ID)),
        procedure_date=procedure_datetime.date(),
        image_date=image_datetime.date(),
        study_description=_text(values.get(_TAG_STUDY_DESCRIPTION)),
        modality=_text(values.get(_TAG_MODALITY)),
        body_part_examined=_text(values.get(_TAG_BODY_PART_EXAMINED)),
        instance_number=_parse_int(values.get(_TAG_INSTANCE_NUMBER)),
        elements=rows,
        procedure_datetime=procedure_datetime,
        image_datetime=image_datetime,
        number_texts=number_texts,
        odd_value_tags=odd_value_tags(rows),
    )
