"""The shape of one metadata row and the names of tags: shared by both DICOM readers.

``reader`` (pydicom, every encoding) and ``fast_path`` (raw bytes, the common
encodings) must produce identical rows; what a row is and how a tag is named lives here
once so that they cannot drift apart.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, NamedTuple

from pydicom.datadict import (
    DicomDictionary,
    RepeatersDictionary,
    mask_match,
    private_dictionary_description,
)

#: VRs whose file text DICOM JSON turns into numbers; both readers keep it for measurements.
NUMBER_TEXT_VRS = frozenset({"DS", "IS"})
_PADDING = re.compile(r"^[\s\x00]+|[\s\x00]+$")


def json_number_text(value: Any) -> Any:
    """A DICOM JSON number as text in its shortest form (DS 120.0 -> "120"); other values
    as they are. What a number reads when the file's own text is not at hand."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and value.is_integer()
        and abs(value) < 1e15
    ):
        return str(int(value))
    return str(value)


def number_text(text: str) -> str:
    """A DS / IS value's text without its padding: whitespace and NULs at either end (what
    pydicom already removed, or not, the text is the same from both readers)."""
    return _PADDING.sub("", text)


class BulkDataReference(bytes):
    """An empty value standing for a DICOM JSON ``BulkDataURI`` (a DICOMweb server's link to
    bytes it did not send). pydicom keeps a bytes value of a binary VR as it is, so the walk
    can tell it from real bytes and store the URI itself instead of an empty InlineBinary."""

    uri: str

    def __new__(cls, uri: str) -> BulkDataReference:
        reference = super().__new__(cls, b"")
        reference.uri = uri
        return reference


#: PixelData, FloatPixelData, DoubleFloatPixelData: never stored as metadata rows.
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class ElementRow(NamedTuple):
    """One row of the EAV table ``dicom_file_metadata``."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which rows never use
    parent_sequence_index: int | None
    parent_item_index: int | None
    tag: str
    group: str
    dictionary_tag: str
    keyword: str | None
    name: str | None
    vr: str
    vm: str
    value_json: str | None
    is_sequence: bool
    sequence_length: int | None
    is_private: bool
    private_creator: str | None


def fmt_tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@lru_cache(maxsize=16384)
def public_info(tag: int) -> tuple[str, str | None, str | None]:
    """(dictionary_tag, keyword, name) for a non-private tag."""
    entry = DicomDictionary.get(tag)
    if entry is not None:
        return fmt_tag(tag), entry[4] or None, entry[2] or None
    mask = mask_match(tag)
    if mask is not None:
        # Repeating groups such as (60xx,3000) are keyed by their mask, in the
        # PS3.6 spelling: upper-case hex digits, lower-case "x".
        entry = RepeatersDictionary[mask]
        return f"({mask[:4]},{mask[4:]})", entry[4] or None, entry[2] or None
    if tag & 0xFFFF == 0:
        # Group length elements of groups other than 0002 are retired and
        # not in the dictionary; pydicom still names them.
        return fmt_tag(tag), None, "Group Length"
    return fmt_tag(tag), None, None


@lru_cache(maxsize=16384)
def private_name(tag: int, creator: str) -> str | None:
    try:
        return private_dictionary_description(tag, creator) or None
    except Exception:  # KeyError for unknown ones; never fatal
        return None
