"""Where both readers depart from pydicom's DICOM JSON model, and why.

The rows equal pydicom's DICOM JSON model (PS3.18 F.2) everywhere except in the cases
below, where pydicom disagrees with the standard and with DCMTK. ``reader`` (pydicom) and
``fast_path`` (raw bytes) apply the same rules from here; the README lists them under
"Where the rows differ from pydicom", and the tests' oracle
(``dicom_etl_dagster_tests/pydicom_corrections.py``) states them once more, independently.

* Binary values of big-endian files (OW, OF, OL, OD, OV) are stored little endian, as
  DICOM JSON's InlineBinary is: the big-endian file and its little-endian copy give the
  same bytes (pydicom keeps the file's byte order).
* A dictionary ambiguity that pydicom leaves unresolved ("OB or OW" of curve data,
  "US or SS" of five retired attributes) is not a VR: see ``real_vr``.
* Each CS value loses its leading and trailing spaces, which are not significant for CS
  (PS3.5 table 6.2-1; pydicom strips only the end of the whole, "DERIVED \\PRIMARY").
* Private group lengths (gggg,0000) of implicit VR files are UL, as every group length
  (PS3.5 7.2); pydicom reads them as UN bytes.
* The file meta is the group its group length bounds (PS3.10 7.1, as DCMTK reads it); a
  stray copy of group 0002 inside the data set is dropped (see ``stray_meta_end``).
* A UN element of undefined length is a sequence in implicit VR little endian (CP-246),
  and an element with a blank VR takes its VR from the dictionary or is read as implicit
  VR, whichever parses (both in ``reader``; the fast path declines blank VRs).
"""

from __future__ import annotations

import struct
from array import array

__all__ = [
    "AMBIGUOUS_VRS",
    "WORD_VRS",
    "code_strings",
    "encoding",
    "little_endian_binary",
    "meta_transfer_syntax",
    "real_vr",
    "same_encoding",
    "stray_meta_end",
]

#: What the dictionary ambiguities pydicom leaves unresolved are stored as. An OB-or-OW
#: choice is OW: PS3.5 A.1 gives OW to such values in implicit VR little endian (the only
#: encoding without the VR in the file). "US or SS" that pydicom cannot tell from
#: PixelRepresentation (retired LUT descriptors and Perimeter Value, whose values mix
#: both) is UN: the bytes are kept, no sign is guessed.
AMBIGUOUS_VRS = {"OB or OW": "OW", "US or SS or OW": "OW", "US or OW": "OW", "US or SS": "UN"}

#: Binary VRs whose values are numbers of this size, written in the file's byte order.
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
#: The VRs whose values little_endian_binary swaps.
WORD_VRS = frozenset(_WORD_SIZES)
_ARRAY_CODES = {size: next(c for c in "HILQ" if array(c).itemsize == size) for size in (2, 4, 8)}


def real_vr(vr: str) -> str:
    """The VR to store for a VR as pydicom leaves it (unchanged unless it is an ambiguity)."""
    return AMBIGUOUS_VRS.get(vr, vr)


def little_endian_binary(value: bytes, vr: str) -> bytes:
    """A big-endian file's binary value in little-endian byte order (OB, UN: unchanged;
    a value that is not a whole number of words is left as it is)."""
    size = _WORD_SIZES.get(vr)
    if size is None or len(value) % size:
        return value
    words = array(_ARRAY_CODES[size], value)
    words.byteswap()
    return words.tobytes()


def code_strings(values: list[str]) -> list[str]:
    """CS values without the spaces around each value."""
    return [value.strip(" ") for value in values]


# --------------------------------------------------------------------------
# The file meta group, from the bytes (both readers)
# --------------------------------------------------------------------------
_LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_META_START = 132  # after the preamble and "DICM"


def _meta_elements(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """(tag, value offset, length) of each file meta element of a Part 10 file, up to the
    end its group length (0002,0000) gives, and that end; ([], -1) when the group does
    not have a group length or its elements do not end exactly there."""
    if buf[_META_START : _META_START + 6] != b"\x02\x00\x00\x00UL" or len(buf) < 144:
        return [], -1
    end = 144 + struct.unpack_from("<L", buf, 140)[0]
    elements, pos, last = [], 144, 0x00020000
    while pos < end:
        if pos + 12 > len(buf):
            return [], -1
        group, element, vr = struct.unpack_from("<HH2s", buf, pos)
        tag = group << 16 | element
        if group != 0x0002 or tag <= last:
            return [], -1
        if vr in _LONG_LENGTH_VRS:
            header, length = 12, struct.unpack_from("<L", buf, pos + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", buf, pos + 6)[0]
        elements.append((tag, pos + header, length))
        pos, last = pos + header + length, tag
    return (elements, end) if pos == end else ([], -1)


def stray_meta_end(buf: bytes) -> int | None:
    """Where the real file meta ends when a stray copy of group 0002 follows it, else None.

    Some writers wrap an old file's data set, file meta included, in a new file meta
    (fo-dicom GH1376.dcm): pydicom reads on to the end of group 0002 and lets the copy
    replace the real values (transfer syntax included). The real group is the one its
    group length bounds; a group-0002 element right at that end whose tag does not
    follow the last one starts the copy. Without a (consistent) group length there is
    no telling, and both readers read as pydicom does. The copy is dropped: it describes
    an earlier file, and rows of group 0002 are this file's meta (two TransferSyntaxUID
    rows, one of them false, could not be told apart).
    """
    elements, end = _meta_elements(buf)
    if not elements or end + 4 > len(buf):
        return None
    group, element = struct.unpack_from("<HH", buf, end)
    return end if group == 0x0002 and group << 16 | element <= elements[-1][0] else None


def meta_transfer_syntax(buf: bytes) -> str | None:
    """The real file meta's TransferSyntaxUID (see ``_meta_elements``), or None."""
    elements, _ = _meta_elements(buf)
    for tag, start, length in elements:
        if tag == 0x00020010:
            return buf[start : start + length].decode("latin_1").strip(" \x00")
    return None


_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def encoding(transfer_syntax: str | None) -> str:
    """How a data set in this transfer syntax is encoded, as pydicom decides it."""
    if transfer_syntax is None or transfer_syntax == _IMPLICIT_LE:
        return "implicit"
    if transfer_syntax == _EXPLICIT_BE:
        return "big endian"
    return "deflated" if transfer_syntax == _DEFLATED else "explicit"


def same_encoding(first: str | None, second: str | None) -> bool:
    """Do data sets in these two transfer syntaxes read alike?"""
    return encoding(first) == encoding(second)
