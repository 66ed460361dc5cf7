"""pydicom's ``dcmread``, except for the top-level elements DCMTK reads and pydicom does not.

Why: a file that DCMTK and the standard read must not be lost, nor read wrongly, because
pydicom guesses otherwise (corrections.py lists every case where the rows differ):

* a UN element of undefined length is a sequence whose items are encoded in implicit VR
  little endian, whatever the file's transfer syntax (PS3.5 6.2.2, CP-246). pydicom reads
  its items in the file's encoding: explicit VR little endian mostly works by its guess
  of "implicit VR switches", big endian fails (fo-dicom GH177, "truncated");
* an element with a blank VR (two spaces or two NULs; fo-dicom GH179A) is read by
  pydicom as implicit VR, which runs past the end of the file. DCMTK assumes a 2-byte
  length. Here the VR comes from the dictionary with that 2-byte length, or the element
  is read as implicit VR, whichever parses (the value ends at the end of the data or
  where a plausible next element starts); failing both, pydicom's reading stands and
  the reader reports the file truncated, as before;
* a stray copy of group 0002 inside the data set (fo-dicom GH1376) does not replace the
  real file meta (corrections.stray_meta_end).

pydicom reads the top level through ``stop_when``: it stops before such an element, the
element is read here and pydicom goes on after it. Inside items pydicom's reading stands
(pydicom offers no hook there); the fast path reads nested UN sequences as implicit VR
too, which gives the same rows for any file whose implicit items do not look explicit.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset, read_partial, read_sequence
from pydicom.tag import Tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32

from dicom_etl_dagster.core.dicom.corrections import (
    encoding,
    meta_transfer_syntax,
    same_encoding,
    stray_meta_end,
)

__all__ = ["dcmread_as_dcmtk"]

_UNDEFINED = 0xFFFFFFFF
_BLANK_VRS = (b"  ", b"\x00\x00")
_VALID_VRS = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_16 | EXPLICIT_VR_LENGTH_32)
#: The file meta of any real file fits into this many bytes.
_HEAD_SIZE = 64 * 1024


class _Stops:
    """``stop_when`` for pydicom's top-level read: stop before the elements read here."""

    def __init__(self, fp: BinaryIO, explicit: bool) -> None:
        self.fp = fp
        self.explicit = explicit
        self.kind: str | None = None  # why the read stopped: "UN sequence", "blank VR"

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        if vr == "UN" and length == _UNDEFINED:
            self.kind = "UN sequence"
        elif vr is None and self.explicit and self._vr_bytes() in _BLANK_VRS:
            self.kind = "blank VR"  # pydicom took the element for implicit VR
        return self.kind is not None

    def _vr_bytes(self) -> bytes:
        value_start = self.fp.tell()  # after the 8-byte header pydicom read as implicit
        self.fp.seek(value_start - 4)
        vr_bytes = self.fp.read(2)
        self.fp.seek(value_start)
        return vr_bytes


def dcmread_as_dcmtk(
    fp: BinaryIO, file_size: int, defer_size: int, force: bool
) -> tuple[FileDataset, Dataset]:
    """(data set, file meta) of an open file: pydicom's reading, with the corrections above.

    Raises what pydicom raises, and ValueError when a stray file meta copy names another
    encoding than the real file meta (pydicom has read the data set in the copy's).
    """
    head = fp.read(_HEAD_SIZE)
    fp.seek(0)
    syntax = None if force else meta_transfer_syntax(head)
    kind = encoding(syntax) if syntax else None  # no interceptions when pydicom guesses
    little = kind != "big endian"
    stops = _Stops(fp, explicit=kind in ("explicit", "big endian"))
    ds = read_partial(fp, stops if kind in ("explicit", "big endian") else None, defer_size, force)
    while stops.kind is not None:
        _read_stopped_element(fp, ds, stops.kind, little, file_size, defer_size)
        stops.kind = None
        ds.update(
            read_dataset(
                fp, False, little, None, stops, defer_size, parent_encoding=ds._character_set
            )
        )
        ds.set_original_encoding(False, little, ds._character_set)
    return ds, _real_file_meta(fp, ds, head)


def _read_stopped_element(
    fp: BinaryIO, ds: Dataset, kind: str, little: bool, file_size: int, defer_size: int
) -> None:
    """Read the element at fp into ds (see the module's docstring)."""
    endian = "<" if little else ">"
    start = fp.tell()
    header = fp.read(8)
    group, element, _vr, short_length = struct.unpack(endian + "HH2sH", header)
    tag = Tag(group << 16 | element)
    if kind == "UN sequence":
        fp.seek(start + 12)  # after the 4-byte (undefined) length
        items = read_sequence(fp, True, True, _UNDEFINED, ds._character_set)
        ds[tag] = DataElement(tag, "SQ", items, start + 12, is_undefined_length=True)
        return
    implicit_length = struct.unpack(endian + "L", header[4:])[0]
    vr: str | None = None
    length = implicit_length
    known = _dictionary_vr(tag)
    if known is not None and _parses(fp, tag, start + 8 + short_length, endian, file_size):
        vr, length = known, short_length
    fp.seek(start + 8)
    value = fp.read(length) if length <= defer_size else None
    fp.seek(start + 8 + length)
    ds[tag] = RawDataElement(tag, vr, length, value, start + 8, vr is None, little)


def _dictionary_vr(tag: int) -> str | None:
    if tag >> 16 & 1:
        return None  # private: no dictionary VR without the creator
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _parses(fp: BinaryIO, tag: int, end: int, endian: str, file_size: int) -> bool:
    """Does a value ending at ``end`` leave the data set parseable: the end of the data,
    or a next element with a later tag and a valid (or again blank) VR?"""
    if end >= file_size:
        return end == file_size
    fp.seek(end)
    header = fp.read(6)
    if len(header) < 6:
        return False
    group, element, vr = struct.unpack(endian + "HH2s", header)
    return group << 16 | element > tag and (vr in _VALID_VRS or vr in _BLANK_VRS)


def _real_file_meta(fp: BinaryIO, ds: FileDataset, head: bytes) -> Dataset:
    """The file meta group its group length bounds, without a stray copy's values."""
    meta: Dataset = ds.file_meta if ds.file_meta is not None else Dataset()
    end = stray_meta_end(head)
    if end is None:
        return meta
    real_syntax = meta_transfer_syntax(head)
    copy_syntax = meta.get("TransferSyntaxUID")
    copy_syntax = None if copy_syntax is None else str(copy_syntax)
    if not same_encoding(real_syntax, copy_syntax):
        raise ValueError(
            f"the file meta names transfer syntax {real_syntax} but a copy of group 0002 "
            f"inside the data set names {copy_syntax}"
        )
    fp.seek(132)
    return read_dataset(fp, False, True, bytelength=end - 132)
